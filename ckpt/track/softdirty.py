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
from ckpt.memory import PM_SOFT_DIRTY, read_pagemap
from ckpt.proc.maps import PAGE_SIZE, Vma
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
        parts = []
        mask = np.uint64(PM_SOFT_DIRTY)
        for v in tracked_vmas(vmas):
            ents = read_pagemap(frozen.pid, v.start, v.end)
            idx = np.nonzero(ents & mask)[0].astype(np.uint64)
            parts.append(np.uint64(v.start) + idx * np.uint64(PAGE_SIZE))
        pages = np.concatenate(parts) if parts else np.empty(0, np.uint64)
        fresh = fresh_ranges(vmas, parent.vmas)
        # Re-arm in the same freeze: nothing can write between reading the bits and clearing them.
        clear_refs(frozen.pid)
        return DirtySet(pages=pages, fresh=fresh), {}

    def close(self, frozen: Frozen, state: dict[str, Any] | None) -> None:
        # Nothing was put into the target; soft-dirty bits cost it nothing.
        return None
