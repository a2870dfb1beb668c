"""What one tree dump stores once for the whole tree (issue 12 B4): the bytes of shared memory that
several of its processes hold.

The members are dumped one after the other inside one freeze (ckpt/dumptree.py), parents first, so
every holder of a shared object sees the same bytes. The first member that holds an object stores
it; the others refer to it:

- objects (memfds, deleted files, SysV segments: ckpt/image/objects.py): a later holder's record
  keeps the object's metadata but not its contents, and names the holder (`held_by`), whose layer
  of the same tree dump has them. Nothing of it is read from the later holder at all.
- shared mappings (MAP_SHARED|MAP_ANONYMOUS, and shared mappings of files: memfds, SysV segments,
  /dev/shm files...): a later holder's mapping whose whole range of the object (its offset and
  size) lies in mappings an earlier member stores is not copied; the tree record lists it
  (`shared_maps`), and the restore does not fill it: the one object the tree restore makes for all
  of them (restore/treeobjects.py) gets its bytes from the holder (files and objects: from
  themselves, as for a lone process).

Keyed by what the kernel shows (device and inode), never by paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckpt import ranges
from ckpt.proc.maps import Vma


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
    # (dev, inode) -> (offset, end, pid): parts of an object some member's layer stores
    _cover: dict[tuple[str, int], list[tuple[int, int, int]]] = field(default_factory=dict)
    _objects: dict[tuple[str, int, int], int] = field(default_factory=dict)  # -> the holder's pid

    def skip_pages(self, pid: int, vmas: list[Vma]) -> list[tuple[int, int]]:
        """The address ranges of `pid` not to copy (sorted): mappings an earlier member stores."""
        skip: list[tuple[int, int]] = []
        mine: list[tuple[tuple[str, int], tuple[int, int, int]]] = []
        for v in vmas:
            if not shared_memory(v):
                continue
            key = (v.dev, v.inode)
            holder = _covered_by(self._cover.get(key, []), v.offset, v.offset + v.size)
            if holder:
                skip.append((v.start, v.end))
                self.maps.append((pid, v.start, v.end, holder))
            elif v.readable:
                # Only a mapping the holder's restore fills can stand for the others' (an unreadable
                # one is rebuilt from what the process had written through it, if anything).
                mine.append((key, (v.offset, v.offset + v.size, pid)))
        for key, part in mine:
            self._cover.setdefault(key, []).append(part)
        return ranges.merge(skip)

    def holder(self, pid: int, kind: str, dev: int, ino: int) -> int:
        """The member whose layer stores this object's contents, if not `pid` (then 0: `pid` stores
        it, and is its holder from now on)."""
        h = self._objects.setdefault((kind, dev, ino), pid)
        return 0 if h == pid else h


def _covered_by(parts: list[tuple[int, int, int]], lo: int, hi: int) -> int:
    """The pid of a member whose stored parts cover [lo, hi) of the object (0: none does)."""
    for pid in dict.fromkeys(p for _, _, p in parts):
        pos = lo
        for s, e in ranges.merge([(s, e) for s, e, p in parts if p == pid]):
            if s <= pos < e:
                pos = e
        if pos >= hi:
            return pid
    return 0


__all__ = ["TreeShare", "shared_memory"]
