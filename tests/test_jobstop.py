"""A process dumped in a job-control stop comes back stopped the same way (ckpt/jobstop.py,
ckpt/restore/jobstop.py; issue 12 A: it came back running).

tests/targets/jobstop.c stops itself (raise) or is stopped by the test, counts the SIGCONTs it gets,
and answers over its pipes. The restores here are made by a small script through the API
(restore_process), which is the restored process's parent: its waitpid(WUNTRACED) must see the stop
with the dumped signal, and waitpid(WCONTINUED) the continue. It tells what it saw on its stderr;
its stdin/stdout are the restored process's (fds 0-2 are the restore's).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt.image import Layer
from ckpt.image.format import TaskRecord
from ckpt.image.validate import MetaError
from ckpt.ptrace import raw
from tests.test_migrate import migrate, server  # noqa: F401
from tests.test_restore import restored  # noqa: F401
from tests.util import ROOT, LineChannel, Target, run_ckpt

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
WAIT = 60.0

API_RESTORE = """
import json, os, sys
from ckpt.api import open_layer
from ckpt.restore import restore_process

def tell(**kw):
    os.write(2, (json.dumps(kw) + "\\n").encode())

rp = restore_process(open_layer(sys.argv[1]))
seen = {}
if rp.stopped:
    _, st = os.waitpid(rp.pid, os.WUNTRACED)
    seen = {"wstopped": os.WIFSTOPPED(st), "wstopsig": os.WSTOPSIG(st) if os.WIFSTOPPED(st) else 0}
tell(pid=rp.pid, stopped=rp.stopped, warnings=rp.warnings, tree=rp.tree, **seen)
if rp.stopped:
    _, st = os.waitpid(rp.pid, os.WCONTINUED)
    tell(continued=os.WIFCONTINUED(st))
_, st = os.waitpid(rp.pid, 0)
tell(exit=os.waitstatus_to_exitcode(st))
"""


def _target(spawn: Callable[..., Target], value: int) -> Target:
    # Its own process group, whose parent (this test) is in another group of the same session: not
    # orphaned, so SIGTSTP stops it (the kernel discards it in an orphaned group).
    return spawn("jobstop", str(value), process_group=0, stderr=subprocess.DEVNULL)


def _state(pid: int, tid: int | None = None) -> str:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    return Path(path).read_text().rsplit(")", 1)[1].split()[0]


def _states(pid: int) -> set[str]:
    return {_state(pid, int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def _traced(pid: int) -> list[int]:
    """The threads of the process that a tracer still holds."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        if int(status.split("TracerPid:", 1)[1].split()[0]):
            out.append(int(tid))
    return out


def _stopped(pid: int) -> int:
    """Wait (as its parent, or the subreaper it was given to) until the process is in a group-stop:
    woken by the stop's report, which stays unconsumed (WNOWAIT) for _still_stopped. The signal."""
    r = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)
    assert r is not None and r.si_code == os.CLD_STOPPED, r
    return r.si_status


def _still_stopped(pid: int, sig: int) -> None:
    """The process (ours) is still in the group-stop of `sig` its parent was told of, never continued
    since, and no thread of it traced. That is all its parent can be told, and all it takes: the
    threads a dump lets go each go back into that stop as they next run (the detach re-arms it),
    with nothing told to the parent (the stop was reported already), so no later event comes to be
    waited for."""
    r = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    assert r is not None and (r.si_code, r.si_status) == (os.CLD_STOPPED, sig), r
    assert os.waitid(os.P_PID, pid, os.WCONTINUED | os.WNOHANG | os.WNOWAIT) is None
    assert _traced(pid) == []


