"""`ckpt migrate` killed with SIGKILL at each point of the hand-over (ckpt/migrate/guard.py): the
guard leaves exactly one copy of the target, and that copy runs (not stopped) and answers as an
uninterrupted process would.

ckpt is stopped at a named point (ckpt/migrate/testhold.py: CKPT_MIGRATE_TEST_HOLD), says so through
a pipe, and the test kills it there. Before the COMMIT leaves, the original must be continued and
the destination's held copy dropped; from the COMMIT in the socket on, the copy runs and the
original must die. Real processes, real sockets; every wait is woken by its event (a pipe's line,
a pidfd, a process's exit) and bounded."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.migrate.testhold import POINTS
from tests.test_cgthrottle_guard import _exited, _guard_of
from tests.test_migrate import ENV, ROOT, Server, _ckpt, _rounds, _self_signed, server
from tests.test_tree_migrate import TREE, _children
from tests.util import LineChannel, Target

__all__ = ["server"]  # the fixture, used by name

WAIT = 120.0
BEFORE_COMMIT = ("final-footer", "ready", "commit-told")


def _held(t: Target | int, s: Server, point: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    """`ckpt migrate` of `t` (a Target or a pid) to `s`, stopped at `point`: (the process, its guard)."""
    pid = t if isinstance(t, int) else t.pid
    r, w = os.pipe()
    env = dict(ENV, CKPT_MIGRATE_TEST_HOLD=point, CKPT_MIGRATE_TEST_HOLD_FD=str(w))
    try:
        m = subprocess.Popen(
            _ckpt("migrate", "--pid", str(pid), "--to", s.addr, "--policy", "rounds:1", *args),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT, pass_fds=(w,),
        )  # fmt: skip
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            assert select.select([f], [], [], WAIT)[0], f"ckpt migrate did not reach {point}"
            line = f.readline().decode().strip()
        if line != point:  # (it ended first: say how)
            m.wait(WAIT)
            assert m.stderr is not None
            raise AssertionError(f"no {point}: exit {m.returncode}, {m.stderr.read().decode()}")
        return m, _guard_of(m.pid)
    except BaseException:
        m.kill()
        m.wait()
        raise


def _kill(m: subprocess.Popen[bytes]) -> None:
    m.send_signal(signal.SIGKILL)
    assert m.wait(WAIT) == -signal.SIGKILL
    if m.stderr is not None:
        m.stderr.close()


def _check(t: Target, ref: Target, s: Server, point: str, guard: int) -> None:
    _exited(guard)  # it has acted (it exits once it has)
    if point in BEFORE_COMMIT:
        # The original continued, the copy never ran: the destination dropped it.
        assert s.proc.wait(WAIT) == 1
        assert "restored" not in "".join(s.other)
        assert t.state() in ("S", "R")
        for _ in range(2):
            assert t.cmd("round") == ref.cmd("round")
    else:
        # The copy runs; the original was killed (by ckpt before its death, or by the guard).
        copy = s.done()
        assert t.proc.wait(WAIT) == -signal.SIGKILL
        with open(f"/proc/{copy}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in ("S", "R")
        mig = LineChannel(s.proc, 60)
        for _ in range(2):
            assert mig.cmd("round") == ref.cmd("round")


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_point_leaves_one_running_copy(
    spawn: Callable[..., Target], server: Callable[..., Server], point: str
) -> None:
    t, ref = _rounds(spawn, "256"), _rounds(spawn, "256")
    for _ in range(2):
        assert t.cmd("round") == ref.cmd("round")
    s = server()
    m, guard = _held(t, s, point)
    try:
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _check(t, ref, s, point, guard)


@pytest.mark.parametrize("point", ["commit-told", "committed"])
def test_sigkill_around_the_commit_over_tls(
    tmp_path: Path, spawn: Callable[..., Target], server: Callable[..., Server], point: str
) -> None:
    """The socket's byte count tells the two sides of the COMMIT's send apart under TLS too (the
    guard counts the TCP socket's bytes, records and all)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = _self_signed(tmp_path)
    t, ref = _rounds(spawn, "256"), _rounds(spawn, "256")
    s = server("--tls-cert", str(cert), "--tls-key", str(key))
    m, guard = _held(t, s, point, "--tls-ca", str(cert))
    try:
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _check(t, ref, s, point, guard)


def test_only_the_hand_off_threads_are_raised(
    spawn: Callable[..., Target], server: Callable[..., Server]
) -> None:
    """In the final round (held at READY) ckpt's real-time threads are exactly its main thread
    (which ran the final dump and waits for the answer) and the committer (ckpt/migrate/boost.py):
    a compressed stream's pool threads stay ordinary. Then killed there: one copy, as above."""
    t, ref = _rounds(spawn, "256"), _rounds(spawn, "256")
    s = server()
    m, guard = _held(t, s, "ready", "--bandwidth", "100MB/s")  # (below 200 MB/s: compressed)
    try:
        pol = {
            int(x): os.sched_getscheduler(int(x)) & ~os.SCHED_RESET_ON_FORK
            for x in os.listdir(f"/proc/{m.pid}/task")
        }
        raised = sorted(tid for tid, p in pol.items() if p == os.SCHED_FIFO)
        assert m.pid in raised and len(raised) == 2, pol
        assert all(p in (os.SCHED_FIFO, os.SCHED_OTHER) for p in pol.values()), pol
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _check(t, ref, s, "ready", guard)


@pytest.mark.parametrize("point", ["ready", "committed"])
def test_sigkill_of_a_tree_migration(server: Callable[..., Server], point: str) -> None:
    """A process tree (one stop-and-copy, ckpt/migrate/tree.py): the guard, told the members, does
    the same for every process of it: the original tree continued, or killed with the copy running."""
    p = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    s = server("--new-pids")  # over loopback the original tree holds the pids: new ones (restore/pidheld.py)
    try:
        assert p.stdout is not None
        word, c = p.stdout.readline().split()
        assert word == b"ready"
        child = int(c)
        m, guard = _held(p.pid, s, point)
        try:
            _kill(m)
        finally:
            if m.poll() is None:
                m.kill()
                m.wait()
        _exited(guard)
        if point == "ready":
            assert s.proc.wait(WAIT) == 1
            for q in (child, p.pid):
                os.kill(q, signal.SIGUSR1)
            assert select.select([p.stdout], [], [], WAIT)[0], "the original tree did not go on"
            line = p.stdout.readline().decode().strip()
            assert line == f"parent {p.pid} {child} 0 True hello from the child", line
            assert p.wait(WAIT) == 0
        else:
            assert p.wait(WAIT) == -signal.SIGKILL
            assert os.waitpid(child, 0)[1] == signal.SIGKILL  # (an orphan: ours, the subreaper)
            new = s.done()
            kids = _children(new)
            assert len(kids) == 1
            os.kill(kids[0], signal.SIGUSR1)
            os.kill(new, signal.SIGUSR1)
            line = s.other[0] if s.other else s.chan.readline()
            assert line == f"parent {new} {kids[0]} 0 True hello from the child", line
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
