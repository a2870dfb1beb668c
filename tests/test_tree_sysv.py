"""SysV shared memory shared by the processes of a tree (issue 12 B3/B4): one segment made once by the
restore (restore/treeobjects.py) and attached by each process at its dumped address, so that a
write by one is seen by the other; a segment one process attached twice; a removed (IPC_RMID) one
still attached, which lives as long as its attaches. The processes check themselves
(tests/targets/tree_sysv.c). What cannot be given back is refused by name: a key taken on restore,
a process in another IPC namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt.image import Layer
from tests.test_restore_tree import _dump, _reap, _restore_detached
from tests.util import build_c, run_ckpt

_libc = ctypes.CDLL(None, use_errno=True)
KEY_BASE = 0x5CE1


def _segments() -> dict[int, tuple[int, int]]:
    """shmid -> (key, size) of this IPC namespace's SysV segments."""
    out = {}
    with open("/proc/sysvipc/shm") as f:
        next(f)
        for ln in f:
            w = ln.split()
            out[int(w[1])] = (int(w[0]) & 0xFFFFFFFF, int(w[3]))
    return out


_OURS: set[int] = set()  # the keys of the targets this run started (their pids in the low half)


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """The target's keyed segment outlives a killed original: removed. Only this run's: another
    run beside this one has segments of the same KEY_BASE, and needs them."""
    before = set(_segments())
    yield
    for shmid, (key, _) in _segments().items():
        if shmid not in before and key in _OURS:
            _libc.shmctl(shmid, 0, None)  # IPC_RMID


def _start(reap: list[int], *args: str, pre: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [*pre, str(build_c("tree_sysv")), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    reap.append(proc.pid)
    _OURS.add((KEY_BASE << 16) | (proc.pid & 0xFFFF))
    assert proc.stdout is not None
    word, child = proc.stdout.readline().split()
    assert word == b"ready", word
    reap.append(int(child))
    return proc, int(child)


def _sysv_maps(pid: int) -> list[tuple[str, str, str]]:
    """(range, perms, shmid) of the process's SysV attaches."""
    out = []
    for ln in Path(f"/proc/{pid}/maps").read_text().splitlines():
        w = ln.split()
        if len(w) >= 6 and w[5].startswith("/SYSV"):
            out.append((w[0], w[1], w[4]))
    return out


def _run_restored(layer: Path, root: int, child: int, twice: bool) -> None:
    r, info = _restore_detached(layer)
    assert r.wait(60) == 0
    pids = {m["dumped_pid"]: m["pid"] for m in info["tree"]}  # type: ignore[attr-defined]
    assert pids == {root: root, child: child}, pids
    mine, theirs = _sysv_maps(root), _sysv_maps(child)
    assert len(mine) == 3 and len(theirs) == 3 + twice, (mine, theirs)
    assert set(mine) <= set(theirs), (mine, theirs)  # same segments at the same addresses
    os.kill(child, signal.SIGUSR1)
    os.kill(root, signal.SIGUSR1)
    assert r.stdout is not None
    assert r.stdout.readline() == b"ok\n"
    _, st = os.waitpid(root, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


@pytest.mark.parametrize("twice", [False, True], ids=["inherited", "child-attached-twice"])
def test_sysv_shared_by_parent_and_child(twice: bool, tmp_path: Path, subreaper: list[int]) -> None:
    proc, child = _start(subreaper, *(["twice"] if twice else []))
    out = _dump(proc.pid, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    proc.wait(30)
    _reap(subreaper)
    # Stored once, in the parent's layer; the child's records name it (ckpt/treeshare.py).
    [member] = out["tree"]  # type: ignore[misc]
    mine = {o.ino: o for o in Layer.open(str(out["layer"])).meta.objects if o.kind == "sysv"}
    held = {o.ino: o for o in Layer.open(str(member["layer"])).meta.objects if o.kind == "sysv"}
    assert len(mine) == 2 and sorted(held) == sorted(mine)
    assert all(o.extents and not o.held_by for o in mine.values())
    assert all(o.held_by == proc.pid and not o.extents for o in held.values())
    _run_restored(Path(str(out["layer"])), proc.pid, child, twice)


def test_sysv_shared_from_a_chain_and_merged(tmp_path: Path, subreaper: list[int]) -> None:
    """A full tree dump, then an incremental one with --kill, merged into another directory (the
    chain removed): the merged tree restores with its segments shared."""
    proc, child = _start(subreaper, "twice")
    d = tmp_path / "d"
    assert _dump(proc.pid, d)["restorable"]
    out = _dump(proc.pid, d, "--incremental", "--kill")
    assert out["incremental"] and out["restorable"], out["not_restorable"]
    proc.wait(30)
    _reap(subreaper)
    m = tmp_path / "m"
    m.mkdir()
    merged = Path(run_ckpt("merge", str(out["layer"]), "-o", str(m), check=True).stdout.strip())
    shutil.rmtree(d)
    _run_restored(merged, proc.pid, child, True)


def test_sysv_key_taken_at_restore_is_refused(tmp_path: Path, subreaper: list[int]) -> None:
    """The dead original's segment is gone and another one of another size holds its key: the
    restore refuses, naming the segment, and starts nothing."""
    proc, _ = _start(subreaper)
    key = (KEY_BASE << 16) | (proc.pid & 0xFFFF)
    out = _dump(proc.pid, tmp_path / "d", "--kill")
    proc.wait(30)
    _reap(subreaper)
    (old,) = [i for i, (k, _) in _segments().items() if k == key]
    assert _libc.shmctl(old, 0, None) == 0  # IPC_RMID
    assert _libc.shmget(key, 4096, 0o1000 | 0o600) >= 0  # IPC_CREAT, one page instead of three
    before = [s for s in _segments().items() if s[1][0] == key]
    r = run_ckpt("restore", str(out["layer"]))
    assert r.returncode == 1 and r.stderr.startswith("ckpt: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"SysV shared memory segment {old} (key {key:#x}): the key is in use" in r.stderr, r.stderr
    # Nothing made (not the removed segment either).
    assert [s for s in _segments().items() if s[1][0] == key] == before


def test_sysv_of_another_ipc_namespace_is_refused(tmp_path: Path, subreaper: list[int]) -> None:
    """A tree in an IPC namespace of its own (unshare --ipc): its segments are not ckpt's to read
    or make; the dump names them and says why, and a --kill does not kill it."""
    proc, child = _start(subreaper, pre=("unshare", "--ipc"))
    r = run_ckpt("dump", "--pid", str(proc.pid), "-D", str(tmp_path / "d"), "--kill")
    assert r.returncode == 1 and r.stderr.startswith("ckpt: not killing"), r.stderr
    assert "SysV shared memory segment" in r.stderr and "another IPC namespace" in r.stderr, r.stderr
    assert proc.poll() is None
    os.kill(child, signal.SIGUSR1)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ok\n"
    assert proc.wait(30) == 0
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)