def _stops_unseen(pid: int, sig: int) -> None:
    """Until a process that is not ours (the child of `ckpt restore`, which waits for it without
    WUNTRACED) is in the group-stop of `sig`. Only its parent is told of that stop, and a tracer:
    each thread, seized without an interrupt, reports the group-stop (PTRACE_EVENT_STOP with its
    signal) at once if it is in it, else as it comes. A thread that takes the queued stop signal
    meanwhile reports that signal first and is resumed with it (it then stops the group). Each is
    let go after, back into the stop (the detach re-arms it), as a dump lets it go."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    seized = []
    try:
        for tid in tids:
            raw.seize(tid)
            seized.append(tid)
        for tid in tids:
            while True:
                w = raw.wait(tid, WAIT)
                assert w is not None and w.stopped, f"thread {tid} of {pid}: {w}"
                assert w.sig == sig, f"thread {tid} of {pid} stopped by {w.sig}, not {sig}"
                if w.is_event_stop:
                    break
                raw.cont(tid, sig)  # the stop signal itself, taken now: delivered on
    finally:
        for tid in seized:
            with contextlib.suppress(OSError):
                raw.detach(tid)


def _stopped_original(t: Target) -> int:
    """Wait (as its parent) for the target's stop; the stop signal."""
    sig = _stopped(t.pid)
    assert _states(t.pid) == {"T"}  # (the report comes once every thread is in it)
    return sig


def _dump(pid: int, d: Path, *extra: str) -> Path:
    r = run_ckpt("dump", "--pid", str(pid), "-D", str(d), "--json", *extra, check=True)
    return Path(json.loads(r.stdout)["layer"])


def _killed(t: Target) -> None:
    assert t.proc.wait(WAIT) == -signal.SIGKILL
    t.close()


def _said_stopped(proc: subprocess.Popen[bytes]) -> str:
    """The line of `ckpt restore` (on its stderr) that says it left a process stopped."""
    assert proc.stderr is not None
    seen = []
    while not seen or "left stopped" not in seen[-1]:
        seen.append(proc.stderr.readline().decode())
        assert seen[-1], f"ckpt restore said no 'left stopped': {seen}"
    return seen[-1]


class ApiRestore:
    """API_RESTORE running; `info` is what it first told (the pid, the stop it saw)."""

    def __init__(self, layer: Path, **popen: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", API_RESTORE, str(layer)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=ENV, cwd=ROOT, bufsize=0, **popen,
        )  # fmt: skip
        self.chan = LineChannel(self.proc, WAIT)
        self.info = self.told()
        self.pid = int(self.info["pid"])

    def told(self) -> dict[str, Any]:
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert line.startswith(b"{"), line + self.proc.stderr.read()
        out: dict[str, Any] = json.loads(line)
        return out

    def cmd(self, line: str) -> str:
        return self.chan.cmd(line)

    def close(self, also: list[int]) -> None:
        for p in [*also, getattr(self, "pid", 0)]:
            if p:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.fixture
def api_restore(subreaper: list[int]) -> Iterator[Callable[..., ApiRestore]]:
    started: list[ApiRestore] = []

    def _start(layer: Path, **popen: Any) -> ApiRestore:
        started.append(ApiRestore(layer, **popen))
        return started[-1]

    yield _start
    for r in started:
        # Killed here; reaped by the subreaper fixture (the script, killed too, leaves them to us).
        subreaper.extend([r.pid, *(m["pid"] for m in r.info.get("tree") or [])])
        r.close(subreaper)


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGTSTP])
def test_self_stopped_process_comes_back_stopped(
    tmp_path: Path, spawn: Callable[..., Target], api_restore: Callable[..., ApiRestore], sig: int
) -> None:
    t = _target(spawn, 4242)
    assert t.cmd(f"stop {sig}") == "stopping"
    assert _stopped_original(t) == sig
    layer = _dump(t.pid, tmp_path / "d", "--kill")
    _killed(t)
    assert Layer.open(layer).task.stop == sig
    r = api_restore(layer, process_group=0)
    # Its parent sees a real group-stop, with the dumped signal, and every thread is in it.
    assert (r.info["stopped"], r.info["wstopped"], r.info["wstopsig"]) == (sig, True, sig)
    assert r.info["warnings"] == []
    assert _states(r.pid) == {"T"}
    assert _states(r.pid) == {"T"}  # (reported, and still stopped)
    os.kill(r.pid, signal.SIGCONT)
    assert r.told() == {"continued": True}
    # raise() returns; its SIGCONT handler ran once; its memory is the dumped one.
    assert r.chan.readline() == "resumed conts 1 value 4242"
    assert r.cmd("ping") == "pong conts 1 value 4242"
    r.chan.send("exit")
    assert r.told() == {"exit": 0}


