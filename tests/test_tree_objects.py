"""Objects shared between the processes of a tree (issue 12 B3/B4): which memfds, deleted files and
SysV segments several processes use is read from the layers' object records (kind, device, inode),
never from the paths the processes showed them under.

The first tests are on records (what the dump writes and the restore reads); the rest dump and restore
real trees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckpt.image.fdobjects import PipeRecord
from ckpt.image.format import FdRecord, VmaRecord
from ckpt.image.objects import ObjectRecord
from ckpt.image.tree import TreeProc, TreeRecord
from ckpt.restore.treeplan import shared_objects, shared_refusals
from tests.test_restore_tree import _dump, _reap, _restore_detached

SHM_DEV = os.makedev(0, 0x19)


@dataclass
class _Meta:
    """A layer's records as the tree checks read them (a LayerMeta has these fields)."""

    fds: list[FdRecord] = field(default_factory=list)
    vmas: list[VmaRecord] = field(default_factory=list)
    pipes: list[PipeRecord] = field(default_factory=list)
    objects: list[ObjectRecord] = field(default_factory=list)


def _obj(kind: str, ino: int, name: str, dev: int = SHM_DEV) -> ObjectRecord:
    return ObjectRecord(kind=kind, dev=dev, ino=ino, name=name, size=4096, mode=0o100600, uid=0, gid=0)


def _fd(n: int, ino: int, path: str, dev: int = SHM_DEV) -> FdRecord:
    return FdRecord(fd=n, kind="file", path=path, flags=os.O_RDWR, pos=0, mnt_id=1, dev=dev, ino=ino)


def _map(ino: int, path: str, shared: bool = True, dev: int = SHM_DEV) -> VmaRecord:
    d = f"{os.major(dev):02x}:{os.minor(dev):02x}"
    return VmaRecord(0x7F0000000000, 0x7F0000001000, "rw-s" if shared else "rw-p", 0, d, ino, path)


def _tree(*pids: int) -> TreeRecord:
    root = TreeProc(pids[0], 1, pids[0], pids[0])
    return TreeRecord([root, *(TreeProc(p, pids[0], pids[0], pids[0], layer=None) for p in pids[1:])])


def test_two_files_of_one_name_are_two_objects() -> None:
    """Each process has its own deleted file, both once named /dev/shm/x: nothing is shared."""
    a = _Meta(fds=[_fd(3, 11, "/dev/shm/x (deleted)")], objects=[_obj("ghost", 11, "/dev/shm/x")])
    b = _Meta(vmas=[_map(12, "/dev/shm/x (deleted)")], objects=[_obj("ghost", 12, "/dev/shm/x")])
    assert shared_objects({10: a, 20: b}) == []
    assert shared_refusals(_tree(10, 20), {10: a, 20: b}) == []


def test_one_file_under_two_names_is_one_object() -> None:
    """One deleted file (one inode) that one process has open as /tmp/a and the other maps as
    /tmp/b, renamed in between: one object, used by both."""
    a = _Meta(fds=[_fd(3, 7, "/tmp/a (deleted)")], objects=[_obj("ghost", 7, "/tmp/a")])
    b = _Meta(vmas=[_map(7, "/tmp/b (deleted)", shared=False)], objects=[_obj("ghost", 7, "/tmp/b")])
    [so] = shared_objects({10: a, 20: b})
    assert (so.kind, so.ino, so.users) == ("ghost", 7, {10, 20})


def test_a_path_that_only_looks_deleted_is_no_object() -> None:
    """A regular file really named "f (deleted)", open in both: no object record names it, so it is
    no object (it is an open file, which the tree's own rules handle)."""
    a = _Meta(fds=[_fd(3, 5, "/tmp/f (deleted)")])
    b = _Meta(fds=[_fd(4, 5, "/tmp/f (deleted)")])
    assert shared_objects({10: a, 20: b}) == []
    assert shared_refusals(_tree(10, 20), {10: a, 20: b}) == []


def test_memfd_and_sysv_with_one_inode_number_are_two_objects() -> None:
    """A SysV segment's inode is its shmid: equal numbers on one device are still two kinds."""
    a = _Meta(vmas=[_map(3, "/SYSV00000000 (deleted)")], objects=[_obj("sysv", 3, "")])
    b = _Meta(fds=[_fd(3, 3, "/memfd:m (deleted)")], objects=[_obj("memfd", 3, "m")])
    assert shared_objects({10: a, 20: b}) == []


def test_a_shared_sysv_segment_is_one_object() -> None:
    """Attached by two processes: one segment, made once for the tree (tests/test_tree_sysv.py)."""
    seg = _obj("sysv", 9, "")
    a = _Meta(vmas=[_map(9, "/SYSV00000000 (deleted)")], objects=[seg])
    b = _Meta(vmas=[_map(9, "/SYSV00000000 (deleted)")], objects=[seg])
    [so] = shared_objects({10: a, 20: b})
    assert (so.kind, so.ino, so.users) == ("sysv", 9, {10, 20})
    assert shared_refusals(_tree(10, 20), {10: a, 20: b}) == []


