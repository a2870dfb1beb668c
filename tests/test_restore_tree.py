"""Process trees (issue 12 B3): `ckpt dump` of a process with children dumps the whole tree, and
`ckpt restore` rebuilds it: each child forked from its restored parent (which can wait() for it),
pids kept, sessions and process groups, zombies with their exit status.

The targets check themselves after the restore (tests/targets/tree.c), as CRIU's zdtm tests do.
The test process is a subreaper, so the processes a --kill leaves behind are ours to reap.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt.image import Layer
from tests.util import ROOT, build_c, run_ckpt

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def subreaper() -> Iterator[list[int]]:
    """Pids to kill and reap at the end; orphans come to us meanwhile."""
    pids: list[int] = []
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield pids
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        for p in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, 0)
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _reap(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p, 0)


def _start_tree(reap: list[int]) -> tuple[subprocess.Popen[bytes], list[int]]:
    exe = build_c("tree")
    proc = subprocess.Popen(
        [str(exe)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    assert line[0] == "ready", line
    pids = [int(x) for x in line[1:]]
    reap.extend(pids)
    return proc, pids


def _dump(pid: int, d: Path, *extra: str) -> dict[str, object]:
    r = run_ckpt("dump", "--pid", str(pid), "-D", str(d), "--json", *extra, check=True)
    out: dict[str, object] = json.loads(r.stdout)
    return out


def _restore_detached(layer: Path) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach", "--json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert p.stdout is not None
    first = p.stdout.readline()
    if not first:
        p.wait(60)
        assert p.stderr is not None
        raise AssertionError(f"restore failed: {p.stderr.read().decode()}")
    return p, json.loads(first)


def _check_restored_tree(layer: Path, pids: list[int], reap: list[int]) -> None:
    r, info = _restore_detached(layer)
    root, a, g, z, p, s = pids
    tree = {m["dumped_pid"]: m for m in info["tree"]}  # type: ignore[attr-defined]
    assert info["pid"] == root and info["pid_kept"]
    assert sorted(tree) == sorted(pids)
    assert all(m["pid"] == m["dumped_pid"] for m in tree.values()), tree
    assert tree[z]["zombie"] and not tree[a]["zombie"]
    for x in (g, a, p, s, root):
        os.kill(x, signal.SIGUSR1)
    assert r.stdout is not None
    assert r.stdout.readline().decode().strip() == "tree ok"
    assert r.wait(60) == 0
    _, st = os.waitpid(root, 0)  # ckpt restore --detach exited: the root is ours (subreaper)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    _reap(reap)


def test_tree_dump_and_restore(tmp_path: Path, subreaper: list[int]) -> None:
    proc, pids = _start_tree(subreaper)
    root, a, g, z, p, s = pids
    out = _dump(root, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    members = {m["pid"]: m for m in out["tree"]}  # type: ignore[attr-defined]
    assert sorted(members) == sorted([a, g, z, p, s])
    assert members[z]["zombie"] and members[z]["layer"] is None
    assert members[g]["ppid"] == a
    proc.wait(30)
    _reap(subreaper)
    rec = Layer.open(str(out["layer"])).tree
    assert rec is not None
    by = {q.pid: q for q in rec.processes}
    assert by[z].exit_status == 7 << 8
    assert by[p].pgid == p and by[s].sid == s and by[a].pgid == by[root].pgid
    _check_restored_tree(Path(str(out["layer"])), pids, subreaper)


def test_tree_from_incremental_chain(tmp_path: Path, subreaper: list[int]) -> None:
    """A full tree dump, then an incremental one with --kill: every member's chain grows by an
    incremental layer on its own (its tracker armed by the first dump and read by the second), and the
    top root layer restores the whole tree."""
    proc, pids = _start_tree(subreaper)
    root = pids[0]
    d = tmp_path / "d"
    full = _dump(root, d)
    assert full["restorable"], full["not_restorable"]
    inc = _dump(root, d, "--incremental", "--kill")
    assert inc["incremental"] and inc["parent"] == full["layer"]
    for m in inc["tree"]:  # type: ignore[attr-defined]
        if not m["zombie"]:
            assert m["incremental"], m
            assert Path(m["layer"]).name == "layer-0002.ckpt"
            assert Layer.open(m["layer"]).inventory.parent is not None
    proc.wait(30)
    _reap(subreaper)
    _check_restored_tree(Path(str(inc["layer"])), pids, subreaper)


def test_shell_job(tmp_path: Path, subreaper: list[int]) -> None:
    """sh waiting for its background job: restored, it still waits for it, and sees how it ended."""
    script = 'sleep 1000 & echo "ready $!"; wait $!; echo "status $?"'
    proc = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    word, child = proc.stdout.readline().decode().split()
    subreaper.extend([proc.pid, int(child)])
    assert word == "ready"
    out = _dump(proc.pid, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    assert [m["pid"] for m in out["tree"]] == [int(child)]  # type: ignore[attr-defined]
    proc.wait(30)
    _reap(subreaper)
    r, info = _restore_detached(Path(str(out["layer"])))
    assert info["pid"] == proc.pid
    assert r.wait(60) == 0
    os.kill(int(child), signal.SIGTERM)
    assert r.stdout is not None
    assert r.stdout.readline().decode().strip() == f"status {128 + signal.SIGTERM}"
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


def _refused(tmp_path: Path, pid: int, words: str) -> None:
    """Dumped but not restorable for `words`; --kill refuses and the tree runs on; restore refuses."""
    d = tmp_path / "d"
    out = _dump(pid, d)
    assert not out["restorable"]
    assert any(words in w for w in out["not_restorable"]), out["not_restorable"]  # type: ignore[attr-defined]
    r = run_ckpt("dump", "--pid", str(pid), "-D", str(d), "--kill")
    assert r.returncode == 1 and words in r.stderr and "runs on" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    os.kill(pid, 0)
    r = run_ckpt("restore", str(out["layer"]))
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert r.stderr.startswith(f"ckpt: cannot restore the tree of pid {pid}: unsupported: ")


def test_pipe_between_processes_is_refused(tmp_path: Path, subreaper: list[int]) -> None:
    proc = subprocess.Popen(
        ["sh", "-c", "echo ready; sleep 1000 | cat"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    kids = _wait_children(proc.pid, 2)
    subreaper.extend(kids)
    _refused(tmp_path, proc.pid, "a pipe between processes of the tree")


def test_group_without_leader_is_refused(tmp_path: Path, subreaper: list[int]) -> None:
    """A process left in a group whose leader exited: no restored process can have that group id."""
    code = (
        "import os, signal\n"
        "r, w = os.pipe()\n"
        "l = os.fork()\n"
        "if l == 0:\n"
        "    os.setpgid(0, 0); os.close(r); os.write(w, b'x'); os.read(0, 1); os._exit(0)\n"
        "os.setpgid(l, l); os.read(r, 1)\n"
        "m = os.fork()\n"
        "if m == 0:\n"
        "    os.setpgid(0, l); os.close(r); os.write(w, b'x'); os.close(w); signal.pause()\n"
        "os.read(r, 1); os.close(r); os.close(w)\n"
        "os.kill(l, 9); os.waitpid(l, 0)\n"
        "print('ready', m, l, flush=True); signal.pause()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    _, m, leader = proc.stdout.readline().decode().split()
    subreaper.append(int(m))
    _refused(tmp_path, proc.pid, f"is in process group {leader}, whose leader is not a process of the tree")


def _wait_children(pid: int, n: int) -> list[int]:
    """The children of `pid` once there are `n` (they are forked after it said ready)."""
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        if len(kids) >= n:
            return kids
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not fork {n} children")
