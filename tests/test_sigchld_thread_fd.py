"""A thread that waits on tracees makes its own SIGCHLD signalfd (ckpt/ptrace/sigchld.py); the fd
is closed when the thread ends, without a call of its own (issue 12: the warm restore's thread and
other waiters leaked one each). Real threads, a real tracee, the process's fd table counted."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable

from ckpt.ptrace import raw, sigchld

N = 24


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _signalfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[signalfd]"
        except OSError:
            continue  # (the listing's own fd)
    return n


def _run(n: int, body: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            body()
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    with sigchld.blocked():  # (inherited: as every thread ckpt starts to trace)
        threads = [threading.Thread(target=target) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_threads_that_waited_leave_no_signalfd() -> None:
    """N threads, each waits once for a SIGCHLD (its signalfd made), then ends: none is left open."""
    before, sfds = _fds(), _signalfds()

    def waiter() -> None:
        sigchld.wait_event(0)
        assert sigchld._local.sfd is not None  # (it made one)

    _run(N, waiter)
    assert _fds() == before and _signalfds() == sfds


def test_threads_that_traced_leave_no_signalfd() -> None:
    """N threads one after the other each seize a real process, wait for its stop through the
    signalfd and let it go: the fd table after is the one before."""
    child = subprocess.Popen(["sleep", "300"])
    try:
        before = _fds()

        def tracer() -> None:
            raw.seize(child.pid)
            raw.interrupt(child.pid)
            w = raw.wait(child.pid, 30, shared=False)
            assert w is not None and w.stopped, w
            raw.detach(child.pid, 0)

        for _ in range(N):
            _run(1, tracer)  # (one tracer at a time: a tracee has one)
        assert _fds() == before
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_closed_early_is_not_closed_again() -> None:
    """A thread that closed its fd itself (close_thread_fd), whose number then names another file:
    its end closes nothing."""
    kept: list[int] = []

    def body() -> None:
        sigchld.wait_event(0)
        fd = sigchld._local.sfd.fd
        sigchld.close_thread_fd()
        r, w = os.pipe()
        if fd not in (r, w):
            os.dup2(r, fd)  # its number in use again, by another file
        kept.extend({r, w, fd})

    _run(1, body)
    try:
        for fd in kept:
            os.fstat(fd)  # still open
    finally:
        for fd in kept:
            os.close(fd)
