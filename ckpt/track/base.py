"""The dirty-tracker interface: one idea, three mechanisms (soft-dirty, uffd-wp, hash).

A tracker answers one question while the target is frozen: which pages may have been written since
the previous dump? It must answer and re-arm atomically (in the same freeze), so that no write
between two dumps can be lost. See images/FORMAT.md "Why the order is safe".
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np

from ckpt.proc.maps import PAGE_SIZE, Vma
from ckpt.ranges import empty, merge

if TYPE_CHECKING:
    from ckpt.ptrace import Frozen


@dataclass
class ParentInfo:
    """What a tracker needs to know of the parent layer."""

    vmas: Sequence[dict[str, Any]]  # the parent's VMA records (start, end, inode, offset, path, status)
    state: dict[str, Any] | None  # the parent's tracker_state
    # The parent held at most pageset.small_max() pages: the dirty sets may come as array('Q') (no
    # numpy for a small process's dump, issue 9 part 3); the caller's set functions (ranges.py)
    # take either kind.
    small: bool = False
    # The parent's dumped mappings as fresh_ranges compares them: made with the record, before the
    # freeze (~0.1 ms of int() and dict lookups that every incremental's freeze made).
    spans: list[tuple[int, int, int, int, str]] = field(init=False, repr=False, compare=False)

    # fresh()'s last answer and the mappings it was for.
    _fresh: tuple[list[Vma], list[tuple[int, int]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.spans = parent_spans(self.vmas)

    def fresh(self, vmas: Sequence[Vma]) -> list[tuple[int, int]]:
        """fresh_ranges(vmas, self), the last answer kept: a dump asks it once before its freeze
        with the mappings it read there, and the freeze's read of an idle process gives the same
        records (proc/maps.py keeps them for the same text), so the answer inside is one compare
        of two lists of the same objects."""
        vmas = list(vmas)
        last = self._fresh
        if last is not None and last[0] == vmas:
            return list(last[1])
        out = fresh_ranges(vmas, self)
        self._fresh = (vmas, out)
        return list(out)


@dataclass
class DirtySet:
    """Pages that may have been written since the parent, and ranges with nothing to inherit."""

    # uint64 page addresses the tracker reports written (ascending)
    pages: np.ndarray
    # new or replaced ranges: dumped wholly, nothing below shows through
    fresh: list[tuple[int, int]] = field(default_factory=list)
    # ranges whose every present page is a candidate (the tracker cannot tell which were written) but
    # which continue the parent's mapping: unchanged pages there are still inherited
    whole: list[tuple[int, int]] = field(default_factory=list)
    # False for the hash tracker: `pages` are candidates, and equality means "not written"
    exact: bool = True
    # pages of `pages` that are not present now (written, then dropped with MADV_DONTNEED): they read
    # as zeros (or from their file) again
    gone: np.ndarray = field(default_factory=empty)
    # every present page of the tracked mappings, when the tracker had to find them anyway
    # (soft-dirty reads the whole pagemap, hashing reads everything); None when it did not (uffd-wp),
    # which spares the dumper a whole-process scan inside the freeze
    present: np.ndarray | None = None
    # (n, 2) uint64 [start, end) ranges of the followed mappings where nothing is present now (uffd-wp
    # scans them in the freeze): a page the parent held that lies here was dropped (MADV_DONTNEED,
    # munmap + mmap in place) and reads as zeros or from its file again. None: use `gone`/`present`.
    # A small dump's (ParentInfo.small) are a list of (start, end).
    holes: np.ndarray | list[tuple[int, int]] | None = None
    # pages of `pages` reported in units of a transparent huge page (2 MiB): a first touch that
    # faulted in a whole THP (uffd-wp), or a huge page whose soft-dirty bit covers all of it. Most of
    # them were not written; the digest compare after the thaw keeps the unchanged ones out.
    huge: int = 0


class Tracker(Protocol):
    name: str

    def arm(self, frozen: Frozen, vmas: Sequence[Vma]) -> dict[str, Any]:
        """Start tracking from now. Returns the state kept in the layer."""
        ...

    def dirty(
        self, frozen: Frozen, vmas: Sequence[Vma], parent: ParentInfo
    ) -> tuple[DirtySet, dict[str, Any]]:
        """Pages written since the parent's dump; re-arms in the same call. Returns the new state too."""
        ...

    def close(self, frozen: Frozen, state: dict[str, Any] | None) -> None:
        """Undo whatever arm() put into the target."""
        ...

    def check_armed(self, pid: int, state: dict[str, Any] | None) -> None:
        """Before freezing for an incremental dump: TrackerError if the tracking the parent recorded
        is gone from the target (nothing to check for trackers that put nothing into it)."""
        ...


def tracked_vmas(vmas: Sequence[Vma]) -> list[Vma]:
    """The mappings whose pages a dump copies and a tracker follows."""
    return [v for v in vmas if v.dumpable]


def parent_spans(parent_vmas: Sequence[dict[str, Any]]) -> list[tuple[int, int, int, int, str]]:
    """(start, end, inode, offset - start, path) of each dumped mapping of the parent, by start."""
    return sorted(
        (int(p["start"]), int(p["end"]), int(p["inode"]), int(p["offset"]) - int(p["start"]), str(p["path"]))
        for p in parent_vmas
        if p.get("status", "dumped") == "dumped"
    )


def fresh_ranges(
    vmas: Sequence[Vma], parent_vmas: Sequence[dict[str, Any]] | ParentInfo
) -> list[tuple[int, int]]:
    """Parts of today's mappings that do not continue a mapping of the parent (its VMA records, or
    a ParentInfo, whose spans are made already).

    A page continues the parent's page at the same address only if both lie in mappings of the same
    object at the same offset (same inode and the same offset - start). A mapping that moved (mremap),
    grew, or was unmapped and mapped again elsewhere fails that test: its pages are dumped wholly,
    whatever the tracker says (uffd-wp markers and soft-dirty bits move or vanish with the mapping).
    """
    pv = parent_vmas.spans if isinstance(parent_vmas, ParentInfo) else parent_spans(parent_vmas)
    out: list[tuple[int, int]] = []
    # The parent's mappings never overlap: sorted by start, their ends are sorted too, so each of
    # today's mappings looks only at those from the first that ends past its start (inside every
    # freeze: a scan of all pairs was ~25 x 25 steps for a small process).
    ends = [p[1] for p in pv]
    for v in tracked_vmas(vmas):
        cur = v.start
        key = (v.inode, v.offset - v.start, v.path)
        for ps, pe, pino, pdelta, ppath in pv[bisect.bisect_right(ends, v.start) :]:
            if ps >= v.end:
                break
            if pe <= cur:
                continue
            same = (pino, pdelta, ppath) == key or (
                # anonymous memory: the kernel's pgoff may differ after merges; the path
                # ("", "[heap]", "[stack]") and inode 0 are what identify it (a SysV segment's
                # inode is its id, 0 for a namespace's first: it continues only at its offset)
                v.inode == 0 and pino == 0 and ppath == v.path and not v.is_sysv
            )
            if not same:
                continue
            lo, hi = max(ps, v.start), min(pe, v.end)
            if lo > cur:
                out.append((cur, lo))
            cur = max(cur, hi)
        if cur < v.end:
            out.append((cur, v.end))
    return merge(out)


__all__ = ["PAGE_SIZE", "DirtySet", "ParentInfo", "Tracker", "fresh_ranges", "parent_spans", "tracked_vmas"]
