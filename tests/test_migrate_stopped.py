"""A migration never ends a stop of someone else's (issue 10): a target stopped with SIGSTOP (as a
shell's Ctrl-Z or a debugger does) before the migration or between its live rounds stays stopped
when the migration fails (the source gives it back itself, or its guard after a SIGKILL of ckpt),
and its copy comes back stopped when the migration commits. Only the stop ckpt made is undone
(ckpt.ptrace.freeze.thaw_all, guard.stopped_by_another, source._let_go).

Deterministic: the test stops its own child and waits for the stop (waitid WSTOPPED|WNOWAIT),
between live rounds where ckpt pauses for it (CKPT_MIGRATE_TEST_PAUSE=live-0, testhold.py);
ckpt fails by itself at READY (CKPT_MIGRATE_TEST_FAIL_AT_READY), or its destination is killed once
it holds the final layer, or ckpt is SIGKILLed once its final dump is out (HOLD=final-footer)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.test_cgthrottle_guard import _exited, _guard_of
from tests.test_migrate import ENV, ROOT, Server, _ckpt, _rounds, _state, _uffds, server
from tests.test_migrate_guard_final import WAIT, _kill
from tests.util import LineChannel, Target

__all__ = ["server"]  # the fixture, used by name


def _stop(t: Target) -> None:
    """SIGSTOP to our child, returned once it is in its group-stop."""
    os.kill(t.pid, signal.SIGSTOP)
    assert t.stopped_state() == "T"


def _waitstop(pid: int) -> None:
    """Until our child (an orphan of serve, the test a subreaper) `pid` is in a group-stop."""
    done = threading.Event()

    def wait() -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    assert done.wait(WAIT), f"{pid} did not stop (state {_state(pid)})"


def _in_stop(pid: int) -> bool:
    """Whether our child's group-stop is in effect (not ended by a SIGCONT), asked without waiting.
    (Not its state letter: a thread let go by a ptrace detach goes back into the stop running.)"""
    return os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT) is not None


def _line(f: object) -> str:
    line = f.readline()  # type: ignore[attr-defined]
    return line.decode().strip() if isinstance(line, bytes) else str(line).strip()


@pytest.fixture
def migrating() -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], object, object]]]:
    """`ckpt migrate` started with the test hooks; (process, hold-fd reader, pause-fd writer)."""
    started: list[subprocess.Popen[bytes]] = []
    files: list[object] = []

    def start(pid: int, addr: str, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], object, object]:
        hr, hw = os.pipe()
        pr, pw = os.pipe()
        e = dict(ENV, CKPT_MIGRATE_TEST_HOLD_FD=str(hw), CKPT_MIGRATE_TEST_PAUSE_FD=str(pr), **env)
        m = subprocess.Popen(
            _ckpt("migrate", "--pid", str(pid), "--to", addr, "--json", *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, cwd=ROOT, pass_fds=(hw, pr),
        )  # fmt: skip
        os.close(hw)
        os.close(pr)
        started.append(m)
        holds, pause = os.fdopen(hr, "rb"), os.fdopen(pw, "wb", buffering=0)
        files.extend((holds, pause))
        return m, holds, pause

    yield start
    for m in started:
        if m.poll() is None:
            m.kill()
        m.communicate()
    for f in files:
        f.close()  # type: ignore[attr-defined]


def _kept_stopped(t: Target, ref: Target, untracked: bool = True) -> None:
    """Still in the stop of someone else's, untracked (by ckpt itself: a guard cannot take the
    tracker out); runs on right once they continue it."""
    assert _in_stop(t.pid), f"the original {t.pid}, stopped by the test, was continued"
    assert t.tracer() == 0 and (_uffds(t.pid) == 0 or not untracked)
    os.kill(t.pid, signal.SIGCONT)  # (the stopper's own)
    assert t.cmd("round") == ref.cmd("round")


@pytest.mark.parametrize("how", ["fails-at-ready", "destination-killed"])
def test_stopped_between_live_rounds_stays_stopped(
    spawn: Callable[..., Target], server: Callable[..., Server], migrating: Callable[..., tuple], how: str
) -> None:
    t, ref = _rounds(spawn, "512"), _rounds(spawn, "512")
    env = {"CKPT_MIGRATE_TEST_PAUSE": "live-0"}
    if how == "fails-at-ready":
        env["CKPT_MIGRATE_TEST_FAIL_AT_READY"] = "1"
        s = server()
    else:
        s = server(env=dict(ENV, CKPT_SERVE_HOLD_BEFORE_RESTORE="1"))
    m, holds, pause = migrating(t.pid, s.addr, "--policy", "rounds:2", **env)
    assert _line(holds) == "live-0"  # round 0 sent; the target runs, tracked
    _stop(t)  # stopped by someone else before ckpt's final freeze
    pause.write(b"g")
    if how == "destination-killed":
        while not s.event("layer")["final"]:
            pass
        s.proc.kill()
    assert m.wait(WAIT) == 1
    assert m.stderr is not None
    err = m.stderr.read().decode()
    assert f"the original process {t.pid} stays stopped, as someone else stopped it" in err, err
    assert f"kill -CONT {t.pid} continues it" in err and "Traceback" not in err
    _kept_stopped(t, ref)


def test_stopped_before_migration_is_copied_stopped(
    spawn: Callable[..., Target], server: Callable[..., Server]
) -> None:
    """A migration that commits: the copy is in the same stop (SIGSTOP, as the dump recorded it),
    the original is gone, and the copy runs on right once continued."""
    t, ref = _rounds(spawn, "512"), _rounds(spawn, "512")
    assert t.cmd("round") == ref.cmd("round")
    _stop(t)
    s = server()
    argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--json", "--policy", "rounds:1")
    m = subprocess.run(argv, capture_output=True, env=ENV, cwd=ROOT, timeout=WAIT)
    assert m.returncode == 0, m.stderr.decode()
    final = json.loads(m.stdout.decode().splitlines()[-1])
    new = s.done()
    assert new == final["pid"] and new != t.pid
    assert t.proc.wait(WAIT) == -signal.SIGKILL  # exactly one copy
    _waitstop(new)
    assert _state(new) == "T"
    os.kill(new, signal.SIGCONT)
    mig = LineChannel(s.proc, 60)
    assert mig.cmd("round") == ref.cmd("round")


def test_guard_leaves_a_stop_of_someone_else(
    spawn: Callable[..., Target], server: Callable[..., Server], migrating: Callable[..., tuple]
) -> None:
    """ckpt SIGKILLed once its final dump is out (its guard in "handover"): the guard continues only
    a stop ckpt made, and this one is the test's."""
    t, ref = _rounds(spawn, "512"), _rounds(spawn, "512")
    _stop(t)
    s = server()
    m, holds, _ = migrating(t.pid, s.addr, "--policy", "rounds:1", CKPT_MIGRATE_TEST_HOLD="final-footer")
    assert _line(holds) == "final-footer"
    guard = _guard_of(m.pid)
    _kill(m)
    _exited(guard)
    assert s.proc.wait(WAIT) == 1  # no COMMIT: the destination dropped its copy
    _kept_stopped(t, ref, untracked=False)


def test_stop_during_ckpts_own_stop_is_kept(
    spawn: Callable[..., Target], server: Callable[..., Server], migrating: Callable[..., tuple]
) -> None:
    """The target was running; the final dump stops it (ckpt's SIGSTOP), then the test stops it too
    (its SIGSTOP stays pending). The failure's SIGCONT would discard it: ckpt leaves it stopped."""
    t, ref = _rounds(spawn, "512"), _rounds(spawn, "512")
    s = server()
    m, holds, pause = migrating(t.pid, s.addr, "--policy", "rounds:1", CKPT_MIGRATE_TEST_FAIL_AT_READY="1",
                                CKPT_MIGRATE_TEST_PAUSE="final-footer")  # fmt: skip
    assert _line(holds) == "final-footer"
    assert t.stopped_state() == "T"  # ckpt's hand-over stop
    os.kill(t.pid, signal.SIGSTOP)  # pending: the process is stopped already
    pause.write(b"g")
    assert m.wait(WAIT) == 1
    assert m.stderr is not None
    err = m.stderr.read().decode()
    assert f"the original process {t.pid} stays stopped, as someone else stopped it" in err, err
    _kept_stopped(t, ref)
