"""The cgroup v2 freezer's duty cycle (cgthrottle.FreezeCycle): auto-converge without job control,
chosen where no CPU quota can be set, before the SIGSTOP/SIGCONT cycle. A SIGSTOP of someone else's
that comes while the target is frozen stays pending and stops it at the thaw (the signals' cycle
would have discarded it with its SIGCONT); a target already stopped stays stopped; the guard of a
SIGKILLed ckpt thaws it, puts it back into its own cgroup and removes the child; a real
`ckpt migrate --auto-converge` (CKPT_MIGRATE_TEST_THROTTLE=freeze: the quotas not tried) throttles
with it across rounds and gives everything back on Ctrl-C.

Deterministic: the cycle's period is an hour where the test needs it frozen; each freeze is waited
for on cgroup.events (poll POLLPRI), each stop with waitid (the target is the test's child)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.migrate.cgthrottle import PREFIX, AutoConverge, FreezeCycle, membership
from ckpt.migrate.guard import empty_cgroup
from ckpt.migrate.throttle import DutyCycle
from tests.test_cgthrottle_guard import WAIT, _exited, _tasks
from tests.test_migrate import ENV, ROOT, Server, _ckpt, server
from tests.util import Target

__all__ = ["server"]  # the fixture, used by name

HOUR = 3600.0


def _frozen(child: Path) -> None:
    """Until cgroup `child` says every task in it is frozen (cgroup.events, notified by POLLPRI)."""
    fd = os.open(child / "cgroup.events", os.O_RDONLY)
    try:
        p = select.poll()
        p.register(fd, select.POLLPRI)
        while b"frozen 1" not in os.pread(fd, 256, 0):
            assert p.poll(WAIT * 1000), f"{child} not frozen within {WAIT}s"
    finally:
        os.close(fd)


def _in_stop(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT) is not None


def _cycle(t: Target) -> FreezeCycle:
    why: list[str] = []
    f = FreezeCycle.choose([t.pid], why)
    if f is None:
        pytest.skip(f"no cgroup v2 freezer here: {why}")
    return f


def _remove(child: Path) -> None:
    """A child the code under test failed to remove: removed here (the machine is reused)."""
    if child.exists():
        with contextlib.suppress(OSError):
            (child / "cgroup.freeze").write_text("0")
        empty_cgroup(str(child), str(child.parent), False)
        with contextlib.suppress(OSError):
            child.rmdir()


def _leftovers(home: Path, pid: int) -> list[str]:
    return [d.name for d in home.iterdir() if d.name.startswith(f"{PREFIX}{pid}.")]


@pytest.mark.parametrize("when", ["while-frozen", "before"])
def test_a_stop_of_someone_else_is_never_undone(spawn: Callable[..., Target], when: str) -> None:
    t = spawn("cpuhog")
    before = _tasks(t.pid)
    if when == "before":
        os.kill(t.pid, signal.SIGSTOP)
        assert t.stopped_state() == "T"
    f = _cycle(t)
    f.PERIOD = HOUR
    try:
        try:
            f.set(0.5)
            assert membership(t.pid).v2 != before[t.pid].v2  # in the child
            _frozen(f.child)  # (a stopped task counts as frozen)
            if when == "while-frozen":
                assert t.state() != "T"  # frozen is no job-control stop
                os.kill(t.pid, signal.SIGSTOP)  # pending while frozen
        finally:
            f.pause()
        assert t.stopped_state() == "T"  # taken at the thaw (or still in effect): never discarded
    finally:
        f.close()  # (nothing left on the machine, whatever failed)
    assert f.left is None and not f.child.exists() and _leftovers(f.home, t.pid) == []
    assert _tasks(t.pid) == before and _in_stop(t.pid)
    assert f.report() == {"cgroup": str(f.child), "periods_frozen": 1}
    os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("burn 1") == "burnt 1"


STANDIN = """
import json, sys
from ckpt.migrate.cgthrottle import FreezeCycle
from ckpt.migrate.guard import Guard
pid = int(sys.argv[1])
g = Guard([pid])
f = FreezeCycle.choose([pid], [], g)
f.PERIOD = float(sys.argv[2])
f.set(0.5)
print(json.dumps({"guard": g.proc.pid, "child": str(f.child)}), flush=True)
sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stop-pending"])
def test_guard_thaws_and_gives_back(spawn: Callable[..., Target], stopped: bool) -> None:
    """ckpt (a stand-in) SIGKILLed while the target is frozen: the guard thaws it, back into its own
    cgroup, the child removed; a SIGSTOP sent while frozen takes effect then, as it would have."""
    t = spawn("cpuhog")
    before = _tasks(t.pid)
    _cycle(t).close()  # (skips where there is no freezer)
    p = subprocess.Popen([sys.executable, "-c", STANDIN, str(t.pid), str(HOUR)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)  # fmt: skip
    child: Path | None = None
    child_left = True
    try:
        assert p.stdout is not None
        info = json.loads(p.stdout.readline())
        child = Path(info["child"])
        _frozen(child)
        if stopped:
            os.kill(t.pid, signal.SIGSTOP)
        p.kill()
        p.wait()
        _exited(int(info["guard"]))
        child_left = child.exists()
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
        if child is not None:
            _remove(child)
    assert _tasks(t.pid) == before and not child_left
    if stopped:
        assert t.stopped_state() == "T"
        os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("burn 1") == "burnt 1"


def test_a_real_migration_throttles_with_the_freezer(
    spawn: Callable[..., Target], server: Callable[..., Server]
) -> None:
    """Rounds on a link too slow for the target: the freezer throttles it (its rounds' freezes thaw
    it first); a Ctrl-C gives the target back, running, in its own cgroup, nothing left."""
    t: Target = spawn("dirtier", "512", "300", stderr=subprocess.DEVNULL)
    before = _tasks(t.pid)
    _cycle(t).close()
    s = server()
    argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--json", "--policy", "rounds:99999",
                 "--bandwidth", "2MB/s", "--auto-converge")  # fmt: skip
    m = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         env=dict(ENV, CKPT_MIGRATE_TEST_THROTTLE="freeze"))  # fmt: skip
    try:
        assert m.stdout is not None and m.stderr is not None
        settings = []
        for line in m.stdout:
            rep = json.loads(line)
            settings.append(rep["throttle_setting"])
            if float(rep["throttle"]) > 0 and len(settings) >= 2 and settings[-2] != "no limit":
                break  # throttled, and one more round went through the freezer's pause and resume
        else:
            raise AssertionError(m.stderr.read().decode())
        assert settings[-1].startswith("frozen ") and settings[-1].endswith(" ms of every 100 ms")
        m.send_signal(signal.SIGINT)
        assert m.wait(WAIT) == 130
        err = m.stderr.read().decode()
    finally:
        if m.poll() is None:
            m.kill()
        m.communicate()
    assert f"interrupted; the original process {t.pid} runs on" in err, err
    assert "cgroup v2 freezer duty cycle" in err and "back in its own cgroup" in err
    assert _tasks(t.pid) == before and t.state() != "T"
    assert t.cmd("check").startswith("ok ")


