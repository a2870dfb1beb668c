"""Cheap pre-freeze estimates of how many pages a dump will copy, to size the page buffer.

Taken before the freeze and never trusted for correctness: the frozen phase reads the real set and
grows the buffer if the estimate was short.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ckpt.memory import (
    PAGE_IS_WPALLOWED,
    PAGE_IS_WRITTEN,
    PM_SOFT_DIRTY,
    PagemapScanner,
    present_pages,
    read_pagemap,
)
from ckpt.proc.maps import PAGE_SIZE, Vma
from ckpt.track.base import tracked_vmas


def estimate_pages(pid: int, vmas: Sequence[Vma], tracker: str | None, incremental: bool) -> int:
    tv = tracked_vmas(vmas)
    if not incremental or tracker in (None, "hash"):
        return len(present_pages(pid, tv))
    if tracker == "soft-dirty":
        return sum(
            int(np.count_nonzero(read_pagemap(pid, v.start, v.end) & np.uint64(PM_SOFT_DIRTY))) for v in tv
        )
    n = 0
    with PagemapScanner(pid) as sc:
        for v in tv:
            # no PM_SCAN_WP_MATCHING here: looking must not consume the dirty bits
            for r in sc.scan(
                v.start, v.end, category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN | PAGE_IS_WPALLOWED
            ):
                n += (r.end - r.start) // PAGE_SIZE
    return n
