"""The writable working set (Clark et al., NSDI 2005): how many distinct pages a process writes in a
window of a given length. Computed from the per-interval dirty sets of `ckpt dirtyrate`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WssPoint:
    window_ms: float
    pages: float  # mean over every complete window of that length
    max_pages: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "window_ms": round(self.window_ms, 1),
            "pages": round(self.pages, 1),
            "max_pages": self.max_pages,
        }


def window_lengths(n: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... intervals up to n: growing windows, a handful per octave."""
    out: list[int] = []
    k = 1
    while k <= n:
        out.append(k)
        if k * 3 // 2 <= n and k >= 2 and k * 3 % 2 == 0:
            out.append(k * 3 // 2)
        k *= 2
    return sorted(set(out))


def curve(sets: Sequence[np.ndarray], interval_ms: float) -> list[WssPoint]:
    """WSS for windows of k intervals. Exact: for each window end j, a page's age is the number of
    intervals since its last write; the distinct pages of the last k intervals are those younger
    than k. One pass over the intervals, O(intervals x pages written at least once)."""
    n = len(sets)
    if n == 0:
        return []
    universe = np.unique(np.concatenate([np.asarray(s, np.uint64) for s in sets]))
    last = np.full(len(universe), -1, np.int64)
    sums = np.zeros(n + 1, np.float64)
    maxes = np.zeros(n + 1, np.int64)
    for j, s in enumerate(sets):
        if len(s):
            last[np.searchsorted(universe, np.asarray(s, np.uint64))] = j
        seen = last[last >= 0]
        younger = np.cumsum(np.bincount(j - seen, minlength=n + 1))  # younger[k-1]: written in last k
        ks = np.arange(1, j + 2)  # complete windows ending at j
        vals = younger[ks - 1]
        sums[ks] += vals
        maxes[ks] = np.maximum(maxes[ks], vals)
    out = []
    for k in window_lengths(n):
        windows = n - k + 1
        out.append(WssPoint(k * interval_ms, float(sums[k] / windows), int(maxes[k])))
    return out
