"""What we know about each thread we hold: which kind of ptrace-stop it is in, and what we took from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ckpt.ptrace import raw


@dataclass(frozen=True)
class HeldSignal:
    """A signal taken off a thread while it was frozen, to be delivered again at thaw."""

    sig: int
    info: bytes  # the 128-byte siginfo_t, so the handler sees the original sender and si_code


@dataclass
class TracedThread:
    tid: int
    # In a signal-delivery-stop (rather than an interrupt- or group-stop). Only from there does
    # PTRACE_DETACH's signal argument get delivered, with the siginfo PTRACE_SETSIGINFO put in place.
    signal_stop: bool = False
    held: list[HeldSignal] = field(default_factory=list)
    dead: bool = False  # killed while we held it: only reaping is left to do

    def note(self, w: raw.WaitResult) -> None:
        """Record the kind of stop a wait reported."""
        if w.exited:
            self.dead = True
        else:
            self.signal_stop = w.is_signal_stop

    def hold(self, sig: int) -> None:
        """Take the signal this thread is stopped for; it is given back at thaw."""
        self.held.append(HeldSignal(sig, raw.getsiginfo(self.tid)))