# -- real trees ------------------------------------------------------------------------------------
SHARER = """
import fcntl, mmap, os, signal, sys
kind, where = sys.argv[1], sys.argv[2]
if kind == "memfd":
    fd = os.memfd_create("tree-shared", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
else:
    fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    os.unlink(where)
os.ftruncate(fd, 8192)
if kind == "memfd":
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
m = mmap.mmap(fd, 8192)
m[:6] = b"parent"
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
c = os.fork()
if c == 0:
    os.close(fd)  # the child keeps the mapping alone
    signal.sigwait({signal.SIGUSR1})
    ok = m[:6] == b"parent"
    m[:6] = b"child!"
    os._exit(0 if ok else 3)
print("ready", c, flush=True)
signal.sigwait({signal.SIGUSR1})
_, st = os.waitpid(c, 0)
link = os.readlink(f"/proc/self/fd/{fd}")
want = "/memfd:tree-shared (deleted)" if kind == "memfd" else where + " (deleted)"
seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if kind == "memfd" else 0
bad = []
if os.waitstatus_to_exitcode(st) != 0: bad.append(f"child {st}")
if m[:6] != b"child!": bad.append(f"mapping {m[:6]!r}")
if os.pread(fd, 6, 0) != b"child!": bad.append("fd")
if link != want: bad.append(link)
if kind == "memfd" and seals != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW: bad.append(f"seals {seals:#x}")
if kind != "memfd" and os.fstat(fd).st_mode & 0o7777 != 0o640: bad.append("mode")
print("ok" if not bad else " ".join(bad), flush=True)
"""


@pytest.mark.parametrize("kind", ["memfd", "ghost"])
def test_object_shared_by_parent_and_child(kind: str, tmp_path: Path, subreaper: list[int]) -> None:
    """A memfd (sealed) or a deleted file, open and mapped shared in the parent, mapped in its child:
    restored as one object, so a write of the restored child reaches the restored parent."""
    where = str(tmp_path / "ghost")
    proc = subprocess.Popen(
        [sys.executable, "-c", SHARER, kind, where],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    word, child = proc.stdout.readline().split()
    assert word == b"ready"
    subreaper.append(int(child))
    out = _dump(proc.pid, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    proc.wait(30)
    _reap(subreaper)
    r, info = _restore_detached(Path(str(out["layer"])))
    assert r.wait(60) == 0
    pids = {m["dumped_pid"]: m["pid"] for m in info["tree"]}  # type: ignore[attr-defined]
    assert pids == {proc.pid: proc.pid, int(child): int(child)}
    assert _inode(proc.pid, "rw-s") == _inode(int(child), "rw-s")
    os.kill(int(child), signal.SIGUSR1)
    os.kill(proc.pid, signal.SIGUSR1)
    assert r.stdout is not None
    assert r.stdout.readline() == b"ok\n"
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


def _inode(pid: int, perms: str) -> str:
    [ln] = [x for x in Path(f"/proc/{pid}/maps").read_text().splitlines() if x.split()[1] == perms]
    return ln.split()[4]


ANON = """
import mmap, os, signal
m = mmap.mmap(-1, 3 * 4096)  # MAP_SHARED|MAP_ANONYMOUS
m[:6] = b"parent"
m[8192 : 8192 + 5] = b"third"
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
c = os.fork()
if c == 0:
    signal.sigwait({signal.SIGUSR1})
    ok = m[:6] == b"parent" and m[8192 : 8192 + 5] == b"third"
    m[:6] = b"child!"
    os._exit(0 if ok else 3)
print("ready", c, flush=True)
signal.sigwait({signal.SIGUSR1})
_, st = os.waitpid(c, 0)
bad = []
if os.waitstatus_to_exitcode(st) != 0: bad.append(f"child {st}")
if m[:6] != b"child!": bad.append(f"mapping {m[:6]!r}")
print("ok" if not bad else " ".join(bad), flush=True)
"""


def test_shared_anonymous_memory_of_parent_and_child(tmp_path: Path, subreaper: list[int]) -> None:
    """MAP_SHARED|MAP_ANONYMOUS memory a parent shares with its child (fork): one object again,
    still `/dev/zero (deleted)` in both, at the same addresses; a write of the restored child
    reaches the restored parent. From a chain (a full tree dump, then an incremental --kill)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ANON], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    word, child = proc.stdout.readline().split()
    assert word == b"ready"
    subreaper.append(int(child))
    assert _dump(proc.pid, tmp_path / "d")["restorable"]
    out = _dump(proc.pid, tmp_path / "d", "--incremental", "--kill")
    assert out["restorable"], out["not_restorable"]
    proc.wait(30)
    _reap(subreaper)
    r, _ = _restore_detached(Path(str(out["layer"])))
    assert r.wait(60) == 0
    mine = _shm(proc.pid)
    assert mine and mine == _shm(int(child)), (mine, _shm(int(child)))
    os.kill(int(child), signal.SIGUSR1)
    os.kill(proc.pid, signal.SIGUSR1)
    assert r.stdout is not None
    assert r.stdout.readline() == b"ok\n"
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


def _shm(pid: int) -> list[tuple[str, str, str]]:
    """(range, inode, path) of the process's shared anonymous mappings."""
    out = []
    for ln in Path(f"/proc/{pid}/maps").read_text().splitlines():
        w = ln.split(maxsplit=5)
        if len(w) == 6 and w[1].endswith("s") and w[5].startswith("/dev/zero"):
            out.append((w[0], w[4], w[5]))
    return out