def test_stopped_in_a_syscall_with_threads_through_a_chain(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Any],  # noqa: F811
) -> None:
    """SIGTSTP from outside while every thread is blocked (read, pause); a dump leaves it stopped,
    an incremental one records the stop too; `ckpt restore` of the chain says it left the process
    stopped, and SIGCONT lets each thread go back into its syscall."""
    t = _target(spawn, 77)
    assert t.cmd("threads 3") == "threads 3"
    os.kill(t.pid, signal.SIGTSTP)
    assert _stopped_original(t) == signal.SIGTSTP
    d = tmp_path / "d"
    first = _dump(t.pid, d)
    _still_stopped(t.pid, signal.SIGTSTP)  # the dump did not continue it
    layer = _dump(t.pid, d, "--incremental", "--kill")
    _killed(t)
    assert [Layer.open(p).task.stop for p in (first, layer)] == [signal.SIGTSTP, signal.SIGTSTP]
    merged = tmp_path / "merged.ckpt"
    run_ckpt("merge", str(layer), "-o", str(merged), check=True)
    assert Layer.open(merged).task.stop == signal.SIGTSTP  # a merge carries it (the top's)
    r = restored(layer)
    line = _said_stopped(r.proc)
    pid = int(line.split()[2])
    said = f"ckpt: process {pid} left stopped (SIGTSTP), as it was dumped: kill -CONT {pid} continues it\n"
    assert line == said
    r.set_pid(pid)
    _stops_unseen(pid, signal.SIGTSTP)  # (let go with its stop signal queued: it stops as it runs)
    assert len(os.listdir(f"/proc/{pid}/task")) == 4
    os.kill(pid, signal.SIGCONT)
    assert r.cmd("ping") == "pong conts 1 value 77"
    r.send("exit")
    assert r.wait() == 0


def test_running_process_comes_back_running(
    tmp_path: Path, spawn: Callable[..., Target], api_restore: Callable[..., ApiRestore]
) -> None:
    t = _target(spawn, 5)
    assert t.cmd("ping") == "pong conts 0 value 5"
    layer = _dump(t.pid, tmp_path / "d", "--kill")
    _killed(t)
    assert Layer.open(layer).task.stop == 0
    r = api_restore(layer, process_group=0)
    assert r.info["stopped"] == 0
    assert r.cmd("ping") == "pong conts 0 value 5"
    r.chan.send("exit")
    assert r.told() == {"exit": 0}


def test_tree_with_a_stopped_child(
    tmp_path: Path, spawn: Callable[..., Target], api_restore: Callable[..., ApiRestore]
) -> None:
    """The child of a tree is stopped (SIGTSTP), its parent runs: restored so, and the restored
    parent's own waitpid(WUNTRACED) sees its restored child's stop."""
    t = _target(spawn, 9)
    child = int(t.cmd(f"child {int(signal.SIGTSTP)}").split()[1])
    assert _states(child) == {"T"}
    layer = _dump(t.pid, tmp_path / "d", "--kill")
    _killed(t)
    os.waitpid(child, 0)  # (ours, by the subreaper fixture): its pid is free for the restore
    r = api_restore(layer, process_group=0)
    stopped = {m["dumped_pid"]: m["stopped"] for m in r.info["tree"]}
    assert stopped == {t.pid: 0, child: signal.SIGTSTP}
    kid = next(m["pid"] for m in r.info["tree"] if m["dumped_pid"] == child)
    assert r.info["stopped"] == 0
    # Let go with its stop signal queued, it stops as it next runs: its parent's waitpid(WUNTRACED)
    # is woken by that stop.
    assert r.cmd("waitchild") == f"child stopped {int(signal.SIGTSTP)}", r.info
    assert _states(kid) == {"T"}
    os.kill(kid, signal.SIGCONT)
    assert r.chan.readline() == "child resumed conts 1"
    assert r.cmd("waitchild") == "child continued"
    assert r.cmd("ping") == "pong conts 0 value 9"


