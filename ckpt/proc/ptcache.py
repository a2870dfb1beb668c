"""The page-table walks of a dump (smaps' VmFlags, the guard regions), kept from one pre-dump to the
next of the same process while its mappings stay the same.

smaps walks every page-table entry (~20-40 ms per GiB present, here) and a migration's live round
would pay it every round. A pre-dump layer is no moment of the process and is never restored on its
own: what it records of VmFlags only lets the destination set them early into its warm helper. A
madvise() over a whole mapping (invisible in /proc/PID/maps) between two rounds leaves a stale
record there; the final layer reads them frozen, and a destination whose helper holds other flags
restores cold (ckpt/migrate/warm.py). So the final layer is always exact; only a pre-dump reuses."""

from __future__ import annotations

from typing import Any

from ckpt.proc.maps import Vma

Walks = tuple[dict[int, str], list[list[int]]]  # (VmFlags by mapping start, guard regions)


def _key(vmas: list[Vma]) -> tuple[Any, ...]:
    return tuple((v.start, v.end, v.perms, v.offset, v.dev, v.inode, v.path) for v in vmas)


class Known:
    """A finished walk, shaped as PageTableReads (its result, no thread)."""

    def __init__(self, walks: Walks) -> None:
        self._walks = walks

    def result(self) -> Walks:
        return self._walks


class PageTablesCache:
    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._walks: Walks | None = None
        self.hits = 0

    def lookup(self, vmas: list[Vma]) -> Known | None:
        if self._walks is None or _key(vmas) != self._key:
            return None
        self.hits += 1
        return Known(self._walks)

    def store(self, vmas: list[Vma], walks: Walks) -> None:
        self._key, self._walks = _key(vmas), walks
