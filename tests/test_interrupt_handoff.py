"""A Ctrl-C in the main thread while it hands work to another thread, or takes a result from it,
leaves nothing held that the other thread needs: the Latch, the pool's submit and result, an
Outcome, the warm restore's hand-offs (ckpt/threadpool.py, Latch's docstring).

Each call is run again and again with a real SIGINT (signal.raise_signal: Python's handler raises
KeyboardInterrupt right there) as the 1st, 2nd, ... function called inside it returns, then as
the call itself returns: a return is where a signal lands with a lock just taken (a Python
__enter__ that acquired it). After each, what the other side does next must finish: done in a
thread of its own, whose end is waited for (a lock left held blocks it for ever).
`ckpt serve` hung after a Ctrl-C so (threading.Condition.__enter__ in queue.Queue.put)."""

from __future__ import annotations

import gc
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from ckpt.migrate.boost import Boost
from ckpt.migrate.warm import WarmRestore
from ckpt.restore.handoff import Outcome, in_thread
from ckpt.threadpool import Latch, Task, ThreadPool

# Weak references' callbacks, run by the garbage collector wherever it runs: no step of the call,
# and a KeyboardInterrupt raised there is only printed ("Exception ignored").
GC_CALLBACKS = ("_weakrefset.py", "weakref.py")
DEADLINE = 30.0  # s for the other side's step: it takes microseconds, or never ends


def _gc_callback(frame: FrameType) -> bool:
    """A function of gc.callbacks (hypothesis registers one to time collections), which the
    collector calls wherever it runs, as it does weak references' callbacks."""
    return any(getattr(cb, "__code__", None) is frame.f_code for cb in gc.callbacks)


def _interrupted_at(k: int, call: Callable[[], object]) -> str:
    """call() with a SIGINT as the k-th function inside it returns (or, past its last, as call
    itself returns): where it came ("inner NAME" or "end")."""
    state: dict[str, Any] = {"top": None, "returns": 0, "where": ""}

    def fire(where: str) -> None:
        state["where"] = where
        sys.settrace(None)
        signal.raise_signal(signal.SIGINT)

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if state["where"]:
            return None
        if event == "return":
            if frame is state["top"]:
                fire("end")
            elif not frame.f_code.co_filename.endswith(GC_CALLBACKS) and not _gc_callback(frame):
                state["returns"] += 1
                if state["returns"] == k:
                    fire(f"inner {frame.f_code.co_qualname}")
        return local

    def glob(frame: FrameType, event: str, arg: object) -> Any:
        if state["where"]:
            return None
        if state["top"] is None:
            state["top"] = frame  # (the wrapper below: the call and all it calls)
        return local

    def wrapper() -> None:
        call()

    old = sys.gettrace()
    sys.settrace(glob)
    try:
        wrapper()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(old)
    assert state["where"], f"no SIGINT came at {k}"
    return str(state["where"])


def _finishes(step: Callable[[], object], what: str) -> None:
    """step() in another thread ends (it would block for ever on a lock the main thread kept)."""
    t = threading.Thread(target=step, name="handoff-other-side", daemon=True)
    t.start()
    t.join(DEADLINE)
    assert not t.is_alive(), f"{what}: the other thread's step never ended"


def _sweep(setup: Callable[[], Any], call: Callable[[Any], object], after: Callable[[Any], object]) -> int:
    """For k = 1, 2, ...: setup(), call() interrupted at k, then after() must finish; how many."""
    assert threading.current_thread() is threading.main_thread()  # (where Python runs handlers)
    k = 1
    while True:
        ctx = setup()
        where = _interrupted_at(k, lambda c=ctx: call(c))
        _finishes(lambda c=ctx: after(c), f"Ctrl-C at {where} (k={k})")
        if where == "end":
            return k
        k += 1


def test_latch() -> None:
    def set_and_wait(latch: Latch) -> None:
        latch.set()
        assert latch.wait() and latch.wait(0) and latch.is_set()

    assert _sweep(Latch, lambda latch: latch.set(), set_and_wait) >= 1

    def done() -> Latch:
        latch = Latch()
        latch.set()
        return latch

    _sweep(done, lambda latch: latch.wait(), set_and_wait)
    _sweep(done, lambda latch: latch.wait(5.0), set_and_wait)
    fresh = Latch()
    assert not fresh.wait(0) and not fresh.is_set()


def test_task_result_and_submit() -> None:
    def finished_task() -> tuple[ThreadPool, Task[int]]:
        pool = ThreadPool(1, "tp-intr")
        task = pool.submit(int, "7")
        assert task.result() == 7
        return pool, task

    def other_side(ctx: tuple[ThreadPool, Task[int]]) -> None:
        pool, task = ctx
        assert task.result() == 7  # (e.g. the writer's abort, in another order)
        pool.shutdown(wait=True, cancel_futures=True)

    _sweep(finished_task, lambda ctx: ctx[1].result(), other_side)

    def pool_with_worker() -> tuple[ThreadPool, Task[int]]:
        pool = ThreadPool(2, "tp-intr")
        first = pool.submit(int, "1")
        assert first.result() == 1  # a worker idle: the next submit hands it the task
        return pool, first

    def submit(ctx: tuple[ThreadPool, Task[int]]) -> None:
        ctx[0].submit(int, "2")

    def shutdown(ctx: tuple[ThreadPool, Task[int]]) -> None:
        ctx[0].submit(int, "3").result()  # the workers still take tasks ...
        ctx[0].shutdown(wait=True)  # ... and end

    _sweep(pool_with_worker, submit, shutdown)
    assert not any(t.name.startswith("tp-intr") for t in threading.enumerate())


def test_outcome() -> None:
    def started() -> Outcome[int]:
        out = in_thread(lambda: 5, "handoff-intr")
        assert out.result() == 5
        return out

    _sweep(started, lambda out: out.result(), lambda out: out.result())

    def unset() -> Outcome[int]:
        return Outcome()

    _sweep(unset, lambda out: out.set_result(1), lambda out: (out.set_result(1), out.result()))


@pytest.mark.parametrize("op", ["drain", "join_boost", "chunk"])
def test_warm_restore_handoff(op: str) -> None:
    """The receiving thread's steps with the warm restore's thread (no helper is built: no round)."""
    boost = Boost()

    def call(w: WarmRestore) -> None:
        if op == "drain":
            assert w.drain() is False
        elif op == "join_boost":
            w.join_boost(boost)
        else:
            assert w.chunk(None) is False  # type: ignore[arg-type]  # (no helper yet: not taken)

    def close(w: WarmRestore) -> None:
        w.close()
        assert not w._thread.is_alive()

    assert _sweep(WarmRestore, call, close) >= 1
    assert not any(t.name == "ckpt-warm-restore" for t in threading.enumerate())
