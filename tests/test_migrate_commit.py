"""The end of a migration as a two-phase commit (exactly one copy runs, also when the connection
breaks between the destination starting its copy and the source hearing of it), and the cgroup
CPU quota of --auto-converge. Real processes, real sockets, real cgroups."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.migrate.cgthrottle import CpuMax
from tests.test_migrate import ENV, ROOT, Server, _ckpt, _rounds, _runs_on_untracked, _state, server
from tests.util import Target

__all__ = ["server"]  # the fixture, used by name


def test_connection_lost_after_commit_keeps_one_copy(spawn: Callable[..., Target],
                                                     server: Callable[..., Server]) -> None:  # fmt: skip
    """The destination receives COMMIT, lets its copy run, and the connection breaks before RUNNING
    reaches the source. A one-phase protocol would let the original go too (two copies); here the
    source, which cannot know whether the copy runs, keeps its original stopped and says so."""
    t = _rounds(spawn, "256")
    s = server(env=dict(ENV, CKPT_SERVE_TEST_DROP_AFTER_COMMIT="1"))
    m = subprocess.run(_ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:1"),
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)  # fmt: skip
    copy = int(s.event("restored")["pid"])  # type: ignore[call-overload]
    s.pid = copy  # killed and reaped by the fixture
    try:
        assert m.returncode == 1, m.stderr
        assert f"the original process {t.pid} is kept stopped" in m.stderr and "Traceback" not in m.stderr
        assert t.stopped_state() == "T"  # the original: stopped, not running
        assert _state(copy) in ("S", "R")  # the copy: running
        assert s.proc.wait(60) == 1 and f"the copy runs as pid {copy}" in s.stderr()
        # The copy is the process: it answers as the original would have.
        s.chan.send("round")
        assert s.chan.readline().startswith("round ")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(t.pid, signal.SIGKILL)


def test_failure_between_ready_and_commit_kills_the_copy(spawn: Callable[..., Target],
                                                         server: Callable[..., Server]) -> None:  # fmt: skip
    """The copy is built and held stopped (READY); the source fails before its COMMIT: the copy
    never runs, the original runs on untracked."""
    t, ref = _rounds(spawn, "256"), _rounds(spawn, "256")
    s = server()
    m = subprocess.run(_ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:1"),
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(ENV, CKPT_MIGRATE_TEST_FAIL_AT_READY="1"))  # fmt: skip
    assert m.returncode == 1 and f"the original process {t.pid} runs on (untracked)" in m.stderr
    assert s.proc.wait(60) == 1
    err = s.stderr()
    assert "aborted" in err and "restored" not in err
    _runs_on_untracked(t, ref)


def test_cgroup_quota_moves_and_gives_back(spawn: Callable[..., Target]) -> None:
    t = _rounds(spawn, "64")
    before = Path(f"/proc/{t.pid}/cgroup").read_text()
    q = CpuMax.open(t.pid)
    if q is None:
        pytest.skip("no cgroup CPU controller usable here")
    try:
        q.set(0.5)
        now = Path(f"/proc/{t.pid}/cgroup").read_text()
        assert now != before and f"ckpt-throttle-{t.pid}" in now
        quota = (q.child / ("cpu.max" if q.v2 else "cpu.cfs_quota_us")).read_text().split()[0]
        # Half of what it used before (its own share of the CPUs, measured since open).
        assert q.base is not None and 0 < q.base <= q.cpus
        assert int(quota) == max(1000, int(100_000 * q.base * 0.5))
        q.pause()
        assert (q.child / ("cpu.max" if q.v2 else "cpu.cfs_quota_us")).read_text().split()[0] in ("max", "-1")
    finally:
        q.close()
    assert Path(f"/proc/{t.pid}/cgroup").read_text() == before  # exactly where it was
    assert not q.child.exists()
    assert t.cmd("round").startswith("round ")
