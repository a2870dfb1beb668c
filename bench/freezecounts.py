"""Counts of what a freeze does, which do not depend on the machine's load (bench_freeze --counts).

Installed into whatever ckpt is imported (this tree's or a --base tree's), by wrapping, from the
outside, the few functions everything goes through: ptrace(2) (ckpt.ptrace.raw._ptrace), the
waits for a stop report (raw.wait), the PAGEMAP_SCAN ioctls (ckpt.memory's libc), opens of the
target's /proc files (os.open, open), threads started, and garbage collections. Counting runs from
Frozen.freeze() to the thaw's last detach (Frozen._unblock_sigchld): one record per freeze in
``FREEZES``. The wrappers
cost a few microseconds a call: measure times without them.
"""

from __future__ import annotations

import builtins
import gc
import os
import threading
from collections import Counter
from typing import Any

FREEZES: list[dict[str, int]] = []
_cur: Counter[str] | None = None
KEYS = ("ptrace", "stops", "scans", "proc", "threads", "gc")


def _count(key: str) -> None:
    if _cur is not None:
        _cur[key] += 1


def install() -> None:
    """Wrap once; safe to call again. Import ckpt before (with SIGCHLD blocked, as bench_freeze
    does): numpy's threads started without it blocked make every wait of a freeze start a thread
    (ckpt/ptrace/sigchld.py, watch())."""
    from ckpt.ptrace import sigchld

    with sigchld.blocked():
        import ckpt.memory as memory
        from ckpt.ptrace import Frozen, raw

    if getattr(raw, "_counted", False):
        return
    raw._counted = True  # type: ignore[attr-defined]
    real_ptrace, real_wait = raw._ptrace, raw.wait

    def ptrace(*a: Any, **k: Any) -> Any:
        _count("ptrace")
        return real_ptrace(*a, **k)

    def wait(*a: Any, **k: Any) -> Any:
        r = real_wait(*a, **k)
        if r is not None and not r.gone:
            _count("stops")
        return r

    raw._ptrace, raw.wait = ptrace, wait  # type: ignore[assignment]

    class Libc:
        def __init__(self, lib: Any) -> None:
            self._lib = lib

        def __getattr__(self, name: str) -> Any:
            return getattr(self._lib, name)

        def ioctl(self, fd: Any, req: Any, arg: Any) -> Any:
            if req == memory.PAGEMAP_SCAN:
                _count("scans")
            return self._lib.ioctl(fd, req, arg)

    memory._libc = Libc(memory._libc)  # type: ignore[attr-defined]
    real_os_open, real_open = os.open, builtins.open

    def os_open(path: Any, *a: Any, **k: Any) -> Any:
        if isinstance(path, str) and path.startswith("/proc/") and not path.startswith("/proc/self"):
            _count("proc")
        return real_os_open(path, *a, **k)

    def b_open(file: Any, *a: Any, **k: Any) -> Any:
        if isinstance(file, str) and file.startswith("/proc/") and not file.startswith("/proc/self"):
            _count("proc")
        return real_open(file, *a, **k)

    os.open, builtins.open = os_open, b_open  # type: ignore[assignment]
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        _count("threads")
        real_start(self)

    threading.Thread.start = start  # type: ignore[method-assign]
    gc.callbacks.append(lambda phase, info: _count("gc") if phase == "start" else None)
    real_freeze = Frozen.freeze

    def freeze(self: Any) -> None:
        global _cur
        if not self.frozen:
            _cur = Counter()
        real_freeze(self)

    def end(self: Any) -> None:
        # Every thread detached (or the freeze failed): the target runs again from here.
        global _cur
        if _cur is not None:
            FREEZES.append({k: _cur.get(k, 0) for k in KEYS})
            _cur = None
        real_end(self)

    real_end = Frozen._unblock_sigchld
    Frozen.freeze, Frozen._unblock_sigchld = freeze, end  # type: ignore[method-assign]


def attach(rows: list[dict[str, float]]) -> None:
    """Put the counts of the last len(rows) freezes into those rows (one freeze per dump) as
    "n: KEY", and forget them."""
    got = FREEZES[-len(rows) :] if rows else []
    if len(got) == len(rows):
        for row, c in zip(rows, got, strict=True):
            row.update({f"n: {k}": float(v) for k, v in c.items()})
    FREEZES.clear()
