"""RATE parsing, the sender's token bucket (--bandwidth) and the auto-converge CPU throttle."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ckpt.errors import CkptError
from ckpt.migrate.guard import job_stopped, sigstop_on_its_way, stopped_by_another
from ckpt.threadpool import Latch
from ckpt.threadpool import start as start_thread

if TYPE_CHECKING:
    from ckpt.migrate.guard import Guard

_UNITS = {
    "b/s": 1,
    "kb/s": 1000,
    "mb/s": 1000**2,
    "gb/s": 1000**3,
    "kib/s": 1024,
    "mib/s": 1024**2,
    "gib/s": 1024**3,
    "bit": 1 / 8,
    "kbit": 1000 / 8,
    "mbit": 1000**2 / 8,
    "gbit": 1000**3 / 8,
}


def parse_rate(s: str) -> float:
    """'500KB/s', '12MB/s', '1GB/s', '100Mbit', '1Gbit' -> bytes per second."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z/]+)\s*", s)
    if not m or m.group(2).lower() not in _UNITS:
        raise CkptError(f"{s!r} is not a rate (examples: 500KB/s, 12MB/s, 1GB/s, 100Mbit, 1Gbit)")
    v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if v < 1024:
        raise CkptError(f"rate {s!r} is below 1 KiB/s")
    return v


class TokenBucket:
    """At most `rate` bytes per second on average, bursts of up to `burst` bytes."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 20, 256 << 10)
        self.tokens = self.burst
        self.t = time.monotonic()

    def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        self.tokens -= n
        if self.tokens < 0:
            # Pacing a sender is the one wait here that is about time itself, not an event.
            time.sleep(-self.tokens / self.rate)


def cycle_setting(word: str, period: float, fraction: float, halted: str) -> str:
    """A duty cycle as run, for the round's report: "stopped 30 ms of every 100 ms" (this cycle's),
    "frozen ..." (the cgroup freezer's: cgthrottle.FreezeCycle), or why it ended."""
    if halted:
        return f"none: {halted}"
    if fraction <= 0:
        return "no limit"
    return f"{word} {period * fraction * 1e3:.0f} ms of every {period * 1e3:.0f} ms"


class DutyCycle:
    """Throttle a process's CPU to (1 - fraction) with SIGSTOP/SIGCONT in 100 ms periods, as QEMU's
    auto-converge throttles vCPUs. The last resort, where no cgroup CPU quota can be set and no
    cgroup v2 freezer be used (cgthrottle.py); the signals change nothing the process keeps.

    They are job control, which the process may be under from someone else (a shell's Ctrl-Z, a
    debugger's SIGSTOP): ckpt's SIGCONT would end that stop, and discard a stop signal sent while
    ckpt's own stop held it. So the cycle never ends a stop that is not its own: before each of its
    SIGSTOPs it looks for the process in a stop (state T while the cycle has it running: someone
    else's), and before each SIGCONT for a stop signal pending on it (sent while ckpt's stop held
    it: guard.stopped_by_another). Either way it stops cycling, leaves the process stopped, and
    says so (`halted`, the round's throttle_setting). The one stop it cannot tell: another's sent
    while its own SIGSTOP is on its way (the two merge into one stop), which its SIGCONT ends."""

    PERIOD = 0.1
    mechanism = "SIGSTOP/SIGCONT duty cycle"

    def __init__(self, pids: int | Sequence[int], guard: Guard | None = None) -> None:
        self.pids = [pids] if isinstance(pids, int) else list(pids)
        self.guard = guard  # told while the cycle may stop the process: a SIGKILL of ckpt is undone
        self.fraction = 0.0
        self._stop = Latch()  # (set by the main thread: a Ctrl-C there must leave no lock held)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # A SIGSTOP of ours not yet undone. Only that one is undone: after the final dump the
        # process is stopped for the handover, and a SIGCONT then would let two copies run.
        self._stopped = False
        self.halted = ""  # why the cycle stopped for good: a stop of someone else's (said in reports)

    def _signal(self, sig: int, pids: Sequence[int] | None = None) -> None:
        for pid in self.pids if pids is None else pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    @property
    def setting(self) -> str:
        """The cycle as run, for the round's report."""
        return cycle_setting("stopped", self.PERIOD, self.fraction, self.halted)

    def set(self, fraction: float) -> None:
        self.fraction = min(max(fraction, 0.0), 0.99)
        if self.fraction > 0 and self._thread is None and not self.halted:
            if self.guard is not None:
                self.guard.tell({"stop": self.pids})
            self._thread = threading.Thread(target=self._run, name="ckpt-throttle", daemon=True)
            start_thread(self._thread)

    def _halt(self, pids: Sequence[int], why: str) -> None:
        """Someone else stopped `pids`: no more cycling, and no SIGCONT to them (held: _lock)."""
        self.halted = (
            f"process {', '.join(map(str, pids))} was stopped by someone else ({why}): "
            "the duty cycle ended, the stop left as it is"
        )
        self._stop.set()
        if self.guard is not None:
            self.guard.tell({"stop": []})  # (none of ckpt's left: a death of ckpt continues nothing)

    def _cont(self) -> None:
        """End the cycle's own stop (held: _lock), but not where someone else stopped the process
        meanwhile: their stop signal is pending, and the SIGCONT would discard it."""
        theirs = [p for p in self.pids if stopped_by_another(p)]
        self._signal(signal.SIGCONT, [p for p in self.pids if p not in theirs])
        self._stopped = False
        if theirs:
            self._halt(theirs, "a stop signal sent while the duty cycle had it stopped")

    def _run(self) -> None:
        while not self._stop.is_set():
            off = self.PERIOD * self.fraction
            with self._lock:
                if self._stop.is_set():
                    break
                # Running, as far as the cycle knows (its SIGCONT woke it): a stop now is another's.
                theirs = [p for p in self.pids if job_stopped(p)]
                if theirs:
                    self._halt(theirs, "in a stop the duty cycle did not make")
                    break
                # Or one on its way: the cycle's SIGSTOP would merge with it, and its SIGCONT end it.
                theirs = [p for p in self.pids if sigstop_on_its_way(p)]
                if theirs:
                    self._halt(theirs, "a SIGSTOP of someone else's pending, not yet taken")
                    break
                self._signal(signal.SIGSTOP)
                self._stopped = True
            if self._stop.wait(off):
                break
            with self._lock:
                self._cont()
            if self._stop.wait(self.PERIOD - off):
                break

    def pause(self) -> None:
        """Stop throttling and leave the process running (before a freeze, and at the end), unless
        someone else stopped it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._stopped:
                self._cont()
        if self.guard is not None:
            self.guard.tell({"stop": []})  # before anyone else may stop it (the handover)

    def close(self) -> None:
        self.pause()

    def resume(self) -> None:
        self._stop = Latch()
        if self.fraction > 0:
            self.set(self.fraction)