NOFILE = """
import json, os, resource, sys
from ckpt.migrate.cgthrottle import FreezeCycle
pid = int(sys.argv[1])
f = FreezeCycle.choose([pid], [])
assert f is not None
f.PERIOD = 3600.0
f.set(0.5)  # into the child
f.pause()
fd = os.open("/dev/null", os.O_RDONLY)  # the lowest free descriptor: from it on, every open fails
os.close(fd)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (fd, hard))
f.resume()  # the cycle's thread cannot open cgroup.events (EMFILE)
f.pause()
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
f.close()
print(json.dumps({"halted": f.halted, "left": f.left, "child": str(f.child)}), flush=True)
"""


def test_a_cycle_that_cannot_open_its_events_halts_and_says_why(spawn: Callable[..., Target]) -> None:
    """The cycle's thread fails to open cgroup.events (no descriptor left: RLIMIT_NOFILE): the cycle
    halts and says why (the round's setting), no traceback from the thread, the target back in its
    own cgroup, running, the child removed."""
    t = spawn("cpuhog")
    before = _tasks(t.pid)
    _cycle(t).close()  # (skips where there is no freezer)
    p = subprocess.run([sys.executable, "-c", NOFILE, str(t.pid)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=WAIT)  # fmt: skip
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    out = json.loads(p.stdout)
    assert out["halted"] == "the freezer failed: Too many open files", out
    assert out["left"] is None and not Path(out["child"]).exists()
    assert _tasks(t.pid) == before and t.state() != "T"
    assert t.cmd("burn 1") == "burnt 1"


def test_a_freezer_that_fails_gives_way_to_the_signals_cycle(
    spawn: Callable[..., Target], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--auto-converge's throttle on the freezer, whose cgroup is removed under it between two rounds
    (its process moved out first, as a supervisor may): the cycle's thread fails as it starts again
    and stops, the round's setting says why, and the next round's resume hands the throttle to the
    SIGSTOP/SIGCONT cycle, said in not_used. The end gives everything back."""
    t = spawn("cpuhog")
    before = _tasks(t.pid)
    _cycle(t).close()  # (skips where there is no freezer)
    monkeypatch.setenv("CKPT_MIGRATE_TEST_THROTTLE", "freeze")  # (the quotas not tried)
    ac = AutoConverge([t.pid])
    f = ac.impl
    try:
        assert isinstance(f, FreezeCycle)
        f.PERIOD = HOUR
        ac.set(0.5)
        _frozen(f.child)
        ac.pause()  # a round's freeze: thawed, the cycle's thread ended
        empty_cgroup(str(f.child), str(f.home), False)
        f.child.rmdir()
        ac.resume()  # its thread cannot open the child's cgroup.events: it ends at once, saying why
        ac.pause()
        gone = "the freezer failed: No such file or directory"
        assert (ac.setting, ac.halted) == (f"none: {gone}", gone)
        ac.resume()  # the next round
        assert isinstance(ac.impl, DutyCycle) and ac.mechanism == "SIGSTOP/SIGCONT duty cycle"
        assert ac.not_used[-1] == f"{f.mechanism}: failed while throttling: {gone}"
        assert (ac.setting, ac.halted) == ("stopped 50 ms of every 100 ms", "")
        assert t.stopped_state()  # (woken by the cycle's first SIGSTOP)
    finally:
        ac.close()
    assert f.closed and f.left is None and _leftovers(f.home, t.pid) == []
    assert _tasks(t.pid) == before and t.state() != "T"
    assert t.cmd("burn 1") == "burnt 1"
