"""A single-step injection whose wait gives up (inject.step_over_syscall's timeout): the SIGTRAP the
kernel forces at the syscall's exit is the step's own, reported just after the deadline or still
queued behind the interrupt-stop. It is never held nor left queued (given to the target at thaw,
SIG_DFL would kill it); the mmap that ran after all is returned, so it is undone, not leaked."""

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
ROUNDS = 100


def _signals(pid: int) -> dict[int, tuple[str, ...]]:
    keys = ("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd")
    out = {}
    for t in sorted(map(int, os.listdir(f"/proc/{pid}/task"))):
        with open(f"/proc/{pid}/task/{t}/status") as f:
            st = {k: v.strip() for k, _, v in (ln.partition(":") for ln in f)}
        out[t] = tuple(st[k] for k in keys)
    return out


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _reported(tid: int) -> None:
    """Until the thread's next stop (or exit) is reported, left unconsumed (WNOWAIT): the waiter
    then says "nothing yet", as a wait whose deadline passed just before the report came."""
    os.waitid(os.P_PID, tid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("mode", ["dfl", "handler"])
def test_a_step_whose_wait_gives_up_leaves_the_target_as_it_was(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch, mode: str, late: bool
) -> None:
    """The step's first wait says "nothing yet" (the test's waiter): at once, whatever the thread
    is doing (before the syscall, in it, at its trap), or, `late`, once its trap's stop is reported.
    Each round's mmap either returns (recovered from the late stop) or fails with InjectionTimeout
    having run nothing; the target is not killed, its handler never runs, its signal state and
    mappings are as before."""
    t = spawn("traps", mode)
    before, maps = _signals(t.pid), _maps(t.pid)
    real = Frozen._wait
    armed = {"on": False}

    def wait(self: Frozen, tid: int, timeout: float) -> raw.WaitResult | None:
        if armed["on"]:
            armed["on"] = False
            if late:
                _reported(tid)
            return None
        return real(self, tid, timeout)

    def refuse(*a: object, **k: object) -> int:
        raise AssertionError("step_syscall taken, step_over_syscall expected")

    monkeypatch.setattr(Frozen, "_wait", wait)
    monkeypatch.setattr(inject, "step_syscall", refuse)
    recovered = timed_out = 0
    for _ in range(ROUNDS):
        with Frozen(t.pid) as f:
            armed["on"] = True
            try:
                addr = f.mmap_scratch(8192)
            except InjectionError:
                timed_out += 1
            else:
                recovered += 1
                f.write_mem(addr, b"x" * 8192)
                f.munmap_scratch(addr)
            armed["on"] = False
        assert _maps(t.pid) == maps
    assert recovered + timed_out == ROUNDS
    if late:  # the step's SIGTRAP stop, reported after the deadline: the result read there
        assert recovered == ROUNDS
    assert t.cmd("count") == "trap 0 code 0 early 0"
    assert _signals(t.pid) == before
    assert t.state() in ("S", "R")


@pytest.mark.parametrize("mode", ["dfl", "handler"])
def test_a_step_reported_stuck_is_let_go_without_its_trap(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Both waits of the step give up (the step's and the re-stop's): the injection fails, "stuck",
    and the thaw stops the thread itself. The step's SIGTRAP, reported there or still queued, is
    not given to the target: it is not killed, its handler never runs, its signal state is as
    before. (The mmap may have run: its result is not known, so its mapping is not checked.)"""
    t = spawn("traps", mode)
    before = _signals(t.pid)
    real = Frozen._wait
    armed = {"left": 0}

    def wait(self: Frozen, tid: int, timeout: float) -> raw.WaitResult | None:
        if armed["left"]:
            armed["left"] -= 1
            if armed["left"]:
                _reported(tid)  # the step's: its SIGTRAP stop is there for the thaw's wait to find
            return None
        return real(self, tid, timeout)

    monkeypatch.setattr(Frozen, "_wait", wait)
    for _ in range(ROUNDS // 4):
        with Frozen(t.pid) as f:
            armed["left"] = 2
            with pytest.raises(InjectionError):
                f.mmap_scratch(8192)
            armed["left"] = 0
        assert t.cmd("count") == "trap 0 code 0 early 0"
        assert _signals(t.pid) == before