def test_sigtstp_in_an_orphaned_group_becomes_sigstop(
    tmp_path: Path, spawn: Callable[..., Target], api_restore: Callable[..., ApiRestore]
) -> None:
    """Restored in a new session (an orphaned process group, where the kernel discards SIGTSTP), the
    process is stopped with SIGSTOP, and the restore says so."""
    t = _target(spawn, 3)
    assert t.cmd(f"stop {int(signal.SIGTSTP)}") == "stopping"
    _stopped_original(t)
    layer = _dump(t.pid, tmp_path / "d", "--kill")
    _killed(t)
    r = api_restore(layer, start_new_session=True)
    assert (r.info["stopped"], r.info["wstopsig"]) == (signal.SIGSTOP, signal.SIGSTOP)
    assert any("orphaned" in w and "SIGTSTP" in w for w in r.info["warnings"]), r.info["warnings"]
    os.kill(r.pid, signal.SIGCONT)
    assert r.told() == {"continued": True}
    assert r.chan.readline() == "resumed conts 1 value 3"


def test_layer_field() -> None:
    """Older layers have no `stop`: running. Only a stop signal is a valid one."""
    assert TaskRecord.from_dict(TaskRecord().to_dict()).stop == 0
    assert "stop" not in TaskRecord().to_dict()
    d = TaskRecord(stop=signal.SIGTTIN).to_dict()
    assert TaskRecord.from_dict(d).stop == signal.SIGTTIN
    with pytest.raises(MetaError, match=r"task\.stop: 9 is not a stop signal"):
        TaskRecord.from_dict(dict(d, stop=int(signal.SIGKILL)))


def test_a_stop_of_ckpt_own_is_not_recorded(
    tmp_path: Path, spawn: Callable[..., Target], api_restore: Callable[..., ApiRestore]
) -> None:
    """`dump --leave-stopped` stops a running process with ckpt's SIGSTOP: its layer records it
    running, and so does the next dump of the chain, which finds it in that stop; restored, it runs.
    A process the user had stopped is another matter: recorded stopped, and not ckpt's."""
    t = _target(spawn, 11)
    d = tmp_path / "d"
    first = _dump(t.pid, d, "--leave-stopped")
    assert _stopped(t.pid) == signal.SIGSTOP  # (its SIGSTOP queued at the thaw: taken as it runs)
    second = _dump(t.pid, d, "--incremental")
    _still_stopped(t.pid, signal.SIGSTOP)  # (the dump left ckpt's stop as it was)
    third = _dump(t.pid, d, "--incremental", "--kill")
    _killed(t)
    tasks = [Layer.open(p).task for p in (first, second, third)]
    assert [(k.stop, k.ckpt_stopped) for k in tasks] == [(0, True)] * 3
    r = api_restore(third, process_group=0)
    assert r.info["stopped"] == 0
    assert r.cmd("ping") == "pong conts 0 value 11"

    u = _target(spawn, 12)
    os.kill(u.pid, signal.SIGSTOP)
    _stopped_original(u)
    layer = _dump(u.pid, tmp_path / "u", "--leave-stopped")
    _still_stopped(u.pid, signal.SIGSTOP)
    k = Layer.open(layer).task
    assert (k.stop, k.ckpt_stopped) == (signal.SIGSTOP, False)
    os.kill(u.pid, signal.SIGCONT)
    assert u.cmd("ping") == "pong conts 1 value 12"


