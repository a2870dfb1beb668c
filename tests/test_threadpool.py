"""ckpt/threadpool.py: the writer's pool without concurrent.futures. Results in submission order,
exceptions raised at result(), at most `workers` threads with ThreadPoolExecutor's names, an idle
worker reused rather than another started, shutdown(cancel_futures) cancels what had not started
and leaves no thread behind, and the workers inherit the submitter's signal mask."""

from __future__ import annotations

import signal
import threading

import pytest

from ckpt.threadpool import CancelledError, Task, ThreadPool


def test_results_in_order_and_exceptions_at_result() -> None:
    with ThreadPool(2, "tp-order") as pool:
        tasks = [pool.submit(pow, i, 2) for i in range(50)]
        bad = pool.submit(int, "x")
        assert [t.result() for t in tasks] == [i * i for i in range(50)]
        with pytest.raises(ValueError, match="invalid literal"):
            bad.result()
    done = Task.done(int, "y")
    with pytest.raises(ValueError):
        done.result()
    assert Task.done(int, "7").result() == 7
    assert not done.cancel()  # (finished: too late)


def test_bounded_named_and_idle_workers_reused() -> None:
    names: set[str] = set()
    gate = threading.Event()

    def held() -> None:
        names.add(threading.current_thread().name)
        gate.wait(60)

    pool = ThreadPool(2, "tp-bound")
    tasks = [pool.submit(held) for _ in range(5)]
    gate.set()
    for t in tasks:
        t.result()
    assert names == {"tp-bound_0", "tp-bound_1"}
    pool.shutdown()
    assert not any(t.name.startswith("tp-bound") for t in threading.enumerate())

    one = ThreadPool(4, "tp-idle")
    for _ in range(3):
        one.submit(int).result()  # each waits for the last: an idle worker takes the next
    assert len(one._threads) == 1
    one.shutdown()
    with pytest.raises(RuntimeError):
        one.submit(int)


def test_shutdown_cancels_what_has_not_started() -> None:
    started, gate = threading.Event(), threading.Event()

    def first() -> int:
        started.set()
        gate.wait(60)
        return 1

    pool = ThreadPool(1, "tp-cancel")
    running = pool.submit(first)
    started.wait(60)
    queued = [pool.submit(int, "5") for _ in range(3)]
    assert not running.cancel()  # it runs
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()  # `first` ends only once the rest are cancelled
    pool.shutdown(wait=True)
    assert running.result() == 1
    for t in queued:
        with pytest.raises(CancelledError):
            t.result()
    assert not any(t.name.startswith("tp-cancel") for t in threading.enumerate())


def test_workers_inherit_the_signal_mask() -> None:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        with ThreadPool(1, "tp-mask") as pool:
            mask = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, set()).result()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert signal.SIGCHLD in mask
