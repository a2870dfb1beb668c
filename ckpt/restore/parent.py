"""Which thread of ckpt the restored processes are children of: one that outlives the restore.

The kernel makes a process a child of the *thread* that forked it (real_parent is a task), and a
parent-death signal (PR_SET_PDEATHSIG) is sent when that thread exits, even while other threads of
its process go on (forget_original_parent, kernel/exit.c). A restore, though, runs in a thread that
must end before the process is reported running (resume.py: only a tracer that exits lets a
thread stay inside its syscall). So the restore helper is started from another thread: the one that
called the restore, which serves the restore thread's requests while it waits for it
(`in_tracer_thread` with `serve`), the main thread of `ckpt restore` and `ckpt serve`, the
caller's own thread in the API, as a fork() of its own would be; or, for a restore thread that no
caller waits on (the warm restore's, migrate/warm.py), a thread started once, on first use, that
lives until ckpt's process ends. The restored process (and the helper's own SIGKILL parent-death
signal before it is seized, stub.S) then sees its parent die with that thread, never with the
restore's short-lived one; the restore thread traces it all the same (ptrace needs no parenthood,
and wait() reaches the children and tracees of every thread of ckpt).
"""

from __future__ import annotations

import os
import threading
from _queue import Empty, SimpleQueue
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

from ckpt import sigwake
from ckpt.ptrace import sigchld
from ckpt.restore.handoff import Outcome, run_into
from ckpt.threadpool import start as start_thread

T = TypeVar("T")
Job = tuple[Callable[[], Any], Outcome[Any]] | None
_lock = threading.Lock()
_local = threading.local()  # .jobs: where this thread's as_parent() calls go


class Jobs:
    """The jobs a restore thread hands to its parent thread: a C SimpleQueue (a Ctrl-C in the
    waiting main thread never leaves a lock held) and an eventfd that each put makes readable, so
    that the main thread waits for a job and for a signal in one poll (ckpt/sigwake.py)."""

    def __init__(self, *, wakeable: bool = True) -> None:
        """`wakeable`: served by a thread that may be the main one (else no eventfd: a plain wait)."""
        self._q: SimpleQueue[Job] = SimpleQueue()
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if wakeable else -1
        self._lock = threading.Lock()

    def put(self, job: Job) -> None:
        self._q.put(job)
        with self._lock:  # (a C lock: no Python frame between its acquire and the block)
            if self._efd >= 0:
                os.eventfd_write(self._efd, 1)

    def get(self, wake: sigwake.Wake) -> Job:
        """The next job; a signal's handler runs meanwhile (KeyboardInterrupt raised from here)."""
        if wake.fd < 0 or self._efd < 0:
            return self._q.get()
        while True:
            try:
                return self._q.get_nowait()
            except Empty:
                pass
            # A put after the look above has made the eventfd readable: the poll does not sleep.
            wake.wait_for(self._efd)
            with suppress(BlockingIOError):
                os.eventfd_read(self._efd)

    def close(self) -> None:
        """The eventfd closed (a later put only queues): by the waiter once it is done, even while
        the restore thread, its waiter cut short by a Ctrl-C, may still be inside a put."""
        with self._lock:
            if self._efd >= 0:
                os.close(self._efd)
                self._efd = -1


_longlived: Jobs | None = None


def serve(jobs: Jobs) -> None:
    """Run the jobs put on `jobs` in the calling thread, until a None."""
    wake = sigwake.Wake()
    try:
        wake.arm()
        while True:
            job = jobs.get(wake)
            if job is None:
                return
            fn, out = job
            run_into(out, fn)  # its exception too, handed to the caller
    finally:
        wake.disarm()


def _long_lived() -> Jobs:
    global _longlived
    with _lock:
        if _longlived is None:
            jobs = Jobs(wakeable=False)  # (served by a thread of its own, never the main one)
            # SIGCHLD stays blocked in it (inherited): it must never swallow one a tracer waits for.
            with sigchld.blocked():
                start_thread(threading.Thread(target=serve, args=(jobs,), name="ckpt-parent", daemon=True))
            _longlived = jobs
        return _longlived


def parent_is(jobs: Jobs) -> None:
    """The calling thread's as_parent() calls go to the thread that serve()s `jobs`."""
    _local.jobs = jobs


def as_parent(fn: Callable[[], T]) -> T:
    """fn() run in the thread the calling restore thread's processes are children of (module
    docstring): what it forks is that thread's child. Its result or exception."""
    jobs: Jobs | None = getattr(_local, "jobs", None)
    if jobs is None:
        jobs = _long_lived()
    out: Outcome[T] = Outcome()
    jobs.put((fn, out))
    return out.result()
