"""A throttled target is never harmed when `ckpt migrate` dies (ckpt/migrate/guard.py,
cgthrottle.reap_orphans): SIGHUP and SIGQUIT are a Ctrl-C; a SIGKILL of ckpt is undone by the guard
(the target back in its own cgroup, no limit, no cgroup left, SIGCONT where the duty cycle had it
stopped); a cgroup whose ckpt and guard were both killed is removed by the next `ckpt migrate`.

Real processes and real signals, for each mechanism this host offers (cgroup v1 cfs quota; the
SIGSTOP/SIGCONT duty cycle, chosen with CKPT_MIGRATE_TEST_THROTTLE=duty). Every wait is woken by
the event: a pidfd for a process's exit, waitid for a child's stop or continue."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.migrate.cgthrottle import PREFIX, AutoConverge, CpuMax, Membership, membership, reap_orphans
from tests.test_migrate import ENV, ROOT, Server, _ckpt, server  # noqa: F401  (a fixture)
from tests.util import Target

WAIT = 120.0  # bound of every wait (a loaded machine); none is expected to come near it

STANDIN = """
import json, sys
from ckpt.migrate.cgthrottle import AutoConverge, CpuMax
a = AutoConverge([int(sys.argv[1])])
a.set(float(sys.argv[2]))
cg = str(a.impl.child) if isinstance(a.impl, CpuMax) else None
print(json.dumps({"guard": a.guard.proc.pid, "mechanism": a.mechanism, "cg": cg}), flush=True)
sys.stdin.read()  # until killed
"""


def _tasks(pid: int) -> dict[int, Membership]:
    return {int(t): membership(pid, int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def _ours(home: Path, pid: int) -> list[str]:
    return sorted(d.name for d in home.iterdir() if d.name.startswith(f"{PREFIX}{pid}."))


def _exited(pid: int) -> None:
    """Until process `pid` (any parent) has exited: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], WAIT)[0], f"process {pid} did not exit within {WAIT}s"
    finally:
        os.close(fd)


def _waitid(pid: int, flags: int) -> None:
    """Until our child `pid` has stopped (WSTOPPED) or continued (WCONTINUED), in a thread so
    that the wait is bounded; WNOWAIT leaves the state for Target's own reaping."""
    done = threading.Event()

    def wait() -> None:
        os.waitid(os.P_PID, pid, flags | os.WNOWAIT)
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    assert done.wait(WAIT), f"{pid}: no state change within {WAIT}s"


