"""Holding off Ctrl-C (and SIGTERM/SIGHUP/SIGQUIT) while a target is stopped or patched.

A KeyboardInterrupt raised between two ptrace calls could leave a thread with injected registers, a
patched instruction, or half the threads detached. Inside ``deferred_signals()`` those signals are
only recorded; when the outermost block ends, the previous handlers are put back and each recorded
signal is raised again, so SIGINT becomes KeyboardInterrupt and SIGTERM takes its usual action, after
the target is whole again. Blocks nest: only the outermost one re-raises.

Python handles signals in the main thread only; elsewhere the block does nothing (the signals would
not interrupt that thread anyway).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

_depth = 0
_held: list[int] = []


def _hold(signum: int, frame: FrameType | None) -> None:
    if signum not in _held:
        _held.append(signum)


@contextmanager
def deferred_signals() -> Iterator[None]:
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    # A handler installed from C (getsignal() is None) cannot be put back from Python: leave it alone.
    old = {s: h for s in DEFERRED if (h := signal.getsignal(s)) is not None}
    for s in old:
        signal.signal(s, _hold)
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        for s, h in old.items():
            signal.signal(s, h)
        held = list(_held)
        _held.clear()
        for signum in held:
            signal.raise_signal(signum)


def held() -> bool:
    """Whether a deferred signal arrived inside the current block (e.g. to stop before a thaw)."""
    return bool(_held)
