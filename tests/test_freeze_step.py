"""Injected mmap and munmap in one stop each (ckpt/ptrace/inject.py, step_over_syscall): a single-step
over the syscall, reported at its exit with a SIGTRAP the kernel forces, taken off at that stop. Only
where a forced SIGTRAP changes nothing: a thread that blocks it, or a process that ignores it, takes
the two-stop way (PTRACE_SYSCALL), and keeps its mask and action. A SIGTRAP of the target's own is
never eaten: sent while frozen it arrives at thaw, exactly once, with its siginfo."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import pytest

from ckpt.ptrace import Frozen, inject, raw
from tests.util import Target

Spawn = Callable[..., Target]
ROUNDS = 200
BIT = 1 << (signal.SIGTRAP - 1)


def _status(pid: int, tid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return {k: v.strip() for k, _, v in (ln.partition(":") for ln in f)}


def _signals(pid: int) -> dict[int, tuple[str, ...]]:
    keys = ("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd")
    return {
        t: tuple(_status(pid, t)[k] for k in keys) for t in sorted(map(int, os.listdir(f"/proc/{pid}/task")))
    }


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _only(monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    """The other way of injecting fails the test if taken."""
    other = "step_syscall" if way == "step_over_syscall" else "step_over_syscall"

    def refuse(*a: object, **k: object) -> int:
        raise AssertionError(f"{other} taken, {way} expected")

    monkeypatch.setattr(inject, other, refuse)


def _rounds(t: Target, n: int, each: Callable[[Frozen], None] | None = None) -> Iterator[None]:
    maps = _maps(t.pid)
    for _ in range(n):
        with Frozen(t.pid) as f:
            if each is not None:
                each(f)
            addr = f.mmap_scratch(8192)
            assert f.read_mem(addr, 8192) == bytes(8192)  # mapped, fresh
            f.write_mem(addr, b"x" * 8192)
            assert f.read_mem(addr, 8192) == b"x" * 8192
            f.munmap_scratch(addr)
            assert _maps(t.pid) == maps
        yield


@pytest.mark.parametrize("mode", ["dfl", "handler"])
def test_one_stop_each_and_the_target_sees_nothing(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """SIGTRAP's default action would kill the target, a handler would count it: neither happens,
    in 200 freezes with an mmap and a munmap each, and the signal state is as before."""
    t = spawn("traps", mode)
    before = _signals(t.pid)
    _only(monkeypatch, "step_over_syscall")
    for _ in _rounds(t, ROUNDS):
        pass
    assert t.cmd("count") == "trap 0 code 0 early 0"
    assert _signals(t.pid) == before
    assert t.state() in ("S", "R")


@pytest.mark.parametrize("mode", ["ignore", "block"])
def test_ignored_or_blocked_sigtrap_takes_two_stops(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A forced SIGTRAP would reset SIG_IGN to SIG_DFL, or unblock it in the mask: such a target's
    calls go the two-stop way, and its SigIgn and SigBlk stay as they were."""
    t = spawn("traps", mode)
    before = _signals(t.pid)
    lead = before[t.pid]
    assert int(lead[1 if mode == "ignore" else 0], 16) & BIT
    _only(monkeypatch, "step_syscall")
    for _ in _rounds(t, 20):
        pass
    assert t.cmd("count") == "trap 0 code 0 early 0"
    assert _signals(t.pid) == before


def test_a_sigtrap_sent_while_frozen_arrives_at_thaw_once(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tgkill(SIGTRAP) to the frozen target before the injected calls: the step stops for it before
    the syscall runs, holds it, runs the call; at thaw the handler gets it once, si_code SI_TKILL.
    (Each round waits for the handler's end, the command's answer: while it runs SIGTRAP is blocked
    in that thread, and the next freeze would rightly take two stops.)"""
    t = spawn("traps", "handler")
    before = _signals(t.pid)
    _only(monkeypatch, "step_over_syscall")
    for sent in range(1, 11):
        for _ in _rounds(t, 1, lambda f: raw.tgkill(t.pid, t.pid, signal.SIGTRAP)):
            pass
        assert t.cmd("count") == f"trap {sent} code -6 early 0"  # SI_TKILL: the original siginfo
    assert _signals(t.pid) == before


def test_a_stopped_target(spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen in its group-stop (SIGSTOP): the steps run from there; once continued it has seen no
    SIGTRAP. (That thaw puts it back into the group-stop is Frozen's own, tested with it.)"""
    t = spawn("traps", "dfl")
    os.kill(t.pid, signal.SIGSTOP)
    os.waitid(os.P_PID, t.pid, os.WSTOPPED | os.WNOWAIT)  # (our child: woken by its stop)
    _only(monkeypatch, "step_over_syscall")

    def stopped(f: Frozen) -> None:
        assert f.was_stopped

    for _ in _rounds(t, 10, stopped):
        pass
    os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("count") == "trap 0 code 0 early 0"