def _home(pid: int) -> Path:
    a = AutoConverge([pid])
    try:
        if not isinstance(a.impl, CpuMax):
            pytest.skip(f"no cgroup CPU controller here: {a.not_used}")
        return a.impl.home
    finally:
        a.close()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def _guard_of(pid: int) -> int:
    """The guard a running `ckpt migrate` started: its only child that leads a session of its own
    (guard.py is started with start_new_session). Not by its command line: that can read empty
    while the guard's exec is still being loaded (the vfork parent goes on before it is set)."""
    for c in _children(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == c:  # (state, ppid, pgrp, session)
                return c
    raise AssertionError(f"ckpt {pid} has no guard: children {_children(pid)}")


Started = tuple[subprocess.Popen[str], dict[str, object]]


@pytest.fixture
def standin() -> Iterator[Callable[..., Started]]:
    """A process playing ckpt: it throttles `pid` by `fraction` and waits to be killed."""
    procs: list[subprocess.Popen[str]] = []

    def start(pid: int, fraction: float, duty: bool = False) -> Started:
        env = dict(ENV, **({"CKPT_MIGRATE_TEST_THROTTLE": "duty"} if duty else {}))
        p = subprocess.Popen(
            [sys.executable, "-c", STANDIN, str(pid), str(fraction)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line, "the stand-in ended before throttling"
        return p, json.loads(line)

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_clean_close_leaves_the_guard_quiet(spawn: Callable[..., Target]) -> None:
    """ckpt ending its throttle itself: the guard is told so and exits 0, touching nothing."""
    t = spawn("cpuhog")
    before = _tasks(t.pid)
    a = AutoConverge([t.pid])
    a.set(0.3)
    a.close()
    assert a.guard.proc.wait(60) == 0
    assert _tasks(t.pid) == before and t.state() != "T"


def test_sigkill_of_ckpt_v1_cgroup(spawn: Callable[..., Target], standin: Callable[..., Started]) -> None:
    t = spawn("cpuhog")
    before = _tasks(t.pid)
    home = _home(t.pid)
    assert t.cmd("burn 20") == "burnt 20"  # some CPU used: the quota's base
    p, info = standin(t.pid, 0.8)
    cg = Path(str(info["cg"]))
    assert cg.parent == home and _tasks(t.pid) != before  # throttled, inside
    assert int((cg / "cpu.cfs_quota_us").read_text()) > 0
    p.kill()
    p.wait()
    _exited(int(info["guard"]))  # type: ignore[arg-type]
    assert _tasks(t.pid) == before  # every thread exactly where it was
    assert not cg.exists() and _ours(home, t.pid) == []
    assert t.cmd("burn 1") == "burnt 1"


def test_sigkill_of_ckpt_duty_cycle_while_stopped(
    spawn: Callable[..., Target],
    standin: Callable[..., Started],
) -> None:
    """The duty cycle stops the target 99 ms of every 100: ckpt is killed while it is stopped (the
    test, its parent, sees the stop) and the guard continues it."""
    t = spawn("cpuhog")
    p, info = standin(t.pid, 0.99, duty=True)
    assert info["mechanism"] == "SIGSTOP/SIGCONT duty cycle" and info["cg"] is None
    _waitid(t.pid, os.WSTOPPED)
    p.kill()
    p.wait()
    _exited(int(info["guard"]))  # type: ignore[arg-type]
    assert t.state() != "T"
    assert t.cmd("burn 1") == "burnt 1"


def test_orphan_is_reaped_by_the_next_migrate(
    spawn: Callable[..., Target], standin: Callable[..., Started]
) -> None:
    """ckpt and its guard both killed: the cgroup, with the target limited inside, is an orphan; the
    next reap (the start of `ckpt migrate`) puts the target back and removes it. A throttle cgroup
    whose owner lives is left alone."""
    t = spawn("cpuhog")
    before = _tasks(t.pid)
    home = _home(t.pid)
    p, info = standin(t.pid, 0.5)
    cg = Path(str(info["cg"]))
    guard = int(info["guard"])  # type: ignore[arg-type]
    os.kill(guard, signal.SIGKILL)
    _exited(guard)
    p.kill()
    p.wait()
    assert cg.exists() and _tasks(t.pid) != before  # left behind, still limited

    other = spawn("cpuhog")  # beside it, throttled by a live owner (this test)
    live = AutoConverge([other.pid])
    try:
        live.set(0.2)
        assert isinstance(live.impl, CpuMax) and live.impl.home == home
        lines = reap_orphans(t.pid)
        assert lines == [f"removed the throttle cgroup {cg} left by a killed ckpt "
                         f"(process(es) {t.pid} moved back to {home})"]  # fmt: skip
        assert _tasks(t.pid) == before and not cg.exists()
        assert live.impl.child.exists() and membership(other.pid) != membership(t.pid)
        assert reap_orphans(other.pid) == []  # its owner runs
    finally:
        live.close()
    assert t.cmd("burn 1") == "burnt 1"


def _dirtier(spawn: Callable[..., Target]) -> Target:
    t: Target = spawn("dirtier", "512", "300", stderr=subprocess.DEVNULL)
    return t


def _throttled_migrate(t: Target, addr: str, duty: bool) -> subprocess.Popen[bytes]:
    """`ckpt migrate --auto-converge` on a link too slow for the target, returned once a round has
    set the throttle."""
    argv = _ckpt("migrate", "--pid", str(t.pid), "--to", addr, "--json", "--policy", "rounds:99999",
                 "--bandwidth", "2MB/s", "--auto-converge")  # fmt: skip
    env = dict(ENV, **({"CKPT_MIGRATE_TEST_THROTTLE": "duty"} if duty else {}))
    m = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    assert m.stdout is not None and m.stderr is not None
    for line in m.stdout:
        if float(json.loads(line)["throttle"]) > 0:
            return m
    m.wait()
    raise AssertionError(m.stderr.read().decode())


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_hangup_and_quit_are_a_ctrl_c(
    spawn: Callable[..., Target],
    server: Callable[..., Server],  # noqa: F811
    sig: signal.Signals,
) -> None:
    t = _dirtier(spawn)
    before = _tasks(t.pid)
    home = _home(t.pid)
    s = server()
    m = _throttled_migrate(t, s.addr, duty=False)
    try:
        assert any(_ours(home, t.pid))
        m.send_signal(sig)
        assert m.wait(WAIT) == 130
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    assert m.stderr is not None
    err = m.stderr.read().decode()
    assert f"interrupted; the original process {t.pid} runs on" in err, err
    assert "back in its own cgroup" in err
    assert _tasks(t.pid) == before and _ours(home, t.pid) == []
    assert t.cmd("check").startswith("ok ")


@pytest.mark.parametrize("duty", [False, True], ids=["cgroup", "duty-cycle"])
def test_sigkill_of_a_real_migrate(
    spawn: Callable[..., Target],
    server: Callable[..., Server],  # noqa: F811
    duty: bool,
) -> None:
    """`ckpt migrate` killed with SIGKILL while it throttles: its guard gives the target back its
    cgroup and its CPU, and continues it (duty cycle). The destination drops its copy: one process."""
    t = _dirtier(spawn)
    before = _tasks(t.pid)
    home = _home(t.pid)
    s = server()
    m = _throttled_migrate(t, s.addr, duty)
    try:
        guard = _guard_of(m.pid)
        if duty:
            _waitid(t.pid, os.WSTOPPED)  # killed while the cycle has it stopped (its parent sees it)
        else:
            assert any(_ours(home, t.pid))
        m.kill()
        m.wait()
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _exited(guard)
    assert _tasks(t.pid) == before and _ours(home, t.pid) == []
    assert t.state() != "T"
    assert t.cmd("check").startswith("ok ")
