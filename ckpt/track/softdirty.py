"""Soft-dirty tracking (Documentation/admin-guide/mm/soft-dirty.rst).

Clear with `4 > /proc/PID/clear_refs`; afterwards bit 55 of a page's pagemap entry says it was
written. New and expanded mappings come up wholly soft-dirty, and an unmapped-then-remapped region
reads as dirty, which `fresh_ranges` covers as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ckpt.errors import TargetExited, TrackerError
from ckpt.memory import PM_PRESENT, PM_SOFT_DIRTY, PM_SWAPPED, read_pagemap, swap_active
from ckpt.proc.maps import PAGE_SIZE, Vma
from ckpt.ranges import member
from ckpt.track.base import DirtySet, ParentInfo, fresh_ranges, tracked_vmas

if TYPE_CHECKING:
    from ckpt.ptrace import Frozen


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
        for v in tracked_vmas(vmas):
            ents = read_pagemap(frozen.pid, v.start, v.end)
            base = np.uint64(v.start)
            dirty.append(base + np.flatnonzero(ents & sd).astype(np.uint64) * np.uint64(PAGE_SIZE))
            present.append(base + np.flatnonzero(ents & live).astype(np.uint64) * np.uint64(PAGE_SIZE))
        pages = np.concatenate(dirty) if dirty else np.empty(0, np.uint64)
        now = np.concatenate(present) if present else np.empty(0, np.uint64)
        fresh = fresh_ranges(vmas, parent.vmas)
        # Re-arm in the same freeze: nothing can write between reading the bits and clearing them.
        clear_refs(frozen.pid)
        # A zapped page (MADV_DONTNEED) loses its pagemap entry and with it the soft-dirty bit: the
        # dumper finds such pages by comparing `present` with the parent's.
        return DirtySet(pages=pages, fresh=fresh, gone=pages[~member(pages, now)], present=now), {}

    def close(self, frozen: Frozen, state: dict[str, Any] | None) -> None:
        # Nothing was put into the target; soft-dirty bits cost it nothing.
        return None

    def check_armed(self, pid: int, state: dict[str, Any] | None) -> None:
        return None  # nothing was put into the target
