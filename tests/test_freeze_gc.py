"""No garbage collection inside a freeze (ckpt/ptrace/gcpause.py, issue 9 part 2).

Python's collector runs when allocations cross its thresholds, wherever that happens: inside a
freeze it lengthened the target's stop by 0.2-0.9 ms a time. Frozen pauses it from freeze to the
end of the freeze, whichever way it ends, and overlapping freezes give it back only at the last end.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.dump import dump
from ckpt.ptrace import Frozen, gcpause
from tests.util import Target

Spawn = Callable[..., Target]


@pytest.fixture
def gc_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    assert gcpause.paused() == 0  # every test below ends every freeze it began
    if not was:
        gc.disable()


def test_collector_off_while_frozen_and_back_after_thaw(spawn: Spawn, gc_on: None) -> None:
    t = spawn("sigstate")
    fz = Frozen(t.pid)
    fz.prepare()
    assert not gc.isenabled()  # paused by prepare(), before the freeze's clock starts
    fz.freeze()
    try:
        assert not gc.isenabled()
    finally:
        fz.thaw()
    assert gc.isenabled()
    fz.thaw()  # idempotent: no second resume
    assert gc.isenabled() and gcpause.paused() == 0
    assert t.cmd("ping") == "pong"


def test_prepared_never_frozen_leaves_collector_alone(spawn: Spawn, gc_on: None) -> None:
    t = spawn("sigstate")
    fz = Frozen(t.pid)
    fz.prepare()
    fz.thaw()  # (a prepared-only process's thaw: the pause given back)
    assert gc.isenabled() and gcpause.paused() == 0


def test_overlapping_freezes_resume_at_the_last_end(spawn: Spawn, gc_on: None) -> None:
    a, b = spawn("sigstate"), spawn("sigstate")
    fa, fb = Frozen(a.pid), Frozen(b.pid)
    fa.freeze()
    fb.freeze()
    try:
        fa.thaw()
        assert not gc.isenabled()  # b is still frozen
    finally:
        fa.thaw()
        fb.thaw()
    assert gc.isenabled()
    assert a.cmd("ping") == "pong" and b.cmd("ping") == "pong"


def test_kill_ends_the_pause(spawn: Spawn, gc_on: None) -> None:
    t = spawn("sigstate")
    fz = Frozen(t.pid)
    fz.freeze()
    fz.kill()
    assert gc.isenabled() and gcpause.paused() == 0
    t.proc.wait(10)


def test_a_collector_the_caller_disabled_stays_disabled(spawn: Spawn, gc_on: None) -> None:
    t = spawn("sigstate")
    gc.disable()
    try:
        with Frozen(t.pid):
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_no_collection_runs_inside_a_dumps_freezes(spawn: Spawn, tmp_path: Path, gc_on: None) -> None:
    """With the thresholds at their lowest, collections run at nearly every allocation: none of
    them may start while a freeze of the full or the incremental dump is open."""
    t = spawn("memtarget", "64")
    before = t.sum()
    inside: list[int] = []
    outside: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            (inside if gcpause.paused() else outside).append(info["generation"])

    old = gc.get_threshold()
    gc.callbacks.append(seen)
    gc.set_threshold(1, 1, 1)
    try:
        dump(t.pid, tmp_path, track="uffd-wp")
        assert t.cmd("write 3") == "ok"
        dump(t.pid, tmp_path, incremental=True, track="uffd-wp")
    finally:
        gc.set_threshold(*old)
        gc.callbacks.remove(seen)
    assert inside == []
    assert outside  # the thresholds did make it collect, out of the freezes
    assert t.sum() != before  # the target runs on, as it was
