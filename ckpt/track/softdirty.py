"""Soft-dirty tracking (Documentation/admin-guide/mm/soft-dirty.rst).

Clear with `4 > /proc/PID/clear_refs`; afterwards bit 55 of a page's pagemap entry says it was
written. New and expanded mappings come up wholly soft-dirty, and an unmapped-then-remapped region
reads as dirty, which `fresh_ranges` covers as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np

from ckpt.errors import TargetExited, TrackerError
from ckpt.memory import PAGEMAP_WINDOW, PM_PRESENT, PM_SOFT_DIRTY, PM_SWAPPED, read_pagemap, swap_active
from ckpt.proc.maps import PAGE_SIZE, Vma
from ckpt.ranges import member
from ckpt.track.base import DirtySet, ParentInfo, tracked_vmas

if TYPE_CHECKING:
    from ckpt.ptrace import Frozen


HUGE_PAGES = 512  # 4 KiB pages in a 2 MiB transparent huge page


def _whole_huge(base: int, idx: np.ndarray) -> int:
    """Dirty pages (indices from `base`) that fill whole 2 MiB-aligned blocks: the soft-dirty bit of a
    THP covers all 512 of its pages, so such blocks are most likely one huge page with one write. An
    estimate: pagemap does not say which pages are huge, and 512 real writes look the same."""
    if not len(idx):
        return 0
    first = (base // PAGE_SIZE) % HUGE_PAGES
    block = (idx + first) // HUGE_PAGES
    _, counts = np.unique(block, return_counts=True)
    return int(np.count_nonzero(counts == HUGE_PAGES)) * HUGE_PAGES


def clear_refs(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("4")
    except FileNotFoundError:
        raise TargetExited(f"process {pid} exited") from None
    except OSError as e:
        raise TrackerError(f"cannot clear soft-dirty bits of process {pid}: {e.strerror}") from None


class SoftDirtyTracker:
    name = "soft-dirty"

    def arm(self, frozen: Frozen, vmas: Sequence[Vma]) -> dict[str, Any]:
        clear_refs(frozen.pid)
        return {}

    def dirty(
        self, frozen: Frozen, vmas: Sequence[Vma], parent: ParentInfo
    ) -> tuple[DirtySet, dict[str, Any]]:
        dirty, present = [], []
        sd = np.uint64(PM_SOFT_DIRTY)
        live = np.uint64(PM_PRESENT | (PM_SWAPPED if swap_active() else 0))
        huge = 0
        for v in tracked_vmas(vmas):
            # In windows: the pagemap of a TiB reservation is GBs of entries.
            for lo in range(v.start, v.end, PAGEMAP_WINDOW):
                ents = read_pagemap(frozen.pid, lo, min(v.end, lo + PAGEMAP_WINDOW))
                base = np.uint64(lo)
                d = np.flatnonzero(ents & sd)
                dirty.append(base + d.astype(np.uint64) * np.uint64(PAGE_SIZE))
                present.append(base + np.flatnonzero(ents & live).astype(np.uint64) * np.uint64(PAGE_SIZE))
                huge += _whole_huge(lo, d)
        pages = np.concatenate(dirty) if dirty else np.empty(0, np.uint64)
        now = np.concatenate(present) if present else np.empty(0, np.uint64)
        fresh = parent.fresh(vmas)
        # Re-arm in the same freeze: nothing can write between reading the bits and clearing them.
        clear_refs(frozen.pid)
        # A zapped page (MADV_DONTNEED) loses its pagemap entry and with it the soft-dirty bit: the
        # dumper finds such pages by comparing `present` with the parent's.
        return DirtySet(pages=pages, fresh=fresh, gone=pages[~member(pages, now)], present=now, huge=huge), {}

    def close(self, frozen: Frozen, state: dict[str, Any] | None) -> None:
        # Nothing was put into the target; soft-dirty bits cost it nothing.
        return None

    def check_armed(self, pid: int, state: dict[str, Any] | None) -> None:
        return None  # nothing was put into the target
