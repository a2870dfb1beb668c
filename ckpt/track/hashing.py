"""The hash tracker: works on any kernel. It reads every present page while frozen and keeps those
whose xxh3 digest differs from the parent's merged view; the digests live in the layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ckpt.memory import present_pages
from ckpt.proc.maps import Vma
from ckpt.track.base import DirtySet, ParentInfo, tracked_vmas

if TYPE_CHECKING:
    from ckpt.ptrace import Frozen


class HashTracker:
    name = "hash"

    def arm(self, frozen: Frozen, vmas: Sequence[Vma]) -> dict[str, Any]:
        return {}

    def dirty(
        self, frozen: Frozen, vmas: Sequence[Vma], parent: ParentInfo
    ) -> tuple[DirtySet, dict[str, Any]]:
        pages = present_pages(frozen.pid, tracked_vmas(vmas), parent.small)
        return DirtySet(pages=pages, fresh=parent.fresh(vmas), exact=False, present=pages), {}

    def close(self, frozen: Frozen, state: dict[str, Any] | None) -> None:
        return None

    def check_armed(self, pid: int, state: dict[str, Any] | None) -> None:
        return None  # nothing was put into the target
