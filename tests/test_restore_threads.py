"""Multi-threaded processes restored whole (issue 12 B2): every thread with its registers, TLS,
signal mask, pending signals, rseq, robust list, clear_child_tid, name, scheduling and affinity,
and its tid; threads blocked in futex waits, pause and nanosleep resume inside them.

tests/targets/threads.c checks all of that itself (`check`); pythreads.py is a real program.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.errors import RestoreError
from ckpt.image import open_layer
from ckpt.proc.threads import _fields, read_cloned
from ckpt.ptrace import Frozen
from ckpt.restore import restore_process
from ckpt.restore.plan import make_plan
from tests.test_migrate import Server, migrate, server  # noqa: F401 (a fixture)
from tests.test_restore import Restored, dump, killed, restored  # noqa: F401 (a fixture)
from tests.util import TARGETS, LineChannel, Target, run_ckpt


def _threads(spawn: Callable[..., Target], *args: str) -> Target:
    t = spawn("threads", *args, stderr=subprocess.DEVNULL)
    assert t.cmd("waiting") == "waiting"  # every waiting worker is inside its syscall
    assert t.cmd("check") == "ok"
    assert t.cmd("waiting") == "waiting"
    return t


def _tids(t: Target | Restored) -> list[int]:
    words = t.cmd("tids").split()
    assert words[0] == "tids"
    return [int(w) for w in words[1:]]


def _detached(r: Restored) -> dict[str, object]:
    out: dict[str, object] = json.loads(r.readline())
    r.set_pid(int(str(out["pid"])))
    assert r.wait() == 0
    return out


@pytest.mark.parametrize("n", [2, 8])
def test_threads_are_restored_from_a_chain(
    n: int,
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t = _threads(spawn, str(n))
    tids = _tids(t)
    d = tmp_path / "d"
    first = dump(t.pid, d)
    assert first["restorable"], first["not_restorable"]
    assert t.cmd("check") == "ok"  # the dump left every thread as it was
    assert t.cmd("advance") == "advanced"
    assert t.cmd("waiting") == "waiting"
    out = dump(t.pid, d, "--incremental", "--kill")
    killed(t)
    layer = Path(str(out["layer"]))
    meta = open_layer(layer).top.meta
    assert len(meta.threads) == n + 1
    names = sorted(str(th.props.comm) for th in meta.threads if th.props and th.tid != meta.inventory.pid)
    assert names == sorted(f"w{i}-{('futex', 'timed', 'pause', 'sleep', 'spin')[i % 5]}" for i in range(n))

    r = restored(layer, "--detach", "--json")
    info = _detached(r)
    assert info["pid_kept"]
    (w,) = info["warnings"]  # type: ignore[misc]
    assert str(w).startswith(f"thread {tids[1]} has a parent-death signal (28); its parent is now")
    assert _tids(r) == tids
    assert sorted(int(x.name) for x in Path(f"/proc/{r.pid}/task").iterdir()) == sorted([r.pid, *tids])
    assert r.cmd("check") == "ok"  # each thread checked itself, woken from its restarted wait
    assert r.cmd("advance") == "advanced"  # the spinning ones count on
    assert r.cmd("waiting") == "waiting"
    assert r.cmd("check") == "ok"  # and each went back into its wait


def test_thread_blocked_in_read_of_a_pipe(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t = _threads(spawn, "6", "read")
    first = dump(t.pid, tmp_path / "d")
    if any("pipe" in w for w in first["not_restorable"]):  # type: ignore[attr-defined]
        pytest.skip("pipes beyond fds 0-2 are not restored by this branch (issue 12 B1)")
    out = dump(t.pid, tmp_path / "d", "--incremental", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    _detached(r)
    assert r.cmd("check") == "ok"


def test_tids_in_use_are_reported(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """The original still runs: its tids are taken. The restore says so for each thread; never
    a silent difference."""
    t = _threads(spawn, "3")
    tids = _tids(t)
    out = dump(t.pid, tmp_path / "d")
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    info = _detached(r)
    assert not info["pid_kept"]
    warnings = [str(w) for w in info["warnings"] if "parent-death" not in str(w)]  # type: ignore[attr-defined]
    assert len(warnings) == 3, warnings
    for tid, w in zip(tids, warnings, strict=True):
        assert w.startswith(f"thread {tid} restored as tid ") and "in use" in w
    new = _tids(r)
    assert new == tids  # the program's own record; the kernel's tids are the new ones
    assert r.cmd("check").startswith("bad: w0: tid ")
    assert t.cmd("check") == "ok"


def _nobody() -> None:
    os.setgroups([100])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


def _creds(pid: int, tid: int) -> list[str]:
    keys = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
    lines = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
    return [ln for ln in lines if ln.partition(":")[0] in keys]


def test_ordinary_users_threads_are_not_root(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """Credentials are per thread in the kernel: every restored thread takes the dumped ones (the
    threads are made while the helper is still root, so that their tids can be asked for)."""
    t = spawn("threads", "5", stderr=subprocess.DEVNULL, preexec_fn=_nobody)
    assert t.cmd("waiting") == "waiting" and t.cmd("check") == "ok"
    tids = _tids(t)
    want = _creds(t.pid, t.pid)
    assert "Uid:\t65534\t65534\t65534\t65534" in want and all(_creds(t.pid, x) == want for x in tids)
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    _detached(r)
    assert _tids(r) == tids
    for tid in [r.pid, *tids]:
        assert _creds(r.pid, tid) == want, tid
    assert r.cmd("check") == "ok"


def test_thread_with_its_own_no_new_privs_is_refused(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = _threads(spawn, "2", "nnp")
    out = dump(t.pid, tmp_path / "d")
    assert not out["restorable"]
    why = " ".join(out["not_restorable"])  # type: ignore[arg-type]
    assert f"thread {_tids(t)[0]} has its own no_new_privs" in why
    r = run_ckpt("restore", str(out["layer"]))
    assert r.returncode == 1 and "has its own no_new_privs" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert t.cmd("check") == "ok"


def test_cloned_state_read_as_each_threads_own(spawn: Callable[..., Target]) -> None:
    """read_cloned parses threads whose status spans are alike once (proc/threads.py): each thread's
    fields are still those of its own status text, the one with its own no_new_privs too."""
    t = _threads(spawn, "5", "nnp")
    tids = _tids(t)
    with Frozen(t.pid):  # (as a dump reads them: every thread stopped)
        got = read_cloned(t.pid, tids)
        for tid in tids:
            with open(f"/proc/{t.pid}/task/{tid}/status") as f:
                assert {k: v for k, v in got[tid].items() if k != "loginuid"} == _fields(f.read()), tid
    assert got[tids[0]]["NoNewPrivs"] == "1" and all(got[tid]["NoNewPrivs"] == "0" for tid in tids[1:])
    assert t.cmd("check") == "ok"


# -- a real program --------------------------------------------------------------------------------
def _chain_digest(k: int, steps: int) -> str:
    h = hashlib.sha256(f"seed-{k}".encode()).digest()
    for _ in range(steps):
        h = hashlib.sha256(h).digest()
    return h.hex()


def test_python_threads_compute_the_same(tmp_path: Path, restored: Callable[..., Restored]) -> None:  # noqa: F811
    workers, steps = 3, 600_000
    t = Target(
        [sys.executable, str(TARGETS / "pythreads.py"), str(workers), str(steps)], stderr=subprocess.DEVNULL
    )
    try:
        d = tmp_path / "d"
        dump(t.pid, d)  # while the workers compute
        assert t.cmd("echo one") == "echo one"
        out = dump(t.pid, d, "--incremental", "--kill")
        killed(t)
    finally:
        t.close()
    r = restored(Path(str(out["layer"])), "--detach", "--json", timeout=120)
    _detached(r)
    assert r.cmd("echo two") == "echo two"  # the thread blocked in queue.get() answers
    assert r.cmd("result").split()[1:] == [_chain_digest(k, steps) for k in range(workers)]
    assert r.cmd("threads") == "threads 3"  # main, echo and the sleeper: the workers are done


def test_a_failure_after_the_threads_leaves_nothing(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """The last thread's affinity names a CPU this machine lacks: the restore fails after every
    thread was made, and the helper goes with all its threads (each reaped: they were our tracees)."""
    t = _threads(spawn, "4")
    tids = _tids(t)
    pid = t.pid
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    view = open_layer(Path(str(out["layer"])))
    plan = make_plan(view)
    last = plan.threads[-1].props
    assert last is not None
    last.affinity = [4000]
    with pytest.raises(RestoreError, match=f"scheduling state of thread {plan.threads[-1].tid}"):
        restore_process(view, plan=plan)
    view.close()
    for tid in [pid, *tids]:  # kept (the original is gone), then killed and reaped: no zombie either
        assert not Path(f"/proc/{tid}").exists()


def test_python_threads_after_migrate(tmp_path: Path, server: Callable[..., Server]) -> None:  # noqa: F811
    """`ckpt migrate` to this same machine: the original still holds its tids while the copy is
    made, so each thread gets a new one, and says so; the program computes on all the same."""
    workers, steps = 2, 300_000
    t = Target([sys.executable, str(TARGETS / "pythreads.py"), str(workers), str(steps)],
               stderr=subprocess.DEVNULL)  # fmt: skip
    s = server()
    try:
        assert t.cmd("echo one") == "echo one"
        rc, _, err = migrate(t.pid, s.addr, "--policy", "rounds:2")
        assert rc == 0, err
        assert t.proc.wait(30) == -signal.SIGKILL
    finally:
        t.close()
    done = s.event("done")
    s.pid = int(str(done["pid"]))
    assert s.proc.wait(60) == 0
    notes = [str(n) for n in done["notes"]]  # type: ignore[attr-defined]
    # echo and the sleeper, and the workers still computing at the final freeze
    assert 2 <= sum("restored as tid" in n and "in use" in n for n in notes) <= 4, notes
    mig = LineChannel(s.proc, 120)
    assert mig.cmd("echo two") == "echo two"
    assert mig.cmd("result").split()[1:] == [_chain_digest(k, steps) for k in range(workers)]
