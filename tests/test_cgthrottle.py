"""--auto-converge's cgroup CPU throttle on this host's kernel (ckpt/migrate/cgthrottle.py): which
mechanism is chosen and why, the quota stepping as stated, the kernel throttling the target
(cpu.stat counters, not timings), and every process back in its own cgroup with no cgroup left,
after a migration that succeeds, one that fails and one interrupted with Ctrl-C.

These run the path the host offers: cgroup v1's cpu controller on the project's machines (cgroup
v2 there has no cpu controller). The v2 cpu.max path runs in a QEMU guest:
tests/vm/test_cgthrottle_guest.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.migrate.cgthrottle import PERIOD_US, PREFIX, AutoConverge, CpuMax, Membership, membership
from ckpt.migrate.throttle import DutyCycle
from tests.test_migrate import ENV, ROOT, Server, _ckpt, migrate, server  # noqa: F401  (a fixture)
from tests.util import Target


def _tasks(pid: int) -> dict[int, Membership]:
    return {int(t): membership(pid, int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def _leftovers(home: Path, *pids: int) -> list[str]:
    """Throttle cgroups of these targets left under home. Only theirs: other sessions on the machine
    may be migrating with --auto-converge under the same cgroup at the same time."""
    return sorted(d.name for d in home.iterdir() if d.name.startswith(tuple(f"{PREFIX}{p}." for p in pids)))


def _v1(pid: int) -> AutoConverge:
    a = AutoConverge([pid])
    if not isinstance(a.impl, CpuMax) or a.impl.v2:
        a.close()
        pytest.skip(f"this host has no usable cgroup v1 cpu controller ({a.mechanism}: {a.not_used})")
    return a


def _quota(q: CpuMax) -> tuple[str, str]:
    return (q.child / "cpu.cfs_quota_us").read_text().strip(), (
        q.child / "cpu.cfs_period_us"
    ).read_text().strip()


def test_choice_says_why(spawn: Callable[..., Target]) -> None:
    """v2 cpu.max is tried first; where it is not used its reason is given (here: the cpu controller
    is bound to v1, so /sys/fs/cgroup/unified lacks it)."""
    t = spawn("cpuhog")
    a = AutoConverge([t.pid])
    try:
        if isinstance(a.impl, CpuMax) and a.impl.v2:
            assert a.mechanism.startswith("cgroup v2 cpu.max") and a.not_used == []
        elif isinstance(a.impl, CpuMax):
            assert a.mechanism.startswith("cgroup v1 cpu.cfs_quota_us")
            assert len(a.not_used) == 1 and a.not_used[0].startswith("v2 cpu.max: "), a.not_used
        else:
            assert a.mechanism == "SIGSTOP/SIGCONT duty cycle"
            assert [w.split(":")[0] for w in a.not_used][-2:] == ["v2 cpu.max", "v1 cpu"], a.not_used
    finally:
        a.close()


def test_v1_quota_steps_and_the_kernel_throttles(spawn: Callable[..., Target]) -> None:
    t = spawn("cpuhog")
    before = _tasks(t.pid)
    assert len(before) == 2  # the spinning thread and the command thread
    a = _v1(t.pid)
    q = a.impl
    assert isinstance(q, CpuMax)
    home = q.home
    try:
        assert t.cmd("burn 50") == "burnt 50"  # CPU used before the throttle: its base
        assert _tasks(t.pid) == before  # nothing moves before the first step
        quotas = []
        for step in range(8):  # QEMU's steps: 20%, then +10% a round
            frac = round(0.2 + 0.1 * step, 2)
            a.set(frac)
            assert q.base is not None and 0 < q.base <= q.cpus == 2
            want = max(1000, int(PERIOD_US * q.base * (1 - frac)))
            assert _quota(q) == (str(want), str(PERIOD_US))
            assert a.setting == f"cpu.cfs_quota_us {want}/{PERIOD_US} us"
            quotas.append(want)
            # Every thread is in the throttle cgroup (cgroup.procs moved the whole process).
            assert {m.v1cpu for m in _tasks(t.pid).values()} == {
                str(Path(before[t.pid].v1cpu or "/") / q.child.name)
            }
        assert quotas == sorted(quotas, reverse=True) and len(set(quotas)) == len(quotas)
        # At 90% the process may use a tenth of what it used, shared by its two threads: 30 ms of
        # the command thread's CPU take several periods, in which the kernel throttles the group
        # (it is CPU-bound: it runs out of quota). Counters, not a stopwatch.
        assert t.cmd("burn 30") == "burnt 30"
        stat = dict(ln.split() for ln in (q.child / "cpu.stat").read_text().splitlines())
        assert int(stat["nr_throttled"]) > 0 and int(stat["throttled_time"]) > 0, stat
        a.pause()  # lifted while a round freezes the process
        assert _quota(q)[0] == "-1"
        a.resume()
        assert _quota(q)[0] == str(quotas[-1])
    finally:
        a.close()
    assert _tasks(t.pid) == before  # exactly where each thread was
    assert not q.child.exists() and _leftovers(home, t.pid) == []
    rep = a.report()
    assert rep["nr_throttled"] > 0 and rep["throttled_ms"] > 0 and rep["cgroup"] == str(q.child)
    assert t.cmd("burn 1") == "burnt 1"  # runs on, unthrottled
    a.close()  # twice is harmless


def test_a_child_forked_while_throttled_goes_back_too(spawn: Callable[..., Target]) -> None:
    t = spawn("cpuhog")
    before = membership(t.pid)
    a = _v1(t.pid)
    q = a.impl
    assert isinstance(q, CpuMax)
    child = 0
    try:
        a.set(0.2)
        child = int(t.cmd("fork").split()[1])
        assert membership(child) == membership(t.pid) != before  # born in the throttle cgroup
        assert sorted(int(p) for p in (q.child / "cgroup.procs").read_text().split()) == sorted(
            [t.pid, child]
        )
        a.close()
        assert membership(t.pid) == membership(child) == before
        assert not q.child.exists() and _leftovers(q.home, t.pid, child) == []
    finally:
        a.close()
        if child:  # the target's own child: the spawn fixture ends only the target (seen left by CI)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def _dirtier(spawn: Callable[..., Target]) -> Target:
    """2 MiB rewriting 30% of its pages per 100 ms (~6 MB/s): too fast for a 2 MB/s link, round after
    round (test_migrate.py's test_non_convergence). Its CPU-bound variant ("cpu") is slowed by the
    throttle, so its sets shrink under this machine's load often enough that the rule calls it
    converging and never throttles it: the wall-clock one makes the steps certain."""
    t: Target = spawn("dirtier", "512", "300", stderr=subprocess.DEVNULL)
    return t


def _home_of(pid: int) -> Path:
    a = _v1(pid)
    try:
        assert isinstance(a.impl, CpuMax)
        return a.impl.home
    finally:
        a.close()


def test_migration_reports_the_v1_throttle(
    spawn: Callable[..., Target],
    server: Callable[..., Server],  # noqa: F811
) -> None:
    t = _dirtier(spawn)
    home = _home_of(t.pid)
    s = server()
    rc, lines, err = migrate(t.pid, s.addr, "--policy", "rounds:5", "--bandwidth", "2MB/s", "--auto-converge")
    assert rc == 0, err
    final = lines[-1]
    thr = final["throttle"]
    assert isinstance(thr, dict)
    assert str(thr["mechanism"]).startswith(f"cgroup v1 cpu.cfs_quota_us ({home / PREFIX}{t.pid}."), thr
    assert any(str(w).startswith("v2 cpu.max: ") for w in thr["not_used"]), thr
    live = [ln for ln in lines[:-1] if ln["kind"] == "live"]
    steps = [(float(ln["throttle"]), str(ln["throttle_setting"])) for ln in live]  # type: ignore[arg-type]
    on = [(f, st) for f, st in steps if f > 0]
    assert on, steps
    # 20%, then +10% a round (the round the rule stops at keeps the last step), each the quota of
    # the process's own unthrottled CPU use.
    fracs = sorted({f for f, _ in on})
    assert [f for f, _ in on] == sorted(f for f, _ in on), steps
    assert fracs == [round(0.2 + 0.1 * i, 2) for i in range(len(fracs))], steps
    base = float(thr["base_cpus"])  # type: ignore[arg-type]
    for f, st in on:
        assert st == f"cpu.cfs_quota_us {max(1000, int(PERIOD_US * base * (1 - f)))}/{PERIOD_US} us", steps
    assert all(st == "no limit" for f, st in steps if f == 0)
    assert "auto-converge throttled the process with a cgroup v1" in err
    assert isinstance(thr["nr_periods"], int) and thr["nr_periods"] > 0
    assert _leftovers(home, t.pid) == []
    s.done()
    assert s.chan.cmd("check").startswith("ok ")


def test_failed_migration_gives_the_cgroup_back(spawn: Callable[..., Target],
                                                server: Callable[..., Server]) -> None:  # noqa: F811  # fmt: skip
    """The destination built its copy; the source fails before its COMMIT: the original runs on, in
    exactly its own cgroup, and the throttle cgroup is gone."""
    t = _dirtier(spawn)
    before = _tasks(t.pid)
    home = _home_of(t.pid)
    s = server()
    m = subprocess.run(
        _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:5", "--bandwidth", "2MB/s",
              "--auto-converge"),
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(ENV, CKPT_MIGRATE_TEST_FAIL_AT_READY="1"),
    )  # fmt: skip
    assert m.returncode == 1, m.stderr
    assert f"the original process {t.pid} runs on" in m.stderr
    assert (
        "; the CPU throttle (cgroup v1 cpu.cfs_quota_us" in m.stderr and "back in its own cgroup" in m.stderr
    )
    assert _tasks(t.pid) == before and _leftovers(home, t.pid) == []
    assert t.cmd("check").startswith("ok ")


def test_ctrl_c_while_throttled(spawn: Callable[..., Target], server: Callable[..., Server]) -> None:  # noqa: F811
    t = _dirtier(spawn)
    before = _tasks(t.pid)
    home = _home_of(t.pid)
    s = server()
    argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--json", "--policy", "rounds:99999",
                 "--bandwidth", "2MB/s", "--auto-converge")  # fmt: skip
    m = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    assert m.stdout is not None and m.stderr is not None
    try:
        for line in m.stdout:  # until a round has set the throttle
            if float(json.loads(line)["throttle"]) > 0:
                break
        else:
            raise AssertionError(m.stderr.read().decode())
        assert f"{PREFIX}{t.pid}" in (membership(t.pid).v1cpu or "")
        m.send_signal(signal.SIGINT)
        assert m.wait(120) == 130
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    err = m.stderr.read().decode()
    assert f"interrupted; the original process {t.pid} runs on" in err, err
    assert "back in its own cgroup" in err
    assert _tasks(t.pid) == before and _leftovers(home, t.pid) == []
    assert t.cmd("check").startswith("ok ")


def test_duty_cycle_leaves_the_handover_stop_alone(spawn: Callable[..., Target]) -> None:
    """The fallback undoes only its own SIGSTOP: after the final dump the process is stopped for the
    handover, and a SIGCONT from the throttle's close then would let two copies run."""
    t = spawn("cpuhog")
    dc = DutyCycle(t.pid)
    dc.set(0.5)
    dc.pause()  # its own stop, if the cycle was in one, is undone
    assert t.state() != "T"
    os.kill(t.pid, signal.SIGSTOP)  # the final dump leaves it so
    _, status = os.waitpid(t.pid, os.WUNTRACED)  # the test is its parent: woken by the stop itself
    assert os.WIFSTOPPED(status)
    dc.close()
    assert t.state() == "T"
    os.kill(t.pid, signal.SIGCONT)


def test_nested_under_its_own_limited_cgroup(spawn: Callable[..., Target]) -> None:
    """A target in a cgroup with its own CPU limit: the throttle cgroup is made inside that one, so
    the limit still holds while it is throttled, and the target goes back there."""
    t = spawn("cpuhog")
    probe = _v1(t.pid)  # skips where there is no v1 cpu controller
    assert isinstance(probe.impl, CpuMax)
    root_home = probe.impl.home
    probe.close()
    outer = root_home / f"ckpt-test-outer-{t.pid}"
    outer.mkdir()
    try:
        (outer / "cpu.cfs_quota_us").write_text("50000")  # half a CPU
        (outer / "cgroup.procs").write_text(str(t.pid))
        before = _tasks(t.pid)
        assert {m.v1cpu for m in before.values()} == {"/" + str(outer.relative_to(root_home))}
        a = _v1(t.pid)
        q = a.impl
        assert isinstance(q, CpuMax)
        try:
            assert q.home == outer and q.child.parent == outer
            assert q.cpus == 0.5  # what outer allows
            assert t.cmd("burn 20") == "burnt 20"
            a.set(0.2)
            assert q.base is not None and q.base <= 0.5
            assert (outer / "cpu.cfs_quota_us").read_text().strip() == "50000"  # untouched, and above ours
            assert int(_quota(q)[0]) <= 50000
        finally:
            a.close()
        assert _tasks(t.pid) == before and _leftovers(outer, t.pid) == []
    finally:
        t.close()  # empties outer, so that it can be removed
        outer.rmdir()
