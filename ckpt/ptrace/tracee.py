"""What we know about each thread we hold: which kind of ptrace-stop it is in, and what we took from it."""

from __future__ import annotations

import os
import threading
from contextlib import suppress
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
    # In a ptrace-stop now. False between seize and the first stop, and while resumed for a step;
    # a thread that is not stopped cannot be detached (PTRACE_DETACH needs a stopped tracee).
    stopped: bool = False
    # In a signal-delivery-stop for a signal of ckpt's own (an injected single-step's forced SIGTRAP,
    # a batch's end signal), suppressed only when ckpt resumes or detaches the thread: a death of
    # ckpt there would deliver it (SIG_DFL kills) and leave a step's trap flag set. Frozen.settle.
    own_stop: bool = False

    def note(self, w: raw.WaitResult) -> None:
        """Record the kind of stop a wait reported."""
        self.own_stop = False
        if w.exited:
            self.dead = True
            self.stopped = False
        else:
            self.stopped = True
            self.signal_stop = w.is_signal_stop

    def resume_syscall(self) -> None:
        raw.resume_syscall(self.tid)  # data 0: a signal it was stopped for is suppressed (already held)
        self.stopped = False

    def hold(self, sig: int) -> None:
        """Take the signal this thread is stopped for; it is given back at thaw."""
        self.held.append(HeldSignal(sig, raw.getsiginfo(self.tid)))


@dataclass(frozen=True)
class _Orphan:
    pid: int
    tracer: int  # native id of the thread that seized it: only that thread can detach it


# Threads we seized that never reached a stop (a vfork parent waiting for its child, uninterruptible
# sleep). PTRACE_DETACH needs a stopped tracee, so they cannot be let go yet; once they reach the
# pending interrupt-stop they would wait there for us forever. release_orphans() lets them go when
# they have stopped; it runs at every freeze() and thaw(). If this process exits first, the kernel
# detaches them and they never stop at all.
_orphans: dict[int, _Orphan] = {}


def add_orphan(pid: int, tid: int, tracer: int) -> None:
    _orphans[tid] = _Orphan(pid, tracer)


def orphans() -> list[int]:
    return sorted(_orphans)


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def release_orphans() -> list[int]:
    """Detach the orphans (of the calling thread) that have stopped since; returns their tids."""
    me = threading.get_native_id()
    released = []
    for tid, o in list(_orphans.items()):
        if o.tracer != me:
            continue
        try:
            w = raw.take_stop(tid)
            if w is None and raw.exited(tid):
                # Dead meanwhile. Reap it unless it is our own child's leader: that exit status
                # belongs to our own wait for the child (subprocess.Popen's).
                if not (tid == o.pid and _ppid(o.pid) == os.getpid()):
                    os.waitpid(tid, os.WNOHANG | raw.WALL)
                del _orphans[tid]
                continue
        except ChildProcessError:
            del _orphans[tid]  # gone, reaped by someone
            continue
        if w is None:
            continue
        if not w.exited:
            with suppress(OSError):
                # From a signal-delivery-stop, pass the signal on rather than swallow it.
                raw.detach(tid, w.sig if w.is_signal_stop else 0)
            released.append(tid)
        del _orphans[tid]
    return released
