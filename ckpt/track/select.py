"""Choosing a tracker: `auto` takes soft-dirty where the kernel has it, else uffd-wp, else hash."""

from __future__ import annotations

import functools

from ckpt.errors import TrackerError
from ckpt.track.base import Tracker
from ckpt.track.hashing import HashTracker
from ckpt.track.softdirty import SoftDirtyTracker
from ckpt.track.uffdwp import UffdWpTracker

NAMES = ("soft-dirty", "uffd-wp", "hash")


@functools.cache
def available() -> dict[str, tuple[bool, str]]:
    """Each tracker: whether this kernel supports it, and why not. Probed for real, once."""
    from ckpt.check import _probe_pagemap_scan, _probe_soft_dirty, _probe_uffd_wp_async

    sd = _probe_soft_dirty()
    uf = _probe_uffd_wp_async()
    ps = _probe_pagemap_scan()
    return {
        "soft-dirty": (sd.ok, sd.detail),
        "uffd-wp": (uf.ok and ps.ok, uf.detail if not uf.ok else ps.detail),
        "hash": (True, "always available"),
    }


def auto_name() -> str:
    av = available()
    return next(n for n in NAMES if av[n][0])


def get_tracker(name: str) -> Tracker:
    if name == "auto":
        name = auto_name()
    if name not in NAMES:
        raise TrackerError(f"unknown tracker {name!r}; choose one of auto, {', '.join(NAMES)}")
    ok, why = available()[name]
    if not ok:
        raise TrackerError(f"the {name} tracker is not available on this kernel: {why}")
    trackers: dict[str, type] = {
        "soft-dirty": SoftDirtyTracker,
        "uffd-wp": UffdWpTracker,
        "hash": HashTracker,
    }
    t: Tracker = trackers[name]()
    return t
