"""The thread of ckpt that every restored process is a child of: one that lives as long as ckpt.

The kernel makes a process a child of the *thread* that forked it (real_parent is a task), and a
parent-death signal (PR_SET_PDEATHSIG) is sent when that thread exits, even while other threads of
its process go on (forget_original_parent, kernel/exit.c). A restore, though, runs in a thread that
must end before the process is reported running (resume.py: only a tracer that exits lets a
thread stay inside its syscall). So the restore helper is started from here instead: a thread
started once, on first use, that lives until ckpt's process ends. The restored process (and the
helper's own SIGKILL parent-death signal before it is seized, stub.S) then sees its parent die when
ckpt dies, never when a restore's short-lived thread does; and the thread that restores it traces
it all the same (ptrace needs no parenthood, and wait() reaches the children and tracees of every
thread of ckpt).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ckpt.ptrace import sigchld

T = TypeVar("T")
_lock = threading.Lock()
_jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] | None = None


def _serve(jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
    while True:
        fn, fut = jobs.get()
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to the caller
            fut.set_exception(e)


def _start() -> queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]:
    global _jobs
    with _lock:
        if _jobs is None:
            jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
            # SIGCHLD stays blocked in it (inherited): it must never swallow one a tracer waits for.
            with sigchld.blocked():
                threading.Thread(target=_serve, args=(jobs,), name="ckpt-parent", daemon=True).start()
            _jobs = jobs
        return _jobs


def as_parent(fn: Callable[[], T]) -> T:
    """fn() run in ckpt's parent thread (module docstring): what it forks is that thread's child.
    Its result or exception."""
    fut: Future[T] = Future()
    _start().put((fn, fut))
    return fut.result()
