"""The downtime's real-time boost (ckpt/migrate/boost.py): ckpt's threads raised to SCHED_FIFO and
put back exactly, nothing started meanwhile inheriting it, and the migrated copy running with the
dumped process's own policy and nice, not the boost that built it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from ckpt.migrate.boost import HANDOFF_PRIORITY, POLICY, Boost
from ckpt.proc.stat import read_stat
from tests.test_migrate import ENV, ROOT, Server, _ckpt, migrate, server  # noqa: F401  (a fixture)
from tests.util import Target


def _sched(tid: int) -> tuple[int, int, int]:
    return (
        os.sched_getscheduler(tid),
        os.sched_getparam(tid).sched_priority,
        os.getpriority(os.PRIO_PROCESS, tid),
    )


def _tids(pid: int) -> list[int]:
    """The threads of `pid`: the main one first, then the others in the order they were made (their
    start times; the numbers only break a tie). Not in the numbers' order: pids wrap at pid_max
    (32768 on a 2-CPU machine, crossed several times by one run of the suite), and a thread made
    after its main one can then have the lower number (a migrated copy's did, and its threads'
    affinities were compared the wrong way round: tests/test_migrate_pin.py)."""
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    return [pid, *sorted(others, key=lambda tid: (read_stat(pid, tid).start_time, tid))]


def _sched_of_live(tids: list[int]) -> dict[int, tuple[int, int, int]]:
    """_sched of those of `tids` still alive: a thread an earlier test left in this process (e.g. a
    daemon thread waiting for a child) may end at any moment, which says nothing of the boost."""
    out = {}
    for t in tids:
        try:
            out[t] = _sched(t)
        except ProcessLookupError:
            continue
    return out


@pytest.fixture
def parked() -> Iterator[Callable[[], int]]:
    """Threads of this process waiting on an event (native ids), ended afterwards."""
    stop = threading.Event()
    started: list[threading.Thread] = []

    def start() -> int:
        ready = threading.Event()
        tid: list[int] = []

        def run() -> None:
            tid.append(threading.get_native_id())
            ready.set()
            stop.wait()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        started.append(t)
        assert ready.wait(30)
        return tid[0]

    yield start
    stop.set()
    for t in started:
        t.join(30)


def test_raised_and_put_back(parked: Callable[[], int]) -> None:
    """Only the threads that ask: the one that starts the boost and those that join it. A thread
    that does not (a pool's, one from before) stays as it was."""
    before_thread = parked()
    me = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, me, 3)  # a nice of its own: put back as it was
    old = _sched_of_live(_tids(os.getpid()))
    b = Boost()
    b.start()
    try:
        assert b.active, b.note
        assert _sched(me)[:2] == (POLICY, HANDOFF_PRIORITY)
        assert _sched(before_thread) == old[before_thread]  # no global raise
        after = parked()  # a thread started in the window that does not join: ordinary
        assert _sched(after)[:2] == (os.SCHED_OTHER, 0)
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        try:
            assert _sched(child.pid)[0] == os.SCHED_OTHER  # a process is not raised (reset on fork)
        finally:
            child.communicate(b"")
        joined: list[tuple[int, int, int]] = []
        th = threading.Thread(target=lambda: (b.join(), joined.append(_sched(threading.get_native_id()))))
        th.start()
        th.join(30)
        assert joined and joined[0][:2] == (POLICY, HANDOFF_PRIORITY)
        b.join()  # (the starter joining again changes nothing)
    finally:
        b.end()
    now = _sched_of_live(list(old))
    assert me in now and before_thread in now
    assert now == {t: old[t] for t in now}
    assert _sched(me) == old[me] and old[me][2] == 3
    b.end()  # twice is harmless
    os.setpriority(os.PRIO_PROCESS, me, 0)


def test_off(parked: Callable[[], int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_MIGRATE_BOOST", "0")
    old = _sched(threading.get_native_id())
    b = Boost()
    b.start()
    assert not b.active and "off" in b.note and _sched(threading.get_native_id()) == old
    b.end()


def test_the_copy_keeps_its_own_scheduling(
    spawn: Callable[..., Target],
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """The destination's helper runs the final restore raised; the copy then runs with what the
    original had: SCHED_BATCH and nice 7 on its main thread, nice 4 on its other one."""
    t = spawn("cpuhog", stderr=subprocess.DEVNULL)
    tids = _tids(t.pid)
    assert len(tids) == 2
    os.sched_setscheduler(t.pid, os.SCHED_BATCH, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, t.pid, 7)
    for tid in tids[1:]:
        os.setpriority(os.PRIO_PROCESS, tid, 4)
    want = [_sched(tid) for tid in tids]
    s = server()
    rc, lines, err = migrate(t.pid, s.addr, "--policy", "rounds:2")
    assert rc == 0, err
    assert lines[-1]["warm"] is True  # the helper was raised for its final step
    pid = s.done()
    assert [_sched(tid) for tid in _tids(pid)] == want
    assert s.chan.cmd("burn 1") == "burnt 1"


def test_failed_migration_gives_the_original_its_scheduling_back(
    spawn: Callable[..., Target],
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """The original is never raised (its dump would record the raised policy as its own): a
    migration failing after the final freeze (between READY and COMMIT) lets it go with exactly
    what it had."""
    t = spawn("cpuhog", stderr=subprocess.DEVNULL)
    tids = _tids(t.pid)
    os.sched_setscheduler(t.pid, os.SCHED_BATCH, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, tids[1], 5)
    want = [_sched(tid) for tid in tids]
    s = server()
    m = subprocess.run(
        _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:1"),
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(ENV, CKPT_MIGRATE_TEST_FAIL_AT_READY="1"),
    )  # fmt: skip
    assert m.returncode == 1, m.stderr
    assert f"the original process {t.pid} runs on" in m.stderr
    assert [_sched(tid) for tid in tids] == want
    assert t.cmd("burn 1") == "burnt 1"
