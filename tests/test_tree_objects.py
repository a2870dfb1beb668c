"""Objects shared between the processes of a tree (issue 12 B3/B4): which memfds, deleted files and
SysV segments several processes use is read from the layers' object records (kind, device, inode),
never from the paths the processes showed them under.

The first tests are on records (what the dump writes and the restore reads); the rest dump and restore
real trees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ckpt.image.fdobjects import PipeRecord
from ckpt.image.format import FdRecord, VmaRecord
from ckpt.image.objects import ObjectRecord
from ckpt.image.tree import TreeProc, TreeRecord
from ckpt.restore.treeplan import shared_objects, shared_refusals

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


def test_a_shared_sysv_segment_is_refused_by_name() -> None:
    seg = _obj("sysv", 9, "")
    a = _Meta(vmas=[_map(9, "/SYSV00000000 (deleted)")], objects=[seg])
    b = _Meta(vmas=[_map(9, "/SYSV00000000 (deleted)")], objects=[seg])
    [why] = shared_refusals(_tree(10, 20), {10: a, 20: b})
    assert "SysV shared memory segment 9" in why and "(10, 20)" in why and "no longer shared" in why
