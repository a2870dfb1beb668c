"""A restored thread that was dumped inside a blocking syscall is back inside it, never having run
a user-mode instruction, when `ckpt restore --detach` says the process runs (issue 12 A, issue 9
part 4; ckpt/restore/resume.py).

Before, such a thread was let go to re-enter its syscall from user mode: a signal that came in
between ran its handler first, and pause() then slept for ever where the original's returned EINTR
(tests/test_restore_tree.py hung once that way). The targets here block in pause, read, futex and
nanosleep with a SIGUSR1 handler without SA_RESTART and report how each call ended
(tests/targets/insyscall.c): restored, each must end exactly as in a process never dumped. A
nanosleep shows whether the thread went through user mode after the restore let it go: the
kernel then continues it in restart_syscall, not nanosleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.ptrace import raw
from tests.test_restore import ENV, Restored, dump, killed, restored, subreaper, wait_in_syscall  # noqa: F401
from tests.util import ROOT, LineChannel, Target

NRS = {"pause": 34, "read": 0, "futex": 202, "sleep": 35}
EINTR = 4


def _start(spawn: Callable[..., Target], kinds: tuple[str, ...]) -> tuple[Target, dict[int, int]]:
    """The target, once every thread is blocked in its syscall; tid -> syscall number."""
    t = spawn("insyscall", *kinds, stderr=subprocess.DEVNULL)
    words = t.ready.split()
    tids = {int(a): int(b) for a, b in (w.split(":") for w in words[1:])}
    assert list(tids.values()) == [NRS[k] for k in kinds]
    wait_in_syscall(t.pid, (NRS[kinds[0]],))  # the main thread (the target saw to the others)
    return t, tids


def _signal_and_check(read: Callable[[], str], pid: int, tids: dict[int, int]) -> None:
    """SIGUSR1 to every blocked thread: each call returns -1/EINTR after its handler ran once."""
    for tid in tids:
        raw.tgkill(pid, tid, signal.SIGUSR1)
    read_returns(read, tids)


def read_returns(read: Callable[[], str], tids: dict[int, int]) -> None:
    """Each thread's call returned -1/EINTR after one run of its handler; then the target's "done"."""
    got = {}
    for _ in tids:
        words = read().split()
        assert words[0] == "ret", words
        got[int(words[1])] = tuple(int(w) for w in words[2:])
    assert got == {tid: (-1, EINTR, 1) for tid in tids}
    assert read() == "done"


def _asleep_in(pid: int, tid: int, timeout: float = 30.0) -> int:
    """The syscall thread `tid` sleeps in, once it sleeps (/proc shows "running" until then)."""
    path = Path(f"/proc/{pid}/task/{tid}/syscall")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first = path.read_text().split()[0]
        if first != "running":
            return int(first)
        time.sleep(0.005)
    raise AssertionError(f"thread {tid} did not go to sleep: {path.read_text()}")


def _restore(restored: Callable[..., Restored], layer: Path) -> tuple[Restored, int]:  # noqa: F811
    r = restored(layer, "--detach", "--json")
    info = json.loads(r.readline())
    assert info["pid_kept"], info
    r.set_pid(int(info["pid"]))
    return r, int(info["pid"])


@pytest.mark.parametrize(
    "kinds",
    [("pause",), ("read",), ("futex",), ("sleep",), ("pause", "read", "futex", "sleep", "pause", "sleep")],
    ids=["pause", "read", "futex", "sleep", "threads"],
)
def test_back_inside_the_syscall_when_restore_returns(
    kinds: tuple[str, ...],
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    ref, ref_tids = _start(spawn, kinds)  # how a process never dumped takes the signal
    _signal_and_check(ref.readline, ref.pid, ref_tids)

    t, tids = _start(spawn, kinds)
    out = dump(t.pid, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    killed(t)
    r, pid = _restore(restored, Path(str(out["layer"])))
    # The very syscall each was dumped in: not restart_syscall (a nanosleep re-entered from user
    # mode after a detach), nor anything else a thread that ran user code could be in.
    assert {tid: _asleep_in(pid, tid) for tid in tids} == tids
    _signal_and_check(r.readline, pid, tids)
    assert r.wait() == 0
    _, st = os.waitpid(pid, 0)  # the fixture is a subreaper: the orphan is ours
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


def test_signal_right_after_restore_many_times(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """The signal sent the moment restore prints its line, over and over: it always finds pause()
    (and a thread in a timed sleep) inside the syscall. Before the fix, a loaded machine lost it."""
    t, tids = _start(spawn, ("pause", "sleep"))
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    layer = Path(str(out["layer"]))
    for _ in range(30):
        r, pid = _restore(restored, layer)
        _signal_and_check(r.readline, pid, tids)
        assert r.wait() == 0
        _, st = os.waitpid(pid, 0)
        assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
        r.close()


# `ckpt restore --detach` (ckpt/restore/run.py) with signals sent to the main thread while the
# restore still holds it stopped (before_run: the last step before the threads are let go): they
# are pending when it goes.
RESTORE_SENDING = """
import json, os, sys
from ckpt.image import open_layer
from ckpt.ptrace import raw
from ckpt.restore import restore_process
from ckpt.restore.resume import in_tracer_thread
sigs = [int(s) for s in sys.argv[2:]]
def before_run(pid):
    for s in sigs:
        raw.tgkill(pid, pid, s)
rp = in_tracer_thread(lambda: restore_process(open_layer(sys.argv[1]), before_run=before_run))
os.write(1, (json.dumps({"pid": rp.pid}) + "\\n").encode())  # one write: the process shares this pipe
"""


@pytest.mark.parametrize("sent", ["handled", "ignored"])
def test_signal_pending_as_the_thread_goes(
    sent: str,
    tmp_path: Path,
    spawn: Callable[..., Target],
    subreaper: None,  # noqa: F811
) -> None:
    """A signal that comes before the thread is back in its syscall is taken as if from inside it:
    SIGUSR1 (handled) ends pause() with EINTR, not a handler run before a pause() that then sleeps
    for ever; SIGCHLD (ignored by default) is dropped and pause() goes on, until SIGUSR1 ends it."""
    t, tids = _start(spawn, ("pause",))
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    sig = signal.SIGUSR1 if sent == "handled" else signal.SIGCHLD
    p = subprocess.Popen(
        [sys.executable, "-c", RESTORE_SENDING, str(out["layer"]), str(int(sig))],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert p.stdout is not None
    chan = LineChannel(p, 60.0, lambda: "")
    lines = [chan.readline()]  # the restored process shares the stdout: it may speak first
    while not lines[-1].startswith("{"):
        lines.append(chan.readline())
    pid = int(json.loads(lines.pop())["pid"])
    try:
        assert p.wait(60) == 0
        if sent == "handled":
            while len(lines) < 2:
                lines.append(chan.readline())
            assert lines == [f"ret {pid} -1 {EINTR} 1", "done"]
        else:
            assert _asleep_in(pid, pid) == NRS["pause"]
            _signal_and_check(chan.readline, pid, tids)
        _, st = os.waitpid(pid, 0)
        assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        p.stdout.close()
        if p.stderr is not None:
            p.stderr.close()
