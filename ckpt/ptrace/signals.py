"""Holding off Ctrl-C (and SIGTERM/SIGHUP/SIGQUIT) while a target is stopped or patched.

A KeyboardInterrupt raised between two ptrace calls could leave a thread with injected registers, a
patched instruction, or half the threads detached. Inside ``deferred_signals()`` those signals are
only recorded; when the outermost block ends, the previous handlers are put back and each recorded
signal is raised again, so SIGINT becomes KeyboardInterrupt and SIGTERM takes its usual action, after
the target is whole again. Blocks nest: only the outermost one re-raises.

Python handles signals in the main thread only; elsewhere the block does nothing (the signals would
not interrupt that thread anyway). That thread may be waiting in a join while another does the work
(a dump's freezing thread): a signal the kernel gave to that other thread runs no Python handler
until the join returns. So the block also sets the wakeup fd (signal.set_wakeup_fd), which the C
handler writes the signal's number to at once, in whatever thread: held() reads it, and a Ctrl-C
is seen in every thread as soon as it comes (a `dump --kill` stops before the kill).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from types import FrameType

DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

_depth = 0
_held: list[int] = []
_wake = [-1]  # the read end of the outermost block's wakeup pipe, or -1
_wake_lock = threading.Lock()
# Other signals' numbers read from the block's wakeup fd: written to the wakeup fd set before the
# block as it ends, as if that one had been set all along (`ckpt service` polls its own).
_passed: list[int] = []


def _hold(signum: int, frame: FrameType | None) -> None:
    if signum not in _held:
        _held.append(signum)


_ELSEWHERE = nullcontext()


def deferred_signals() -> AbstractContextManager[None]:
    """The block (module docstring); in any thread but the main one, nothing (a freeze's thread
    enters ~10 a freeze: no generator made for them)."""
    if threading.current_thread() is not threading.main_thread():
        return _ELSEWHERE
    return _deferred_here()


@contextmanager
def _deferred_here() -> Iterator[None]:
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    # The pipe first: out of fds (EMFILE) must not leave _hold installed with nothing to undo it.
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        r = w = -1
    old_wake = -1
    if r >= 0:
        try:
            old_wake = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(r)
            os.close(w)
            r = w = old_wake = -1
    # A handler installed from C (getsignal() is None) cannot be put back from Python: leave it alone.
    old = {s: h for s in DEFERRED if (h := signal.getsignal(s)) is not None}
    for s in old:
        signal.signal(s, _hold)
    with _wake_lock:
        _wake[0] = r
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        if r >= 0:
            try:
                signal.set_wakeup_fd(old_wake)
            except (ValueError, OSError):  # (its owner closed it meanwhile: none, not ours closed)
                signal.set_wakeup_fd(-1)
            with _wake_lock:  # no _drain() of another thread reads r once it is closed (and reused)
                _drain_locked()
                _wake[0] = -1
                os.close(r)
                os.close(w)
                passed = bytes(_passed)
                _passed.clear()
            if passed and old_wake >= 0:
                with suppress(OSError):
                    os.write(old_wake, passed)
        for s, h in old.items():
            signal.signal(s, h)
        held = list(_held)
        _held.clear()
        for signum in held:
            signal.raise_signal(signum)


def _drain() -> None:
    """The signals the wakeup fd has seen, into _held (their Python handler may not have run yet)."""
    with _wake_lock:
        _drain_locked()


def _drain_locked() -> None:
    r = _wake[0]
    if r < 0:
        return
    try:
        data = os.read(r, 256)
    except OSError:  # (BlockingIOError: none)
        return
    for signum in data:
        if signum in DEFERRED:
            if signum not in _held:
                _held.append(signum)
        else:
            _passed.append(signum)  # (not held: its handler runs as usual; its byte is passed on)


def held() -> bool:
    """Whether a deferred signal arrived inside the current block (e.g. to stop before a thaw), in
    any thread: also one whose Python handler the main thread has not run yet."""
    if not _held:
        _drain()
    return bool(_held)
