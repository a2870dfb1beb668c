"""The target raised to SCHED_FIFO for the final round's freeze (ckpt/migrate/targetboost.py): its
copy runs with the original's own policy and nice, an original let go (or continued by the guard
after ckpt's SIGKILL) has its own back, and a thread that is not SCHED_OTHER is never raised.
Real processes, real sockets; waits woken by their events."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from ckpt import targetrt
from ckpt.rtprio import POLICY
from tests.test_cgthrottle_guard import _exited
from tests.test_migrate import ENV, ROOT, Server, _ckpt, server
from tests.test_migrate_boost import _sched, _tids
from tests.test_migrate_guard_final import WAIT, _held, _kill
from tests.util import Target

__all__ = ["server"]  # the fixture, used by name


def _hog(spawn: Callable[..., Target]) -> tuple[Target, list[tuple[int, int, int]]]:
    """cpuhog (two threads): the main one ordinary with nice 7 (raised for the freeze), the other
    SCHED_BATCH with nice 4 (left alone); and each thread's (policy, priority, nice)."""
    t = spawn("cpuhog", stderr=subprocess.DEVNULL)
    tids = _tids(t.pid)
    assert len(tids) == 2
    os.setpriority(os.PRIO_PROCESS, tids[0], 7)
    os.sched_setscheduler(tids[1], os.SCHED_BATCH, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, tids[1], 4)
    return t, [_sched(tid) for tid in tids]


def test_the_copy_keeps_the_originals_own_policy(
    spawn: Callable[..., Target], server: Callable[..., Server]
) -> None:
    t, want = _hog(spawn)
    s = server()
    m = subprocess.run(
        _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:1"),
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV,
    )  # fmt: skip
    assert m.returncode == 0, m.stderr
    copy = s.done()
    assert [_sched(tid) for tid in _tids(copy)] == want
    assert s.chan.cmd("burn 1") == "burnt 1"


def test_raised_in_the_final_round_and_given_back_by_the_guard(
    spawn: Callable[..., Target], server: Callable[..., Server]
) -> None:
    """ckpt SIGKILLed after its final dump, the target still raised and stopped, no COMMIT sent
    (the destination holds before its restore): the guard gives each raised thread its own policy
    back, then continues the original."""
    t, want = _hog(spawn)
    tids = _tids(t.pid)
    s = server(env=dict(ENV, CKPT_SERVE_HOLD_BEFORE_RESTORE="1"))
    m, guard = _held(t, s, "final-dumped")
    try:
        main, other = _sched(tids[0]), _sched(tids[1])
        assert main == (POLICY, 1, 7)  # raised; its nice kept aside
        assert other == want[1]  # SCHED_BATCH: left alone
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _exited(guard)
    assert [_sched(tid) for tid in tids] == want
    assert t.state() in ("S", "R")
    assert t.cmd("burn 1") == "burnt 1"
    s.proc.kill()
    s.proc.wait(WAIT)


def test_failed_migration_gives_the_raised_thread_back(
    spawn: Callable[..., Target], server: Callable[..., Server]
) -> None:
    """A failure after the final freeze (between READY and COMMIT): the original is let go with
    exactly its own policy and nice, the raised main thread's too."""
    t, want = _hog(spawn)
    s = server()
    m = subprocess.run(
        _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:1"),
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(ENV, CKPT_MIGRATE_TEST_FAIL_AT_READY="1"),
    )  # fmt: skip
    assert m.returncode == 1, m.stderr
    assert f"the original process {t.pid} runs on" in m.stderr
    assert [_sched(tid) for tid in _tids(t.pid)] == want
    assert t.cmd("burn 1") == "burnt 1"


def test_recorded_and_given_back_only_while_still_raised() -> None:
    """A dump reads a raised thread's own policy; a thread whose policy changed after the raise (as
    if it set its own) keeps that one, read as it is, and is not given back."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        for _ in range(2)
    ]
    try:
        a, b = (p.pid for p in procs)
        os.setpriority(os.PRIO_PROCESS, a, 6)
        assert sorted(targetrt.raise_threads([a, b])) == sorted([a, b])
        assert _sched(a) == (POLICY, 1, 6)
        assert targetrt.recorded(a, os.sched_getscheduler(a), 1) == (os.SCHED_OTHER, 0)
        os.sched_setscheduler(b, os.SCHED_BATCH, os.sched_param(0))  # changed after the raise
        assert targetrt.recorded(b, os.sched_getscheduler(b), 0) == (os.SCHED_BATCH, 0)
        assert targetrt.give_back(a) == [a]  # (b is no task of a: forgotten, not touched)
        assert _sched(a) == (os.SCHED_OTHER, 0, 6)
        assert _sched(b)[0] == os.SCHED_BATCH
        assert targetrt.raised() == {}
    finally:
        for p in procs:
            p.communicate(b"")
