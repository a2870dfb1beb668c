"""An injected mmap whose waits give up after it ran (ckpt/ptrace/lostmap.py): the mapping it made is
unmapped, not leaked into the target, whichever way the call was injected and wherever the thread
was when the injection failed: stopped at the call's end (the two-stop way, whose re-stop finds the
syscall-exit stop), or left running (the one-stop way reported "stuck": the thaw stops it, takes off
its SIGTRAP and unmaps). The waits give up by the test's waiter once the thread's stop after the call
is reported (so the mmap surely ran), never by a timeout."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from ckpt.errors import InjectionError
from ckpt.ptrace import Frozen, inject, raw
from tests.util import Target

# Their stand-in waits (Frozen._wait) play the stops out: all of them through Python.
pytestmark = pytest.mark.usefixtures("python_stops")

Spawn = Callable[..., Target]
ROUNDS = 25
SIZE = 8192


def _maps(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return f.read().splitlines()


def _reported(tid: int) -> None:
    os.waitid(os.P_PID, tid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)


def _signals(pid: int) -> dict[int, tuple[str, ...]]:
    keys = ("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd")
    out = {}
    for t in sorted(map(int, os.listdir(f"/proc/{pid}/task"))):
        with open(f"/proc/{pid}/task/{t}/status") as f:
            st = {k: v.strip() for k, _, v in (ln.partition(":") for ln in f)}
        out[t] = tuple(st[k] for k in keys)
    return out


def _new(before: list[str], now: list[str]) -> list[str]:
    return [ln for ln in now if ln not in before]


@pytest.mark.parametrize("mode", ["dfl", "handler"])
def test_a_stuck_step_of_an_mmap_is_unmapped_at_thaw(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The one-stop way: the step's wait gives up once the step's SIGTRAP stop is reported (the
    mmap ran), the re-stop's at once: "stuck", the thread left running as far as Frozen knows. The
    mapping is there while frozen, and gone after the thaw; the target never sees the SIGTRAP."""
    t = spawn("traps", mode)
    before, maps = _signals(t.pid), _maps(t.pid)
    real = Frozen._wait
    armed = {"left": 0}

    def wait(self: Frozen, tid: int, timeout: float) -> raw.WaitResult | None:
        if armed["left"]:
            armed["left"] -= 1
            if armed["left"]:
                _reported(tid)
            return None
        return real(self, tid, timeout)

    def refuse(*a: object, **k: object) -> int:
        raise AssertionError("step_syscall taken, step_over_syscall expected")

    monkeypatch.setattr(Frozen, "_wait", wait)
    monkeypatch.setattr(inject, "step_syscall", refuse)
    for i in range(ROUNDS):
        with Frozen(t.pid) as f:
            if i % 2:  # one made before: the thaw's munmap of it needs the thread stopped again first
                f.mmap_scratch(SIZE, inject.PROT_READ | inject.PROT_EXEC)
            armed["left"] = 2
            with pytest.raises(InjectionError, match="stuck"):
                f.mmap_scratch(SIZE)
            armed["left"] = 0
            made = _new(maps, _maps(t.pid))
            assert len(made) == 1 + i % 2 and "rw-p" in {ln.split()[1] for ln in made}, made  # it ran
        assert _maps(t.pid) == maps
    assert t.cmd("count") == "trap 0 code 0 early 0"
    assert _signals(t.pid) == before


def test_an_mmap_whose_exit_wait_gives_up_is_unmapped(spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-stop way (SIGTRAP blocked in the thread): the wait for the syscall-exit stop gives up
    once that stop is reported; the re-stop finds it, and the injection fails with a timeout though
    the call ran. The mapping is a scratch mapping from then on: left out by a dump, unmapped by the
    thaw."""
    t = spawn("traps", "block")
    before, maps = _signals(t.pid), _maps(t.pid)
    real = Frozen._wait
    armed = {"n": 0}

    def wait(self: Frozen, tid: int, timeout: float) -> raw.WaitResult | None:
        if armed["n"]:
            armed["n"] += 1
            if armed["n"] == 3:  # the second stop of the call: its exit
                armed["n"] = 0
                _reported(tid)
                return None
        return real(self, tid, timeout)

    def refuse(*a: object, **k: object) -> int:
        raise AssertionError("step_over_syscall taken, step_syscall expected")

    monkeypatch.setattr(Frozen, "_wait", wait)
    monkeypatch.setattr(inject, "step_over_syscall", refuse)
    for i in range(ROUNDS):
        with Frozen(t.pid) as f:
            armed["n"] = 1
            with pytest.raises(inject.InjectionTimeout):
                f.mmap_scratch(SIZE)
            made = _new(maps, _maps(t.pid))
            assert len(made) == 1, made
            start = int(made[0].split("-")[0], 16)
            assert f.scratch_maps == [(start, SIZE)]
            if i % 2:  # a dump releases the code before its page-table walks: this one goes too
                f.release_code()
                assert f.scratch_maps == [] and _maps(t.pid) == maps
        assert _maps(t.pid) == maps
    assert t.cmd("count") == "trap 0 code 0 early 0"
    assert _signals(t.pid) == before
