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


class DutyCycle:
    """Throttle a process's CPU to (1 - fraction) with SIGSTOP/SIGCONT in 100 ms periods, as QEMU's
    auto-converge throttles vCPUs. The fallback where no cgroup CPU quota can be set (the quota is
    gentler, and is tried first); the signals change nothing the process keeps."""

    PERIOD = 0.1
    mechanism = "SIGSTOP/SIGCONT duty cycle"

    def __init__(self, pids: int | Sequence[int], guard: Guard | None = None) -> None:
        self.pids = [pids] if isinstance(pids, int) else list(pids)
        self.guard = guard  # told while the cycle may stop the process: a SIGKILL of ckpt is undone
        self.fraction = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # A SIGSTOP of ours not yet undone. Only that one is undone: after the final dump the
        # process is stopped for the handover, and a SIGCONT then would let two copies run.
        self._stopped = False

    def _signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    @property
    def setting(self) -> str:
        """The cycle as run, for the round's report."""
        if self.fraction <= 0:
            return "no limit"
        return f"stopped {self.PERIOD * self.fraction * 1e3:.0f} ms of every {self.PERIOD * 1e3:.0f} ms"

    def set(self, fraction: float) -> None:
        self.fraction = min(max(fraction, 0.0), 0.99)
        if self.fraction > 0 and self._thread is None:
            if self.guard is not None:
                self.guard.tell({"stop": self.pids})
            self._thread = threading.Thread(target=self._run, name="ckpt-throttle", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            off = self.PERIOD * self.fraction
            with self._lock:
                if self._stop.is_set():
                    break
                self._signal(signal.SIGSTOP)
                self._stopped = True
            if self._stop.wait(off):
                break
            with self._lock:
                self._signal(signal.SIGCONT)
                self._stopped = False
            if self._stop.wait(self.PERIOD - off):
                break

    def pause(self) -> None:
        """Stop throttling and leave the process running (before a freeze, and at the end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._stopped:
            self._signal(signal.SIGCONT)
            self._stopped = False
        if self.guard is not None:
            self.guard.tell({"stop": []})  # before anyone else may stop it (the handover)

    def close(self) -> None:
        self.pause()

    def resume(self) -> None:
        self._stop = threading.Event()
        if self.fraction > 0:
            self.set(self.fraction)
