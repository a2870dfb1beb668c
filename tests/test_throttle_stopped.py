"""The auto-converge throttle never ends a stop of someone else's (issue 10, throttle.py DutyCycle,
guard.stopped_by_another): a target the test stopped before the cycle runs, or while the cycle's own
SIGSTOP holds it (the test's SIGSTOP then waits pending, and the cycle's SIGCONT would discard it),
stays stopped: the cycle ends and says so. Its guard, after a SIGKILL of ckpt while the cycle (or
the cgroup quota) throttles, leaves it stopped too.

Deterministic: the cycle's period is made an hour long, so that its stop lasts until the test ends
it (pause, or the SIGKILL); the test waits for each stop with waitid (the target is its child)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from ckpt.migrate.cgthrottle import FreezeCycle
from ckpt.migrate.throttle import DutyCycle
from tests.test_cgthrottle_guard import WAIT, Started, _exited, _tasks, standin
from tests.test_freeze_throttle import _frozen
from tests.test_migrate import ENV, ROOT
from tests.util import Target

__all__ = ["standin"]  # the fixture, used by name

HOUR = 3600.0  # the cycle's period in these tests: its stop lasts until the test ends it


def _in_stop(pid: int) -> bool:
    """Whether our child's group-stop is in effect (not ended by a SIGCONT), asked without waiting."""
    return os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT) is not None


def _stop(t: Target) -> None:
    os.kill(t.pid, signal.SIGSTOP)
    assert t.stopped_state() == "T"


def _runs_after_cont(t: Target) -> None:
    os.kill(t.pid, signal.SIGCONT)  # (the stopper's own)
    assert t.cmd("burn 1") == "burnt 1"


def test_stopped_before_the_cycle_is_left_stopped(spawn: Callable[..., Target]) -> None:
    """In a stop before the cycle's first SIGSTOP: the cycle never sends one, ends, says so."""
    t = spawn("cpuhog")
    _stop(t)
    d = DutyCycle([t.pid])
    d.set(0.5)
    assert d._thread is not None
    d._thread.join(WAIT)  # it ends by itself at its first look
    assert not d._thread.is_alive()
    assert d.halted.startswith(f"process {t.pid} was stopped by someone else"), d.halted
    assert d.setting == f"none: {d.halted}"
    d.close()
    assert _in_stop(t.pid)
    d.resume()  # (no more cycling once halted)
    assert d._thread is None and _in_stop(t.pid)
    _runs_after_cont(t)


def test_stop_sent_inside_the_cycles_stop_is_kept(spawn: Callable[..., Target]) -> None:
    """The cycle's SIGSTOP holds the target; the test's SIGSTOP comes then (pending). pause() ends
    only the cycle's own stop, so it sends no SIGCONT at all, and says why."""
    t = spawn("cpuhog")
    d = DutyCycle([t.pid])
    d.PERIOD = HOUR
    d.set(0.5)
    try:
        assert t.stopped_state() == "T"  # the cycle's stop
        os.kill(t.pid, signal.SIGSTOP)
    finally:
        d.pause()
    assert "a stop signal sent while the duty cycle had it stopped" in d.halted, d.halted
    assert _in_stop(t.pid)
    _runs_after_cont(t)


def test_a_sigstop_on_its_way_is_not_merged_with_the_cycles(spawn: Callable[..., Target]) -> None:
    """Someone else's SIGSTOP pending, not yet taken, when the cycle would send its own (the target
    cannot take it: frozen by the cgroup freezer here, as a syscall that takes no signal holds it
    elsewhere): the kernel would merge the two, and the cycle's SIGCONT would end both. The cycle
    sends none, halts at its first look and says why; the SIGSTOP takes effect once it can."""
    t = spawn("cpuhog")
    why: list[str] = []
    f = FreezeCycle.choose([t.pid], why)
    if f is None:
        pytest.skip(f"no cgroup v2 freezer here to hold the SIGSTOP pending: {why}")
    f.PERIOD = HOUR
    d = DutyCycle([t.pid])
    d.PERIOD = HOUR
    try:
        f.set(0.5)
        _frozen(f.child)
        os.kill(t.pid, signal.SIGSTOP)  # pending: a frozen task takes no signal
        assert t.state() != "T"
        d.set(0.5)
        assert d._thread is not None
        d._thread.join(WAIT)  # it ends by itself at its first look
        assert not d._thread.is_alive()
    finally:
        f.close()  # thawed (back in its own cgroup, the child removed): the SIGSTOP is taken
        d.pause()
    assert "a SIGSTOP of someone else's pending, not yet taken" in d.halted, d.halted
    assert f.left is None and t.stopped_state() == "T" and _in_stop(t.pid)
    _runs_after_cont(t)


def test_the_cycles_own_stop_is_still_undone(spawn: Callable[..., Target]) -> None:
    """No stop of anyone else's: pause() continues the target (the rule takes nothing from that)."""
    t = spawn("cpuhog")
    d = DutyCycle([t.pid])
    d.PERIOD = HOUR
    d.set(0.5)
    assert t.stopped_state() == "T"
    d.pause()
    assert d.halted == "" and not _in_stop(t.pid)
    assert t.cmd("burn 1") == "burnt 1"


STANDIN = """
import json, sys
from ckpt.migrate.guard import Guard
from ckpt.migrate.cgthrottle import FreezeCycle
from ckpt.migrate.throttle import DutyCycle
from tests.test_freeze_throttle import _frozen
pid = int(sys.argv[1])
g = Guard([pid])
d = DutyCycle([pid], g)
d.PERIOD = float(sys.argv[2])
d.set(0.5)
print(json.dumps({"guard": g.proc.pid}), flush=True)
sys.stdin.read()  # until killed
"""


def test_guard_keeps_a_stop_sent_inside_the_cycles_stop(spawn: Callable[..., Target]) -> None:
    """ckpt (a stand-in running the duty cycle) SIGKILLed while the cycle's stop holds the target and
    the test's SIGSTOP waits on it: the guard undoes the throttle without a SIGCONT."""
    t = spawn("cpuhog")
    p = subprocess.Popen([sys.executable, "-c", STANDIN, str(t.pid), str(HOUR)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)  # fmt: skip
    try:
        assert p.stdout is not None
        guard = int(json.loads(p.stdout.readline())["guard"])
        assert t.stopped_state() == "T"  # the cycle's stop
        os.kill(t.pid, signal.SIGSTOP)
        p.kill()
        p.wait()
        _exited(guard)
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
    assert _in_stop(t.pid)
    _runs_after_cont(t)


def test_guard_of_a_cgroup_throttle_keeps_the_stop(
    spawn: Callable[..., Target], standin: Callable[..., Started]
) -> None:
    """A cgroup quota throttles the target, which the test then stops; ckpt SIGKILLed: the guard
    puts it back into its own cgroup and leaves it stopped."""
    t = spawn("cpuhog")
    before = _tasks(t.pid)
    p, info = standin(t.pid, 0.5)
    if info["cg"] is None:
        pytest.skip(f"no cgroup quota here ({info['mechanism']})")
    _stop(t)
    p.kill()
    p.wait()
    _exited(int(info["guard"]))  # type: ignore[call-overload]
    assert _tasks(t.pid) == before and _in_stop(t.pid)
    _runs_after_cont(t)
