"""Every way of restoring lets a thread dumped inside a blocking syscall go only once it is back
inside that syscall (issue 12 A, issue 9 part 4; ckpt/restore/resume.py, ckpt/restore/parent.py).

tests/test_resume_in_syscall.py shows it for `ckpt restore --detach`; here the other paths: `ckpt
restore` that waits for its process, the Python API, a process tree, and `ckpt serve` receiving a
`ckpt migrate`. A thread let go from its syscall-enter-stop by PTRACE_DETACH makes one more trip
through user mode, untraced (a wake-up the detach forces); its nanosleep is then found in
restart_syscall, and a signal that comes during the trip runs its handler before a pause() that
then sleeps for ever. So once the restore reports the process running, each thread must be asleep
in the very syscall it was dumped in, and SIGUSR1 (a handler without SA_RESTART) must end each call
with EINTR after one run of the handler, as in a process never dumped (tests/targets/insyscall.c).

The restored process is a child of a thread that outlives the restore (the caller's): its
parent-death signal does not come when the restore's own thread ends, only when its parent does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.ptrace import raw
from tests.test_migrate import Server, migrate, server  # noqa: F401 (a fixture)
from tests.test_restore import ENV, Restored, dump, killed, restored, subreaper  # noqa: F401
from tests.test_resume_in_syscall import EINTR, NRS, read_returns
from tests.util import ROOT, LineChannel, Target, build_c

RESTART_SYSCALL = 219
THREADS = ("pause", "read", "futex", "sleep", "sleep")
TREE = ("pause", "+sleep", "+pause", "read", "sleep")
WAIT = 60.0  # s: a bound on each wait for the restore, never reached when all goes well


def _ready(t: Target) -> dict[int, int]:
    """tid (or a child's pid) -> the syscall it blocks in, from the target's "ready" line."""
    words = t.ready.split()
    assert words[0] == "ready", words
    return {int(a): int(b) for a, b in (w.split(":") for w in words[1:])}


def _start(spawn: Callable[..., Target], kinds: tuple[str, ...], **env: str) -> tuple[Target, dict[int, int]]:
    t = spawn("insyscall", *kinds, stderr=subprocess.DEVNULL, env={**os.environ, **env} if env else None)
    tids = _ready(t)
    root = t.pid
    _asleep_in(root, NRS[kinds[0]])  # the target saw to every other thread and child
    return t, tids


def _syscall(tid: int) -> str:
    return Path(f"/proc/{tid}/syscall").read_text().split()[0]


def _asleep_in(tid: int, nr: int | None = None) -> int:
    """The syscall `tid` sleeps in, once it sleeps (/proc shows "running" until then)."""
    deadline = time.monotonic() + WAIT
    while (first := _syscall(tid)) == "running":
        assert time.monotonic() < deadline, f"{tid} did not go to sleep"
        time.sleep(0.005)
    if nr is not None:
        assert int(first) == nr, (tid, first)
    return int(first)


def _status(tid: int) -> dict[str, str]:
    lines = Path(f"/proc/{tid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def _let_go(tids: dict[int, int], exe: Path) -> None:
    """Until the restore of a `ckpt restore` that waits is over: every dumped tid runs the target's
    executable untraced (each is traced from its creation to the end of the restore's thread)."""
    deadline = time.monotonic() + WAIT
    while True:
        with contextlib.suppress(OSError):
            if all(
                os.readlink(f"/proc/{t}/exe") == str(exe) and _status(t)["TracerPid"] == "0" for t in tids
            ):
                return
        assert time.monotonic() < deadline, "the restore did not let its process go"
        time.sleep(0.01)


def _tgid(tid: int) -> int:
    return int(_status(tid)["Tgid"])


def _signal(tids: list[int]) -> None:
    for tid in tids:
        raw.tgkill(_tgid(tid), tid, signal.SIGUSR1)


def _check(read: Callable[[], str], tids: dict[int, int]) -> None:
    """Signal every thread but those in nanosleep at once; those, once seen still in nanosleep
    itself (not restart_syscall, where a trip through user mode would have left them); then each
    call returns -1/EINTR after one run of its handler, and the target says "done"."""
    sleepers = [t for t, nr in tids.items() if nr == NRS["sleep"]]
    _signal([t for t in tids if t not in sleepers])
    for t in sleepers:
        assert _asleep_in(t) == NRS["sleep"], f"thread {t} left nanosleep for restart_syscall"
    _signal(sleepers)
    read_returns(read, tids)


def _dumped(
    spawn: Callable[..., Target], tmp_path: Path, kinds: tuple[str, ...], **env: str
) -> tuple[Path, dict[int, int]]:
    t, tids = _start(spawn, kinds, **env)
    out = dump(t.pid, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    killed(t)
    for kid in tids:  # a tree's children, killed too: orphans of ours (a subreaper) to reap
        with contextlib.suppress(ChildProcessError):
            os.waitpid(kid, 0)  # (a thread's tid: not a child, ECHILD)
    return Path(str(out["layer"])), tids


@pytest.mark.parametrize("kinds", [THREADS, TREE], ids=["threads", "tree"])
def test_restore_that_waits(
    kinds: tuple[str, ...],
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """`ckpt restore` without --detach: the restored process (or tree) is its main thread's child,
    which waits for it and exits with its status."""
    layer, tids = _dumped(spawn, tmp_path, kinds)
    r = restored(layer)
    root = next(iter(tids))
    r.set_pid(root)
    _let_go(tids, build_c("insyscall"))
    assert {t: _asleep_in(t) for t in tids} == tids
    assert str(root) in Path(f"/proc/{r.proc.pid}/task/{r.proc.pid}/children").read_text().split()
    _check(r.readline, tids)
    assert r.wait() == 0


API_RESTORE = """
import json, os, sys
import ckpt.api
if sys.argv[2] == "api":
    assert ckpt.api.restore(sys.argv[1], detach=True, json_out=True) == 0  # prints {"pid": ...}
else:
    from ckpt.restore import restore_process
    rp = restore_process(ckpt.api.open_layer(sys.argv[1]))
    os.write(1, (json.dumps({"pid": rp.pid}) + "\\n").encode())  # one write: the process shares this pipe
_, st = os.wait()  # our main thread's child
print("status", os.waitstatus_to_exitcode(st), flush=True)
"""


@contextlib.contextmanager
def _api_restore(layer: Path, how: str = "api") -> Iterator[tuple[subprocess.Popen[bytes], LineChannel, int]]:
    p = subprocess.Popen(
        [sys.executable, "-c", API_RESTORE, str(layer), how],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    chan = LineChannel(p, WAIT, lambda: "")
    pid = int(json.loads(chan.readline())["pid"])
    try:
        yield p, chan, pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        p.kill()
        p.wait(WAIT)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # an orphan of the script: ours (subreaper)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


@pytest.mark.parametrize("how", ["api", "restore_process"])
@pytest.mark.parametrize("kinds", [THREADS, TREE], ids=["threads", "tree"])
def test_python_api(
    kinds: tuple[str, ...],
    how: str,
    tmp_path: Path,
    spawn: Callable[..., Target],
    subreaper: None,  # noqa: F811
) -> None:
    """ckpt.api.restore (detach=True) and ckpt.restore.restore_process (what `ckpt serve` calls):
    when either returns, every thread is inside its syscall; the process is a child of the thread
    that called it."""
    layer, tids = _dumped(spawn, tmp_path, kinds)
    with _api_restore(layer, how) as (p, chan, pid):
        assert pid == next(iter(tids))
        # (Inside it, past its entry, a thread may still be on its way to sleep: "running".)
        assert {t: _asleep_in(t) for t in tids} == tids
        assert str(pid) in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        _check(chan.readline, tids)
        assert chan.readline() == "status 0"
        assert p.wait(WAIT) == 0


def test_parent_death_signal_comes_with_the_parent(
    tmp_path: Path,
    spawn: Callable[..., Target],
    subreaper: None,  # noqa: F811
) -> None:
    """A process that asked for SIGUSR1 at its parent's death, restored through the API: the
    restore's own thread has ended when the call returns, and the process still sleeps in pause();
    its parent (the script's main thread) ends, and pause() returns EINTR after the handler."""
    layer, _ = _dumped(spawn, tmp_path, ("pause",), INSYSCALL_PDEATHSIG="1")
    with _api_restore(layer) as (p, chan, pid):
        assert _asleep_in(pid) == NRS["pause"]
        p.kill()  # the parent dies
        p.wait(WAIT)
        assert chan.readline() == f"ret {pid} -1 {EINTR} 1"
        assert chan.readline() == "done"
        _, st = os.waitpid(pid, 0)
        assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


@pytest.mark.parametrize("warm", ["1", "0"], ids=["warm", "cold"])
def test_migrated_copy(
    warm: str,
    tmp_path: Path,
    spawn: Callable[..., Target],
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """`ckpt serve` restores the final layer of `ckpt migrate` (warm: a thread of its own built the
    process while the rounds came, and ends with the final restore; cold: restore_process from its
    main thread): when the source hears the copy runs, every thread of the copy is inside its
    syscall. The source's own thaws left its nanosleep in restart_syscall; the copy re-issues
    nanosleep itself (restore/restarts.py)."""
    t, tids = _start(spawn, THREADS)
    s = server(env=dict(ENV, CKPT_WARM_RESTORE=warm))
    rc, _, err = migrate(t.pid, s.addr, "--policy", "rounds:2")
    assert rc == 0, err
    new = s.done()
    assert t.proc.wait(30) == -signal.SIGKILL
    # Other tids than the original's (which ran until the copy did): matched by what they sleep in.
    new_tids = {int(x): _asleep_in(int(x)) for x in os.listdir(f"/proc/{new}/task")}
    assert sorted(new_tids.values()) == sorted(tids.values())
    _check(LineChannel(s.proc, WAIT).readline, new_tids)
