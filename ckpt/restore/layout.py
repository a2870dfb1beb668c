"""Where the restore's own pages go while the helper's address space is replaced.

Two areas must survive the switch from the helper's layout to the dumped one: the gadget page
(the `syscall` instruction and the scratch memory for syscall arguments) and the helper's vdso group
([vvar], [vvar_vclock], [vdso]), parked until the dumped addresses are free for it. Both go into a
hole of both layouts, so nothing of the dumped process is ever placed on top of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt.errors import RestoreError
from ckpt.image.format import PAGE_SIZE, VmaRecord
from ckpt.proc.maps import Vma
from ckpt.restore.plan import TASK_SIZE, VDSO_NAMES

GADGET_PAGES = 4  # page 0: `syscall`; pages 1..3: arguments (paths up to PATH_MAX, auxv, structs)
LOW_LIMIT = 1 << 32  # stay clear of the low addresses non-PIE programs and mmap_min_addr care about
GUARD = 1 << 30  # keep this far from any mapping: a stack's guard gap, a heap about to grow


@dataclass(frozen=True)
class Areas:
    gadget: int  # GADGET_PAGES pages
    park: int  # where the helper's vdso group waits; its span is `park_size`
    park_size: int

    @property
    def scratch(self) -> int:
        return self.gadget + PAGE_SIZE

    @property
    def scratch_size(self) -> int:
        return (GADGET_PAGES - 1) * PAGE_SIZE

    def keep(self) -> list[tuple[int, int]]:
        """The ranges the helper keeps when everything else is unmapped."""
        out = [(self.gadget, self.gadget + GADGET_PAGES * PAGE_SIZE)]
        if self.park_size:
            out.append((self.park, self.park + self.park_size))
        return sorted(out)


def vdso_group(maps: list[Vma]) -> list[Vma]:
    return [v for v in maps if v.path in VDSO_NAMES]


def check_vdso_layout(helper: list[Vma], dumped: list[VmaRecord]) -> None:
    """The helper's vdso group must look like the dumped one: the same parts, sizes and spacing."""

    def shape(parts: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        base = parts[0][1] if parts else 0
        return [(n, s - base, e - s) for n, s, e in parts]

    mine = shape([(v.path, v.start, v.end) for v in helper])
    theirs = shape([(v.path, v.start, v.end) for v in dumped])
    if dumped and mine != theirs:
        raise RestoreError(
            f"the vdso here ({_fmt(mine)}) differs from the dumped one ({_fmt(theirs)}): "
            "restore needs the kernel the process was dumped on"
        )


def _fmt(shape: list[tuple[str, int, int]]) -> str:
    return ", ".join(f"{n} +{off:#x} {size // PAGE_SIZE}p" for n, off, size in shape) or "none"


def choose_areas(helper: list[Vma], dumped: list[VmaRecord]) -> Areas:
    """A hole free in both layouts, far from every mapping, for the gadget and the parked vdso."""
    group = vdso_group(helper)
    park_size = group[-1].end - group[0].start if group else 0
    need = GADGET_PAGES * PAGE_SIZE + PAGE_SIZE + park_size
    used = sorted(
        [(v.start, v.end) for v in helper if v.start < TASK_SIZE]
        + [(v.start, v.end) for v in dumped if v.start < TASK_SIZE]
    )
    best: tuple[int, int] | None = None
    cur = LOW_LIMIT
    for s, e in [*used, (TASK_SIZE, TASK_SIZE)]:
        if s > cur and (best is None or s - cur > best[1] - best[0]):
            best = (cur, s)
        cur = max(cur, e)
    if best is None or best[1] - best[0] < need + 2 * GUARD:
        raise RestoreError("no room in the address space for the restore's own pages")
    # The middle of the largest hole: as far as can be from anything that grows.
    mid = (best[0] + best[1]) // 2
    gadget = mid - mid % PAGE_SIZE
    park = gadget + GADGET_PAGES * PAGE_SIZE + PAGE_SIZE
    return Areas(gadget, park, park_size)


def unmap_ranges(keep: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges covering all user space but `keep` (sorted, disjoint)."""
    out = []
    cur = 0
    for s, e in keep:
        if s > cur:
            out.append((cur, s))
        cur = e
    if cur < TASK_SIZE:
        out.append((cur, TASK_SIZE))
    return out
