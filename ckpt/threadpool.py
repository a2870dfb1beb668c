"""A fixed pool of worker threads: what ckpt's layer writer takes from concurrent.futures'
ThreadPoolExecutor (submit, result, cancel, shutdown), without importing it.

concurrent.futures imports logging, and logging traceback, tokenize, linecache, string, textwrap
and weakref: ~30 M instructions, ~9% of the start of every `ckpt dump`, for a pool that compresses
one chunk of a small process. The policy is ThreadPoolExecutor's: a new worker per submit while
none is idle, up to `workers`; tasks run in submission order; shutdown(cancel_futures=True) cancels
what has not started; the workers, started by the submitting thread, inherit its signal mask
(ptrace/sigchld.py blocks SIGCHLD in every thread of ckpt). They are daemon threads: a pool that
was never shut down does not hold up the interpreter's exit (ThreadPoolExecutor's would finish
its queued work first, for nobody: every caller of ckpt waits for its results, or drops them).

A task's end is a `Latch`, not a threading.Event: a Ctrl-C in a waiting main thread must not leave
a lock held that the worker then needs to say it is done (Latch's docstring).
"""

from __future__ import annotations

import os
import threading
from _queue import Empty, SimpleQueue
from _thread import allocate_lock, get_ident
from collections.abc import Callable
from typing import Any, Generic, TypeVar

# (At the top, not where used: an import inside a wait or a thread's start would be one more place
# for a Ctrl-C to be lost, in the import lock's weakref callback.)
from ckpt import sigwake
from ckpt.ptrace.signals import deferred_signals

T = TypeVar("T")
_PENDING, _RUNNING, _DONE, _CANCELLED = range(4)


