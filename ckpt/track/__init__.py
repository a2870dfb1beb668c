"""Dirty-page trackers behind one interface (base.Tracker)."""

from ckpt.track.base import DirtySet, ParentInfo, Tracker, fresh_ranges, tracked_vmas
from ckpt.track.select import NAMES, auto_name, available, get_tracker

__all__ = [
    "NAMES",
    "DirtySet",
    "ParentInfo",
    "Tracker",
    "auto_name",
    "available",
    "fresh_ranges",
    "get_tracker",
    "tracked_vmas",
]
