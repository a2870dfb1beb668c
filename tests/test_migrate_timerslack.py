"""The target's timer slack through a migration's raise for the final freeze (ckpt/targetrt.py): the
kernel reads a real-time thread's slack as 0 and gives SCHED_OTHER back with the default (50000
ns), so the copy, an original let go and an original continued by the guard each keep the thread's
own. Real processes, real sockets; waits woken by their events."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from ckpt import targetrt
from tests.test_cgthrottle_guard import _exited
from tests.test_migrate import ENV, ROOT, Server, _ckpt, server
from tests.test_migrate_boost import _tids
from tests.test_migrate_guard_final import WAIT, _held, _kill
from tests.util import Target

__all__ = ["server"]  # the fixture, used by name

SLACK = 123456


def _slack(tid: int) -> int:
    with open(f"/proc/{tid}/timerslack_ns") as f:
        return int(f.read())


def _set_slack(tid: int, ns: int) -> None:
    # The same per-thread field prctl(PR_SET_TIMERSLACK) sets, from outside.
    with open(f"/proc/{tid}/timerslack_ns", "w") as f:
        f.write(str(ns))


def _target(spawn: Callable[..., Target]) -> Target:
    t = spawn("cpuhog", stderr=subprocess.DEVNULL)
    for tid in _tids(t.pid):
        _set_slack(tid, SLACK)
    assert [_slack(tid) for tid in _tids(t.pid)] == [SLACK, SLACK]
    return t


def test_the_copy_keeps_the_originals_slack(
    spawn: Callable[..., Target], server: Callable[..., Server]
) -> None:
    t = _target(spawn)
    s = server()
    m = subprocess.run(
        _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:1"),
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV,
    )  # fmt: skip
    assert m.returncode == 0, m.stderr
    copy = s.done()
    assert [_slack(tid) for tid in _tids(copy)] == [SLACK, SLACK]
    assert s.chan.cmd("burn 1") == "burnt 1"


def test_a_failed_migration_gives_the_slack_back(
    spawn: Callable[..., Target], server: Callable[..., Server]
) -> None:
    t = _target(spawn)
    s = server()
    m = subprocess.run(
        _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:1"),
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(ENV, CKPT_MIGRATE_TEST_FAIL_AT_READY="1"),
    )  # fmt: skip
    assert m.returncode == 1, m.stderr
    assert [_slack(tid) for tid in _tids(t.pid)] == [SLACK, SLACK]
    assert t.cmd("burn 1") == "burnt 1"


def test_the_guard_gives_the_slack_back(spawn: Callable[..., Target], server: Callable[..., Server]) -> None:
    """ckpt SIGKILLed at a hold point after its final dump, the target still raised."""
    t = _target(spawn)
    tids = _tids(t.pid)
    s = server(env=dict(ENV, CKPT_SERVE_HOLD_BEFORE_RESTORE="1"))
    m, guard = _held(t, s, "final-dumped")
    try:
        assert _slack(tids[0]) == 0  # raised: the kernel reads it so
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _exited(guard)
    assert [_slack(tid) for tid in tids] == [SLACK, SLACK]
    assert t.cmd("burn 1") == "burnt 1"
    s.proc.kill()
    s.proc.wait(WAIT)


def test_recorded_and_given_back() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        _set_slack(p.pid, SLACK)
        assert targetrt.raise_threads([p.pid]) == [p.pid]
        assert _slack(p.pid) == 0
        assert targetrt.recorded_slack(p.pid, 0) == SLACK
        assert targetrt.give_back(p.pid) == [p.pid]
        assert _slack(p.pid) == SLACK
        assert targetrt.recorded_slack(p.pid, 7) == 7  # no longer raised: read as it is
    finally:
        p.communicate(b"")
