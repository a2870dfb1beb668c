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
