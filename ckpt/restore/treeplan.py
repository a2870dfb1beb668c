"""What a process tree needs beyond each process's own plan: sessions and process groups that can be
rebuilt, zombies, and the resources two processes share (refused until they are restored shared).
Pure: run by `dump` on the records it is about to write, and by the restore before it starts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ckpt.image.fdobjects import PipeRecord
from ckpt.image.format import FdRecord, VmaRecord
from ckpt.image.objects import ObjectRecord, vma_dev
from ckpt.image.tree import TreeRecord
from ckpt.sysvmap import is_sysv_path

_SHARED_ANON = ("/dev/zero (deleted)", "/dev/zero")
SHARED_KINDS = ("file", "dir")  # open files the restore gives back shared (restore/tree.py)
TREE_SHARED_OBJECTS = ("memfd", "ghost", "sysv")  # made once for the whole tree (restore/treeobjects.py)


class _Records(Protocol):
    @property
    def fds(self) -> list[FdRecord]: ...
    @property
    def vmas(self) -> list[VmaRecord]: ...
    @property
    def pipes(self) -> list[PipeRecord]: ...


@dataclass
class TreePipe:
    """A pipe between processes of the tree: both ends inside it, held by more than one process.
    The restore makes it once (in ckpt), and each holder takes its ends from there."""

    ino: int
    readers: dict[int, FdRecord] = field(default_factory=dict)  # pid -> its first fd on the read end
    writers: dict[int, FdRecord] = field(default_factory=dict)
    record: PipeRecord | None = None  # size and bytes, from any holder's layer (one moment: all frozen)

    @property
    def holders(self) -> set[int]:
        return set(self.readers) | set(self.writers)


def tree_pipes(records: Mapping[int, _Records]) -> list[TreePipe]:
    found: dict[int, TreePipe] = {}
    for pid, r in sorted(records.items()):
        for f in sorted(r.fds, key=lambda f: f.fd):
            if f.kind != "pipe":
                continue
            tp = found.setdefault(f.ino, TreePipe(f.ino))
            mode = f.flags & os.O_ACCMODE
            if mode != os.O_WRONLY:
                tp.readers.setdefault(pid, f)
            if mode != os.O_RDONLY:
                tp.writers.setdefault(pid, f)
        for rec in getattr(r, "pipes", None) or []:
            if rec.ino in found and found[rec.ino].record is None and not rec.fifo:
                found[rec.ino].record = rec
    # One end alone (a shell's or the test's pipe on fds 0-2) is outside, as for a single process;
    # both ends in one process alone is that process's own pipe (restore/pipes.py).
    return [tp for _, tp in sorted(found.items()) if tp.readers and tp.writers and len(tp.holders) > 1]


def group_refusals(tree: TreeRecord) -> list[str]:
    """Each process is forked from its restored parent and so starts in its parent's session and
    group; it then makes its own (setsid, setpgid(0, 0)) or joins another group of its session led
    by a process of the tree. The root keeps `ckpt restore`'s session and group, which stand for
    the ones it had (its processes in them stay together). What cannot be built that way is refused."""
    out: list[str] = []
    by = {p.pid: p for p in tree.processes}
    root = tree.root
    for p in tree.processes[1:]:
        q = by[p.ppid]
        if p.sid == p.pid:
            continue  # setsid(): its own session and group
        if p.sid != q.sid:
            out.append(
                f"pid {p.pid} is in session {p.sid}, not in its parent's ({q.sid}): "
                "a restored process cannot join another session"
            )
            continue
        g = p.pgid
        if g == p.pid or (g == root.pgid and p.sid == root.sid):
            continue
        leader = by.get(g)
        if leader is None or leader.pgid != g:
            out.append(
                f"pid {p.pid} is in process group {g}, whose leader is not a process of the tree "
                "(it exited): no restored process can have that group id"
            )
        elif leader.sid != p.sid:
            out.append(f"pid {p.pid} is in process group {g} of another session ({leader.sid})")
    return out


def zombie_refusals(tree: TreeRecord) -> list[str]:
    out = []
    for p in tree.processes:
        if p.exit_status is not None and p.exit_status & 0x80:
            out.append(
                f"zombie {p.pid} was killed by signal {p.exit_status & 0x7F} with a core dump "
                "(its status cannot be made again without writing a core file)"
            )
    return out


def shared_refusals(tree: TreeRecord, records: Mapping[int, _Records]) -> list[str]:
    """Open descriptions, pipes and objects held by two processes of the tree that cannot be given
    back shared. (Open files, pipes with their bytes, memfds, deleted files and shared anonymous
    memory are: restore/tree.py, restore/treeobjects.py.)"""
    out: list[str] = []
    kinds = {(pid, f.fd): f for pid, r in records.items() for f in r.fds}
    for p1, f1, p2, f2 in tree.shared_files:
        a, b = kinds.get((p1, f1)), kinds.get((p2, f2))
        if a is None or b is None or (a.kind not in SHARED_KINDS and not _tree_object(records[p1], a)):
            what = a.path if a is not None else "file"
            out.append(
                f"fd {f1} of pid {p1} and fd {f2} of pid {p2} are one open {what}, which ckpt "
                "cannot give back shared: each would get its own"
            )
    for tp in tree_pipes(records):
        if tp.record is None:
            pids = ", ".join(str(p) for p in sorted(tp.holders))
            out.append(
                f"a pipe between processes of the tree (pipe:[{tp.ino}], pids {pids}) whose bytes "
                "the layers did not record (before format version 3)"
            )
    for so in shared_objects(records):
        if so.kind not in TREE_SHARED_OBJECTS:
            out.append(
                f"{so.label} (inode {so.ino}) is used by several processes ({so.who}): each would "
                "come back with a copy of its own, no longer shared"
            )
    return out


@dataclass
class SharedObject:
    """A memfd, deleted file or SysV segment (an object record of the layers: image/objects.py)
    used by more than one process of the tree, through fds or mappings."""

    kind: str
    dev: int
    ino: int
    label: str
    users: set[int] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.dev, self.ino)

    @property
    def who(self) -> str:
        return ", ".join(str(p) for p in sorted(self.users))


def shared_anon(records: Mapping[int, _Records]) -> dict[tuple[str, int], tuple[int, set[int]]]:
    """Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, shared /dev/zero) mapped by more than
    one process, by (dev, inode) as maps shows it: (the size its mappings need, their pids). The
    restore makes each once for the tree (restore/treeobjects.py)."""
    found: dict[tuple[str, int], tuple[int, set[int]]] = {}
    for pid, r in sorted(records.items()):
        for v in r.vmas:
            if v.perms[3] == "s" and v.path in _SHARED_ANON:
                size, users = found.get((v.dev, v.inode), (0, set()))
                users.add(pid)
                found[(v.dev, v.inode)] = (max(size, v.offset + v.end - v.start), users)
    return {k: x for k, x in sorted(found.items()) if len(x[1]) > 1}


def object_users(r: object) -> dict[tuple[str, int, int], ObjectRecord]:
    """The objects one process uses, by (kind, dev, ino), as its restore finds them (planobjects):
    a mapping by the device and inode it shows, an fd by its (not for SysV segments, which have no fd).
    Whatever the paths say: two files of one name are two objects, one file under two names one."""
    objs: list[ObjectRecord] = list(
        getattr(r, "objects", None) or getattr(getattr(r, "meta", None), "objects", None) or []
    )
    if not objs:
        return {}
    fds = {(f.dev, f.ino) for f in getattr(r, "fds", [])}
    # (a SysV segment's "inode" is its id, which may be 0 or a memfd's: told by its path, sysvmap.py)
    vmas = {(vma_dev(v.dev), v.inode, is_sysv_path(v.path)) for v in getattr(r, "vmas", [])}
    out = {}
    for o in objs:
        if (o.dev, o.ino, o.kind == "sysv") in vmas or (o.kind != "sysv" and (o.dev, o.ino) in fds):
            out[(o.kind, o.dev, o.ino)] = o
    return out


def shared_objects(records: Mapping[int, object]) -> list[SharedObject]:
    found: dict[tuple[str, int, int], SharedObject] = {}
    for pid, r in sorted(records.items()):
        for key, o in object_users(r).items():
            so = found.setdefault(key, SharedObject(o.kind, o.dev, o.ino, _label(o)))
            so.users.add(pid)
    return [so for _, so in sorted(found.items()) if len(so.users) > 1]


def _tree_object(r: object, f: FdRecord) -> bool:
    """An fd of a memfd or deleted file that the restore makes once for the tree (then one open
    description of it can be shared too)."""
    return any(k[0] in TREE_SHARED_OBJECTS and k[1:] == (f.dev, f.ino) for k in object_users(r))


def _label(o: ObjectRecord) -> str:
    if o.kind == "ghost" and o.name.startswith("/dev/shm/"):
        return f"POSIX shared memory {o.name} (deleted)"
    return o.label()


def tree_refusals(tree: TreeRecord, records: Mapping[int, _Records]) -> list[str]:
    return [*group_refusals(tree), *zombie_refusals(tree), *shared_refusals(tree, records)]


__all__ = [
    "SharedObject",
    "TreePipe",
    "group_refusals",
    "object_users",
    "shared_anon",
    "shared_objects",
    "shared_refusals",
    "tree_pipes",
    "tree_refusals",
    "zombie_refusals",
]