class Latch:
    """Set once, waited for by any thread: threading.Event without its Condition.

    threading.Event, queue.Queue and concurrent.futures.Future take the lock of a Condition in
    Python code (Condition.__enter__, 3.11): the main thread may run a signal handler right after
    that lock was taken and before the `with` holds it, and a Ctrl-C's KeyboardInterrupt there
    leaves the lock held for ever. The other thread's next set(), put() or set_result() then
    blocks on it, and the cleanup that joins that thread never returns (`ckpt serve` hung so
    after a Ctrl-C, tests/test_interrupts.py). Here each step is one C call on a _thread lock:
    `with lock:` takes a C lock's __enter__ in one instruction, with no Python frame and no signal
    check between the acquire and the block, so a Ctrl-C lands before the lock is taken or after
    it is given back, never in between. The flag answers every wait once set, even if a timed
    wait was interrupted between its acquire and its release.

    The main thread's untimed wait is a poll, not a lock: a signal's Python handler (a Ctrl-C's
    KeyboardInterrupt) runs only in the main thread, and a main thread asleep in a lock wakes only
    for a signal the kernel gives to it. Given to a worker instead, or taken by the main thread a
    moment before its futex wait, the Ctrl-C would wait for the latch (a whole chunk sent at
    `--bandwidth 500KB/s`, a destination's answer). So the main thread polls an eventfd that set()
    writes beside the wakeup fd a signal makes readable (ckpt/sigwake.py), made only when it has to
    sleep (~10 us: a few per dump)."""

    __slots__ = ("_efd", "_flag", "_gate", "_once")

    def __init__(self) -> None:
        self._flag = False
        self._gate = allocate_lock()  # held until set()
        self._gate.acquire()
        self._once = allocate_lock()  # two setters: one release of the gate
        self._efd = -1  # a main thread's poll waits on it; written by set() under _once

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._once:
            if not self._flag:
                self._flag = True
                self._gate.release()
                if self._efd >= 0:
                    os.eventfd_write(self._efd, 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Until set() (or `timeout` seconds): whether it is set."""
        if self._flag:
            return True
        if timeout is None:
            if get_ident() == threading.main_thread().ident and self._poll():
                return True
            with self._gate:  # (taken once set() gave it back, and given back at once)
                pass
            return True
        if self._gate.acquire(True, max(timeout, 0.0)):
            self._gate.release()
        return self._flag

    def _poll(self) -> bool:
        """(main thread) Until set(), woken by a signal too: whether it waited (False: no wakeup
        fd may be set here; the lock's wait then)."""
        wake = sigwake.Wake()
        efd = -1
        try:
            if not wake.arm():
                return False
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            # Closed only once set() can no longer see it: a Ctrl-C before the clearing leaves it
            # open (a leak, never a write by set() into a reused descriptor).
            with self._once:
                if self._flag:
                    return True
                self._efd = efd
            while not self._flag:
                wake.wait_for(efd)
        finally:
            if efd >= 0:
                with self._once:
                    self._efd = -1
                os.close(efd)
            wake.disarm()
        return True


def start(thread: threading.Thread) -> None:
    """thread.start(), a Ctrl-C (SIGTERM, SIGHUP, SIGQUIT) meanwhile held until it has returned.

    Thread.start() waits until the new thread runs, on a threading.Event: a Condition, Python code.
    A KeyboardInterrupt raised inside its wait (Condition._release_save: tests/sigint_at.py) leaves
    that Condition broken, and the caller's cleanup then fails with "release unlocked lock" (`ckpt
    verify`: an internal error instead of "interrupted"; tests/test_verify_interrupt.py), the new
    thread stranded (a non-daemon one holding up the exit). Held (ptrace/signals.py), the signal is
    raised once start() has returned and the caller knows of the thread; ~30 us, once a thread."""
    with deferred_signals():
        thread.start()


class CancelledError(Exception):
    """result() of a task cancelled before it ran."""


class Task(Generic[T]):
    """One call's result or exception, set once (by a worker, or at once by done()), waited for by
    result()."""

    def __init__(self, fn: Callable[..., T] | None = None, args: tuple[Any, ...] = ()) -> None:
        self._fn, self._args = fn, args
        self._state = _PENDING
        self._lock = threading.Lock()
        self._set = Latch()
        self._value: T | None = None
        self._error: BaseException | None = None

    @classmethod
    def done(cls, fn: Callable[..., T], *args: Any) -> Task[T]:
        """fn(*args) run here, now: a task already finished (its exception kept for result())."""
        t: Task[T] = cls()
        try:
            t._value = fn(*args)
        except Exception as e:  # (raised where a worker's would be: at result())
            t._error = e
        t._state = _DONE
        t._set.set()
        return t

    def cancel(self) -> bool:
        """Cancel it unless it started: whether it is cancelled."""
        with self._lock:
            if self._state == _PENDING:
                self._state = _CANCELLED
                self._error = CancelledError()
                self._set.set()
            return self._state == _CANCELLED

    def run(self) -> None:
        with self._lock:
            if self._state != _PENDING:
                return
            self._state = _RUNNING
        assert self._fn is not None
        try:
            self._value = self._fn(*self._args)
        except BaseException as e:  # handed to the waiter
            self._error = e
        self._fn = self._args = None  # type: ignore[assignment]  # (let go of the arguments' buffers)
        self._state = _DONE
        self._set.set()

    def result(self) -> T:
        """Once it is done: the value, or the exception raised again."""
        self._set.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class ThreadPool:
    """Up to `workers` threads named `name`_0, `name`_1, ... (as ThreadPoolExecutor names them)."""

    def __init__(self, workers: int, name: str) -> None:
        if workers <= 0:
            raise ValueError("workers must be greater than 0")
        self._workers = workers
        self._name = name
        self._queue: SimpleQueue[Task[Any] | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        # A token per worker that finished a task and waits for the next. Not threading.Semaphore:
        # its Condition is Python code, where a Ctrl-C in submit() could leave its lock taken and
        # every worker's next release() waiting for ever (Latch's docstring).
        self._idle: SimpleQueue[None] = SimpleQueue()
        self._lock = threading.Lock()
        self._shut = False

    def submit(self, fn: Callable[..., T], *args: Any) -> Task[T]:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            task: Task[T] = Task(fn, args)
            self._queue.put(task)
            if not self._idle_taken() and len(self._threads) < self._workers:
                t = threading.Thread(
                    target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                with deferred_signals():
                    t.start()
                    self._threads.append(t)
        return task

    def _idle_taken(self) -> bool:
        """An idle worker's token taken (it will take the task just queued), or False: none idle."""
        try:
            self._idle.get_nowait()
        except Empty:
            return False
        return True

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                self._queue.put(None)  # (wakes the next worker to its end too)
                return
            task.run()
            del task
            self._idle.put(None)

    def __enter__(self) -> ThreadPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            if cancel_futures:
                while True:
                    try:
                        task = self._queue.get_nowait()
                    except Empty:
                        break
                    if task is not None:
                        task.cancel()
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()
