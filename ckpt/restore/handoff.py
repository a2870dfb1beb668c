"""A result handed from one thread of a restore to another, and a function run in a thread of its own.

The part of concurrent.futures that a restore's start needs (parent.py's forks, helperstart.py's
plan) without importing it: concurrent.futures imports logging (and traceback, string, textwrap),
~6 ms of every `ckpt restore`'s start here, for two results passed between threads. The fill
still uses its thread pool where it has chunks to decompress (restore/memory.py). Set and waited
for through a Latch (ckpt/threadpool.py): a Ctrl-C in the waiting main thread never leaves a lock
that the setting thread needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from ckpt.threadpool import Latch
from ckpt.threadpool import start as start_thread

T = TypeVar("T")


class Outcome(Generic[T]):
    """What a function returned or raised, set once by one thread and waited for by another."""

    def __init__(self, thread: threading.Thread | None = None) -> None:
        self._done = Latch()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = thread  # in_thread's: joined by the waiter, so that none is left behind

    def set_result(self, value: T) -> None:
        self._value = value
        self._done.set()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def exception(self) -> BaseException | None:
        """Once it is set: what was raised, or None."""
        self._done.wait()
        if self._thread is not None:
            self._thread.join()
        return self._error

    def result(self) -> T:
        """Once it is set: the value, or the exception raised again."""
        err = self.exception()
        if err is not None:
            raise err
        return self._value  # type: ignore[return-value]


def run_into(out: Outcome[T], fn: Callable[[], T]) -> None:
    """fn()'s result or exception into `out`."""
    try:
        value = fn()
    except BaseException as e:  # handed to the waiter
        out.set_exception(e)
        return
    out.set_result(value)


def in_thread(fn: Callable[[], T], name: str) -> Outcome[T]:
    """fn() started in a new thread (which inherits the caller's signal mask: SIGCHLD stays blocked,
    ptrace/sigchld.py); its Outcome, whose waiter also joins the thread."""
    holder: list[Outcome[T]] = []
    t = threading.Thread(target=lambda: run_into(holder[0], fn), name=name)
    holder.append(Outcome(t))
    start_thread(t)
    return holder[0]
