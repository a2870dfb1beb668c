"""uffd-wp's hole scan (ckpt/track/uffdwp.py, _holes): one walk over the followed span or one scan
per followed range, as a list of ranges (a small parent: no numpy) or an (n, 2) array, the same
pages: exactly those of the followed ranges that /proc/PID/pagemap shows neither present nor in
swap, on a real process armed for uffd-wp (memtarget: a quarter of its region never touched)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ckpt.memory import (
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PM_PRESENT,
    PM_SWAPPED,
    PagemapScanner,
    read_pagemap,
    swap_active,
)
from ckpt.proc import read_maps
from ckpt.ptrace import Frozen
from ckpt.track.base import tracked_vmas
from ckpt.track.uffdwp import UffdWpTracker, _holes
from tests.util import Target

Spawn = Callable[..., Target]
PAGE = 4096


def _pages(rows: Any) -> set[int]:
    return {p for a, b in (tuple(int(x) for x in r[:2]) for r in rows) for p in range(a, b, PAGE)}


def test_every_way_finds_the_same_holes(spawn: Spawn) -> None:
    t = spawn("memtarget", "256")
    region = int(t.cmd("info").split()[1], 16)
    tr = UffdWpTracker()
    with Frozen(t.pid) as f:
        state = tr.arm(f, read_maps(t.pid))
    try:
        with Frozen(t.pid) as f:
            tv = tracked_vmas(read_maps(t.pid))
            live = PAGE_IS_PRESENT | (PAGE_IS_SWAPPED if swap_active() else 0)
            with PagemapScanner(t.pid) as sc:
                ours, _, busy, _ = tr._ours(sc, tv, state)
                assert not busy and len(ours) > 1  # (so busy=False takes the one walk)
                got = {
                    (one, small): _holes(sc, ours, not one, live, small)
                    for one in (True, False)
                    for small in (True, False)
                }
            truth: set[int] = set()
            for a, b in ours:
                ents = read_pagemap(t.pid, a, b)
                gone = (ents & np.uint64(PM_PRESENT | PM_SWAPPED)) == 0
                truth |= {a + i * PAGE for i in np.flatnonzero(gone).tolist()}
            assert isinstance(got[(True, True)], list) and isinstance(got[(True, False)], np.ndarray)
            for way, rows in got.items():
                assert _pages(rows) == truth, way
            # The never-touched quarter of the region is among them, page for page.
            assert {region + i * PAGE for i in range(192, 256)} <= truth
            assert not {region + i * PAGE for i in range(192)} & truth
            tr.close(f, state)
    finally:
        t.close()
