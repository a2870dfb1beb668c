"""Cheap pre-freeze estimates of how many pages a dump will copy, to size the page buffer.

Taken before the freeze and never trusted for correctness: the frozen phase reads the real set and
grows the buffer if the estimate was short.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np

from ckpt.memory import (
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PAGE_IS_WRITTEN,
    PAGEMAP_WINDOW,
    PM_SOFT_DIRTY,
    PagemapScanner,
    count_present,
    read_pagemap,
)
from ckpt.proc.maps import Vma
from ckpt.track.base import tracked_vmas


def estimate_pages(pid: int, vmas: Sequence[Vma], tracker: str | None, incremental: bool) -> int:
    tv = tracked_vmas(vmas)
    if not incremental or tracker in (None, "hash"):
        return count_present(pid, tv)
    if tracker == "soft-dirty":
        # In windows: the pagemap of a TiB reservation is GBs of entries.
        return sum(
            int(
                np.count_nonzero(
                    read_pagemap(pid, lo, min(v.end, lo + PAGEMAP_WINDOW)) & np.uint64(PM_SOFT_DIRTY)
                )
            )
            for v in tv
            for lo in range(v.start, v.end, PAGEMAP_WINDOW)
        )
    with PagemapScanner(pid) as sc:
        # No PM_SCAN_WP_MATCHING here: looking must not consume the dirty bits. Holes read as WRITTEN
        # but are never copied: only populated pages count.
        return sc.count(
            [(v.start, v.end) for v in tv],
            category_mask=PAGE_IS_WRITTEN,
            category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask=PAGE_IS_WRITTEN,
        )
