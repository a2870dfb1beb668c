"""What one tree dump stores once for the whole tree (issue 12 B4): the bytes of shared memory that
several of its processes hold.

The members are dumped one after the other inside one freeze (ckpt/dumptree.py), parents first, so
every holder of a shared object sees the same bytes. The first member that holds an object stores
it; the others refer to it:

- objects (memfds, deleted files, SysV segments: ckpt/image/objects.py): a later holder's record
  keeps the object's metadata but not its contents, and names the holder (`held_by`), whose layer
  of the same tree dump has them. Nothing of it is read from the later holder at all.
- shared mappings (MAP_SHARED|MAP_ANONYMOUS, and shared mappings of files: memfds, SysV segments,
  /dev/shm files...): the part of a later holder's mapping whose range of the object (by its
  offset) lies in mappings an earlier member stores is not copied, the rest is (and is stored by
  this holder for those after it): each page of the object is stored once, whichever part of it
  each process maps. The tree record lists each part not copied with the member that stores it
  (`shared_maps`: a whole mapping, or a piece of one), and the restore does not fill it: the one
  object the tree restore makes for all of them (restore/treeobjects.py) gets those bytes from
  that holder (files and objects: from themselves, as for a lone process).

Keyed by what the kernel shows (device and inode), never by paths; but for a SysV segment, whose
"inode" is its id (0, or that of another shmem object): told apart by its path (ckpt/sysvmap.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ckpt import ranges
from ckpt.proc.maps import Vma
from ckpt.sysvmap import ObjectKey, object_key


def shared_memory(v: Vma) -> bool:
    """A shared mapping whose pages the object has for every holder: shared anonymous memory, and
    shared mappings of files (memfds, SysV segments, /dev/shm files, deleted files, any file). A
    restore fills only the first kind from the pages (the others come from their object or file),
    but every dump copies their present pages (shmem ones whole): `ckpt read` and `diff` show them."""
    # (Not by inode: a SysV segment's is its shmid, which may be 0.)
    return v.shared and v.path.startswith("/") and not v.is_special


@dataclass
class TreeShare:
    """Filled member by member, in the order they are dumped (parents first)."""

    # (pid, start, end, holder): mappings of `pid` whose pages `holder`'s layer has
    maps: list[tuple[int, int, int, int]] = field(default_factory=list)
    # object_key -> (offset, end, pid): parts of an object some member's layer stores
    _cover: dict[ObjectKey, list[tuple[int, int, int]]] = field(default_factory=dict)
    _objects: dict[tuple[str, int, int], int] = field(default_factory=dict)  # -> the holder's pid
    # pid -> ((start, end) of an unreadable mapping, key, part): holders once read (`settle`)
    _pending: dict[int, list[tuple[tuple[int, int], ObjectKey, tuple[int, int, int]]]] = field(
        default_factory=dict
    )

    def skip_pages(self, pid: int, vmas: list[Vma]) -> list[tuple[int, int]]:
        """The address ranges of `pid` not to copy (sorted): the parts of its mappings whose part of
        the object an earlier member stores. A mapping another covers only partly is copied only
        where none does, so each page of an object is stored once per tree dump, whichever parts of
        it each holder maps (a child that maps a window of its parent's region, or the reverse)."""
        skip: list[tuple[int, int]] = []
        mine: list[tuple[ObjectKey, tuple[int, int, int]]] = []
        for v in vmas:
            if not shared_memory(v):
                continue
            key = object_key(v.dev, v.inode, v.path)
            lo = v.offset
            pieces, gaps = _covered_by(self._cover.get(key, []), lo, lo + v.size)
            for a, b, holder in pieces:
                skip.append((v.start + a - lo, v.start + b - lo))
                self.maps.append((pid, v.start + a - lo, v.start + b - lo, holder))
            if v.readable:
                mine.extend((key, (a, b, pid)) for a, b in gaps)
            else:
                # Not readable (PROT_NONE...): its pages are read all the same (through
                # /proc/PID/mem; a shmem object's whole), and its restore fills them through a
                # writable mapping of the object, so it stands for the others' too, once its read
                # succeeded (`settle`); were it no holder, each later one would store them again.
                later = self._pending.setdefault(pid, [])
                later.extend(((v.start, v.end), key, (a, b, pid)) for a, b in gaps)
        for key, part in mine:
            self._cover.setdefault(key, []).append(part)
        return ranges.merge(skip)

    def settle(self, pid: int, failed: Iterable[int]) -> None:
        """`pid`'s pages are read: its unreadable mappings hold their parts for the members after it,
        but those with a page whose read failed (`failed`: addresses), whose restore is refused."""
        waiting = self._pending.pop(pid, [])
        bad = ranges.spans_hit([span for span, _, _ in waiting], failed)
        for (_, key, part), hit in zip(waiting, bad, strict=True):
            if not hit:
                self._cover.setdefault(key, []).append(part)

    def holder(self, pid: int, kind: str, dev: int, ino: int) -> int:
        """The member whose layer stores this object's contents, if not `pid` (then 0: `pid` stores
        it, and is its holder from now on)."""
        h = self._objects.setdefault((kind, dev, ino), pid)
        return 0 if h == pid else h


def _covered_by(
    parts: list[tuple[int, int, int]], lo: int, hi: int
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """[lo, hi) of an object split into the pieces members' stored parts cover, (start, end, pid),
    the earliest member first where two do, and the gaps none covers (both sorted)."""
    pieces: list[tuple[int, int, int]] = []
    todo = [(lo, hi)]
    for pid in dict.fromkeys(p for _, _, p in parts):
        theirs = ranges.merge([(s, e) for s, e, p in parts if p == pid])
        left: list[tuple[int, int]] = []
        for a, b in todo:
            pos = a
            for s, e in theirs:
                if e <= pos:
                    continue
                if s >= b:
                    break
                if s > pos:
                    left.append((pos, s))
                pieces.append((max(s, pos), min(e, b), pid))
                pos = min(e, b)
            if pos < b:
                left.append((pos, b))
        todo = left
    return sorted(pieces), todo


__all__ = ["TreeShare", "shared_memory"]