def test_migrate_that_fails_leaves_a_stopped_process_in_its_stop(
    spawn: Callable[..., Target],
    server: Callable[..., Any],  # noqa: F811
) -> None:
    """A process in a job-control stop (SIGTSTP, Ctrl-Z) is migrated, no longer refused: the image
    carries the stop, and a failure continues only a stop that is ckpt's (ptrace/freeze.thaw_all,
    migrate/source._let_go). This one is the test's: after the failure it is still in it, and
    continues as it would have (tests/test_migrate_stopped.py: the other paths and the commit)."""
    t = _target(spawn, 1)
    os.kill(t.pid, signal.SIGTSTP)
    assert _stopped_original(t) == signal.SIGTSTP
    s = server()
    env = dict(os.environ, PYTHONPATH=str(ROOT), CKPT_MIGRATE_TEST_FAIL_AT_READY="1")
    argv = [sys.executable, "-m", "ckpt", "migrate", "--pid", str(t.pid), "--to", s.addr]
    argv += ["--policy", "rounds:1"]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 1
    assert f"the original process {t.pid} stays stopped, as someone else stopped it" in p.stderr, p.stderr
    _still_stopped(t.pid, signal.SIGTSTP)
    os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("ping") == "pong conts 1 value 1"


def test_duty_cycle_stops_are_not_recorded(
    spawn: Callable[..., Target],
    server: Callable[..., Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`migrate --auto-converge` with the SIGSTOP/SIGCONT duty cycle (the fallback, forced): the
    cycle's stops are lifted before each freeze looks, so no layer records a stop and the copy runs."""
    monkeypatch.setenv("CKPT_MIGRATE_TEST_THROTTLE", "duty")
    t = spawn("dirtier", "512", "300", stderr=subprocess.DEVNULL)
    s = server()
    rc, lines, err = migrate(t.pid, s.addr, "--policy", "rounds:5", "--bandwidth", "2MB/s", "--auto-converge")
    assert rc == 0, err
    assert "auto-converge throttled the process with a SIGSTOP/SIGCONT duty cycle" in err, err
    assert any(str(ln.get("throttle_setting", "")).startswith("stopped ") for ln in lines), lines
    s.done()
    layers = sorted(s.dir.glob("layer-*.ckpt"))
    assert len(layers) == 6
    assert [Layer.open(p).task.stop for p in layers] == [0] * 6
    assert s.chan.cmd("check").startswith("ok ")
    assert _state(s.pid) in ("S", "R")


def test_detach_warns_when_its_exit_would_orphan_the_group(
    tmp_path: Path, spawn: Callable[..., Target], subreaper: list[int]
) -> None:
    """`ckpt restore --detach` run as a job of its own (a shell's): the restored process is in ckpt's
    group, which ckpt's exit leaves orphaned, where the kernel sends SIGHUP and SIGCONT to a group
    holding a stopped process: said. (Here this test, a subreaper of the same session, adopts it:
    the group is not orphaned, and the process stays stopped.)"""
    t = _target(spawn, 8)
    assert t.cmd(f"stop {int(signal.SIGSTOP)}") == "stopping"
    _stopped_original(t)
    layer = _dump(t.pid, tmp_path / "d", "--kill")
    _killed(t)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=ENV, cwd=ROOT, bufsize=0, process_group=0,
    )  # fmt: skip
    try:
        chan = LineChannel(p, WAIT)
        pid = int(chan.readline())
        subreaper.append(pid)
        assert p.wait(WAIT) == 0
        assert p.stderr is not None
        err = p.stderr.read().decode()
        assert f"process {pid} left stopped (SIGSTOP), as it was dumped" in err, err
        assert "ckpt's exit leaves its process group orphaned" in err, err
        # Ours since ckpt exited (the subreaper): its stop's report, which ckpt never took, with it.
        assert _stopped(pid) == signal.SIGSTOP
        assert _states(pid) == {"T"}
        os.kill(pid, signal.SIGCONT)
        assert chan.readline() == "resumed conts 1 value 8"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
        for f in (p.stdin, p.stdout, p.stderr):
            if f:
                f.close()
