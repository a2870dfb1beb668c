"""The target raised for the final freeze only below a freezing thread that is real-time itself
(ckpt/migrate/targetboost.py), and the guard raised above it first. Real processes, real sockets;
ckpt held at its hold points (ckpt/migrate/testhold.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from ckpt.migrate.boost import HANDOFF_PRIORITY
from ckpt.rtprio import POLICY
from tests.test_cgthrottle_guard import _exited
from tests.test_migrate import ENV, Server, server
from tests.test_migrate_boost import _sched, _tids
from tests.test_migrate_guard_final import WAIT, _held, _kill
from tests.util import Target

__all__ = ["server"]  # the fixture, used by name


def _final_dumped(t: Target, s: Server) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """ckpt held after the final dump: the target's threads' and the guard's (policy, priority, nice),
    then ckpt SIGKILLed (the guard continues the original)."""
    m, guard = _held(t, s, "final-dumped")
    try:
        out = [_sched(tid) for tid in _tids(t.pid)], _sched(guard)
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _exited(guard)
    s.proc.kill()
    s.proc.wait(WAIT)
    return out


def test_raised_with_the_guard_above(spawn: Callable[..., Target], server: Callable[..., Server]) -> None:
    t = spawn("cpuhog", stderr=subprocess.DEVNULL)
    target, guard = _final_dumped(t, server(env=dict(ENV, CKPT_SERVE_HOLD_BEFORE_RESTORE="1")))
    assert target[0][:2] == (POLICY, 1)
    assert guard[:2] == (POLICY, HANDOFF_PRIORITY)
    assert [_sched(tid)[:2] for tid in _tids(t.pid)] == [(os.SCHED_OTHER, 0)] * 2
    assert t.cmd("burn 1") == "burnt 1"


def test_not_raised_when_ckpt_is_not(
    spawn: Callable[..., Target], server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CKPT_MIGRATE_BOOST=0: ckpt's freezing thread stays ordinary, so the target must too."""
    monkeypatch.setitem(ENV, "CKPT_MIGRATE_BOOST", "0")
    t = spawn("cpuhog", stderr=subprocess.DEVNULL)
    target, guard = _final_dumped(t, server(env=dict(ENV, CKPT_SERVE_HOLD_BEFORE_RESTORE="1")))
    assert [p[:2] for p in target] == [(os.SCHED_OTHER, 0)] * 2
    assert guard[0] == os.SCHED_OTHER
    assert t.cmd("burn 1") == "burnt 1"
