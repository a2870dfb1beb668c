"""Waking a tracer the moment one of its tracees stops or exits: SIGCHLD read through a signalfd.

The kernel tells a tracer about every tracee stop and exit with a SIGCHLD sent to the tracer's whole
thread group. It goes to some thread that does not block it; with the default action that thread
just drops it, and a waiter elsewhere would never hear of the event. So ckpt keeps SIGCHLD blocked
in every thread of its process while it traces: then the signal stays pending, and a signalfd for
SIGCHLD in the waiting thread becomes readable at once. A poll() on that fd, with the caller's
deadline as its timeout, is the whole wait: no sleeping in slices.

Threads inherit their creator's mask, so blocking SIGCHLD in a thread before it starts others
(``blocked()``, ``blocking``) covers every thread ckpt makes (compression pools, copy threads); the
CLI blocks it before anything starts a thread (numpy's OpenBLAS starts one at import).

A thread ckpt did not make (in a program using the API, or OpenBLAS's when numpy was imported
before ckpt) may take the signal. Frozen checks for such threads (``unblocked_threads()``) and then
waits with ``watch()`` instead: a short-lived thread blocks in waitid(WNOWAIT), which the kernel
wakes on the event itself without any signal and which consumes nothing, plus a pidfd of the
thread for its exit. Slower per wait (a thread start), still woken by the event.
"""

from __future__ import annotations

import _signal
import ctypes
import functools
import os
import select
import signal
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import ParamSpec, TypeVar

from ckpt.cbuf import array_type
from ckpt.threadpool import start as start_thread

_libc = ctypes.CDLL(None, use_errno=True)
_signalfd = _libc.signalfd  # (looked up at import, not in a freeze)
_SIGSET_BYTES = 128  # glibc's sigset_t; the kernel reads only the first 8
_SIGSET = array_type(ctypes.c_ubyte, _SIGSET_BYTES)  # (made at import, not in a freeze: ckpt/cbuf.py)
_SFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
_SIGINFO_BYTES = 128  # struct signalfd_siginfo

_local = threading.local()

P = ParamSpec("P")
R = TypeVar("R")


SIGCHLD_NO = int(signal.SIGCHLD)
_SIGCHLD = {SIGCHLD_NO}


class blocked:
    """SIGCHLD blocked in the calling thread (and so in every thread it starts) for the block.

    A class, and _signal's pthread_sigmask: every wait of a freeze enters one (~26 with 8 threads),
    and signal.pthread_sigmask makes a Signals member of each signal the old mask holds (4.8 us a
    call against 0.6 here), a generator's context manager ~1 us more than this one."""

    __slots__ = ("_was",)

    def __enter__(self) -> None:
        self._was = SIGCHLD_NO in _signal.pthread_sigmask(signal.SIG_BLOCK, _SIGCHLD)

    def __exit__(self, *exc: object) -> None:
        if not self._was:
            _signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGCHLD)


def blocking(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``fn`` inside ``blocked()`` (for entry points that start threads and trace)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with blocked():
            return fn(*args, **kwargs)

    return wrapper


def unblocked_threads() -> list[int]:
    """The threads of this process, other than the caller, that would take a SIGCHLD meant for it."""
    me = threading.get_native_id()
    bit = 1 << (signal.SIGCHLD - 1)
    out = []
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        if tid == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                for ln in f:
                    if ln.startswith("SigBlk:"):
                        if not int(ln.split()[1], 16) & bit:
                            out.append(tid)
                        break
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return sorted(out)


class _ThreadFd:
    """A thread's signalfd, closed when the thread ends: the thread's `threading.local` slot is
    dropped then, and with it this, the slot's only holder (any thread that waits on tracees,
    the warm restore's, a restore's tracer, needs no close call of its own)."""

    __slots__ = ("fd", "poll")
    _close = staticmethod(os.close)  # (at interpreter exit this module's globals may be gone first)

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self._close(fd)

    def __del__(self) -> None:
        try:  # noqa: SIM105 (not contextlib's suppress: a global, maybe gone at exit)
            self.close()
        except OSError:
            pass


def _fd() -> tuple[int, select.poll]:
    """This thread's signalfd for SIGCHLD (made once per thread; signalfds read the caller's queue)."""
    got: _ThreadFd | None = getattr(_local, "sfd", None)
    if got is not None:
        return got.fd, got.poll
    mask = _SIGSET()
    bit = signal.SIGCHLD - 1
    mask[bit // 8] = 1 << (bit % 8)
    fd = _signalfd(-1, mask, _SFD_FLAGS)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"signalfd: {os.strerror(err)}")
    got = _local.sfd = _ThreadFd(fd)
    return got.fd, got.poll


def thread_fd() -> int:
    """This thread's signalfd for SIGCHLD (quickstops.c polls it)."""
    return _fd()[0]


def close_thread_fd() -> None:
    """This thread's signalfd closed now, if it made one (a thread's end closes it too, _ThreadFd)."""
    got: _ThreadFd | None = getattr(_local, "sfd", None)
    if got is not None:
        _local.sfd = None
        got.close()


def wait_event(timeout: float) -> None:
    """Return when a SIGCHLD is pending for this thread (consuming it), or after ``timeout`` seconds.

    SIGCHLD must be blocked in the calling thread: a pending one that arrived before the call (even
    one already looked at) returns at once, so a caller that polls its condition first and then
    waits here never misses an event; at worst it looks once more for nothing.
    """
    fd, p = _fd()
    if p.poll(max(0, int(timeout * 1000 + 0.999))):
        # BlockingIOError: another reader of this thread's queue took it first; the caller looks anyway.
        with suppress(BlockingIOError):
            os.read(fd, _SIGINFO_BYTES * 8)


PIDFD_THREAD = os.O_EXCL  # pidfd_open(2) for a thread, not a process (Linux >= 6.9)
_WALL = 0x40000000


def _watcher(tid: int, wfd: int) -> None:
    """Block until thread ``tid`` has a stop or exit to report (reaping nothing), then say so."""
    try:
        os.waitid(os.P_PID, tid, os.WEXITED | os.WSTOPPED | os.WNOWAIT | _WALL)
    except OSError:
        pass  # not ours (any more): the caller's own waitpid finds out
    finally:
        with suppress(OSError):
            os.write(wfd, b"x")  # the reader may be gone (it timed out): nothing to tell then
        os.close(wfd)


def watch(tid: int, timeout: float) -> None:
    """Like wait_event(), for when another thread of ours may swallow SIGCHLD: return when ``tid``
    has something for waitpid, when it exits, or after ``timeout`` seconds.

    A watcher left blocked by a timeout stays harmless: WNOWAIT never takes a report away from the
    real wait, and it ends at the thread's next stop or exit (or with this process).
    """
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pidfd = -1
    try:
        with suppress(OSError):
            pidfd = os.pidfd_open(tid, PIDFD_THREAD)
        start_thread(threading.Thread(target=_watcher, args=(tid, wfd), daemon=True, name="ckpt-waitid"))
        p = select.poll()
        p.register(rfd, select.POLLIN)
        if pidfd >= 0:
            p.register(pidfd, select.POLLIN)
        p.poll(max(0, int(timeout * 1000 + 0.999)))
    finally:
        os.close(rfd)
        if pidfd >= 0:
            os.close(pidfd)
