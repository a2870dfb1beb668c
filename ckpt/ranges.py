"""Page and address-range arithmetic shared by the dumper, the trackers, the image and diff.

Ranges are half-open [start, end) byte addresses; page sets are sorted uint64 arrays of page
addresses. Everything here is vectorised with numpy where the sets can be large (a GiB is 262144
pages): no per-page Python loops.

A small process's page sets are `array('Q')` instead (at most `pageset.small_max()` pages where
they are made: memory.present_in, shmem_pages, read_pages), so that its dump never imports numpy
(issue 9 part 3). The set functions below (`as_set`, `union`, `minus`, `inside`, `outside`, `cat`,
`any_in`) take either kind; an operation between the two kinds is done by numpy. Between two small
sets, a loop over the pages in Python costs ~0.1 us a page (a union of 660 pages ~0.11 ms, numpy's
~0.01): beyond PY_MAX pages, where numpy is imported already, numpy does the work on the arrays'
own bytes, and the answer is small again.
"""

from __future__ import annotations

import bisect
import itertools
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np

PAGE = 4096
Range = tuple[int, int]
# A page set of either kind: a sorted uint64 numpy array, or (small) a sorted array('Q').
Pages = Any


def is_small(a: Pages) -> bool:
    """Whether `a` is a small page set (an array('Q'), no numpy)."""
    return isinstance(a, array)


def empty() -> Pages:
    """The empty page set (small)."""
    return array("Q")


def as_numpy(a: Pages) -> np.ndarray:
    """A page set of either kind as numpy's (for code that works on numpy only)."""
    return np.frombuffer(a, dtype=np.uint64) if isinstance(a, array) else a


_big = as_numpy
PY_MAX = 64  # pages of small sets past which numpy, once imported, does their work (module doc)


def _fast(n: int) -> bool:
    """Numpy for small sets of ``n`` pages: loaded already (a small dump never imports it)."""
    return n > PY_MAX and "numpy" in sys.modules


def _small_of(a: np.ndarray) -> array[int]:
    out = array("Q")
    out.frombytes(a.tobytes())
    return out


def _ascending(a: array[int]) -> bool:
    if _fast(len(a)):
        v = _big(a)
        return bool(np.all(v[1:] > v[:-1]))
    return all(x < y for x, y in itertools.pairwise(a))


def minus(a: Pages, b: Pages) -> Pages:
    """The pages of set `a` that are not in set `b`."""
    if not len(b) or not len(a):
        return a
    if is_small(a) and is_small(b):
        if _fast(len(a)):
            v = _big(a)
            return _small_of(v[~member(v, _big(b))])
        s = set(b)
        return array("Q", [x for x in a if x not in s])
    a = _big(a)
    return a[~member(a, _big(b))]


def inside(a: Pages, rs: Sequence[Range]) -> Pages:
    """The pages of set `a` inside the sorted, disjoint ranges."""
    if is_small(a):
        out = array("Q")
        for s, e in rs:
            out.extend(a[bisect.bisect_left(a, s) : bisect.bisect_left(a, e)])
        return out
    return a[contains(a, rs)]


def outside(a: Pages, rs: Sequence[Range]) -> Pages:
    """The pages of set `a` outside the sorted, disjoint ranges."""
    if not rs:
        return a
    if is_small(a):
        out = array("Q")
        pos = 0
        for s, e in rs:
            lo = bisect.bisect_left(a, s, pos)
            out.extend(a[pos:lo])
            pos = max(lo, bisect.bisect_left(a, e, lo))
        out.extend(a[pos:])
        return out
    return a[~contains(a, rs)]


def any_in(a: Pages, start: int, end: int) -> bool:
    """Whether set `a` holds a page in [start, end)."""
    if is_small(a):
        return bisect.bisect_left(a, end) > bisect.bisect_left(a, start)
    lo, hi = np.searchsorted(a, np.array([start, end], dtype=np.uint64))
    return bool(hi > lo)


def cat(parts: Sequence[Pages]) -> Pages:
    """Disjoint page sets as one sorted set (small if every part is)."""
    if all(is_small(p) for p in parts):
        out = array("Q")
        for p in parts:
            out.extend(p)
        if _ascending(out):
            return out
        return _small_of(np.sort(_big(out))) if _fast(len(out)) else array("Q", sorted(out))
    return np.sort(np.concatenate([_big(p) for p in parts]))


def merge(rs: Sequence[Range]) -> list[Range]:
    """Sorted, with overlapping or touching ranges joined."""
    out: list[Range] = []
    for s, e in sorted(rs):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def subtract(xs: Sequence[Range], ys: Sequence[Range]) -> list[Range]:
    """The parts of `xs` outside `ys` (any order; the result is sorted and merged)."""
    out: list[Range] = []
    holes = merge(ys)
    j = 0  # (both sorted and disjoint: one pass over each, not every hole for every range)
    for s, e in merge(xs):
        while j < len(holes) and holes[j][1] <= s:
            j += 1
        cur = s
        k = j
        while k < len(holes) and holes[k][0] < e:
            h0, h1 = holes[k]
            if h0 > cur:
                out.append((cur, h0))
            cur = max(cur, h1)
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def intersect(xs: Sequence[Range], ys: Sequence[Range]) -> list[Range]:
    """The parts of `xs` inside `ys` (sorted and merged)."""
    return subtract(xs, subtract(xs, ys))


def npages(rs: Sequence[Range]) -> int:
    """Pages in the ranges (assumed disjoint)."""
    return sum((e - s) // PAGE for s, e in rs)


def pages_of(rs: Sequence[Range], small: bool = False) -> Pages:
    """Every page of the ranges (sorted, disjoint), in order: an array('Q') if `small` (no numpy),
    else numpy's."""
    if small:
        out = array("Q")
        for s, e in rs:
            out.extend(range(s, e, PAGE))
        return out
    if not rs:
        return np.empty(0, np.uint64)
    a = np.array(rs, dtype=np.uint64).reshape(-1, 2)
    return to_pages(a[:, 0], a[:, 1])


def span_at(starts: Sequence[int], spans: Sequence[Range], x: int) -> int:
    """The index of the span of the sorted, disjoint `spans` (`starts` their starts, a list for
    bisect) that holds address `x`, or -1."""
    i = bisect.bisect_right(starts, x) - 1
    return i if i >= 0 and x < spans[i][1] else -1


def spans_hit(spans: Sequence[Range], points: Iterable[int]) -> list[bool]:
    """For each [start, end) of ``spans`` (any order, overlaps allowed), whether one of ``points``
    lies in it: the points sorted once, then one bisection per span."""
    pts = sorted(points)
    out = []
    for s, e in spans:
        i = bisect.bisect_left(pts, s)
        out.append(i < len(pts) and pts[i] < e)
    return out


def overlapping(spans: Iterable[Range], rs: Sequence[Range]) -> list[bool]:
    """For each [start, end) of ``spans`` (any order), whether some [a, b) of ``rs`` (any order,
    overlaps allowed) has a < end and start < b: the ranges sorted by start once, then per span one
    bisection (the ranges that start before its end) and their running maximum of ends (a loop over
    every range for every span was ~300 steps an 8-thread freeze)."""
    if not rs:  # (the usual answer in a freeze: nothing unregistered, nothing refused)
        return [False for _ in spans]
    srt = sorted(rs)
    starts = [a for a, _ in srt]
    top = list(itertools.accumulate((b for _, b in srt), max))
    out = []
    for s, e in spans:
        i = bisect.bisect_left(starts, e) - 1  # the last range that starts before e
        out.append(i >= 0 and top[i] > s)
    return out


def in_spans(q: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Boolean mask: which addresses of q lie in one of the sorted, disjoint [starts, ends) spans."""
    if len(q) == 0 or len(starts) == 0:
        return np.zeros(len(q), bool)
    i = np.searchsorted(starts, q, side="right") - 1
    ok = i >= 0
    res = np.zeros(len(q), bool)
    res[ok] = q[ok] < ends[i[ok]]
    return res


def contains(q: np.ndarray, ranges: Sequence[Range]) -> np.ndarray:
    """Boolean mask: which addresses of q lie in one of the ranges (sorted, disjoint)."""
    if not ranges:
        return np.zeros(len(q), bool)
    a = np.array(ranges, dtype=np.uint64).reshape(-1, 2)
    return in_spans(q, a[:, 0], a[:, 1])


def member(q: np.ndarray, sorted_arr: np.ndarray) -> np.ndarray:
    """Which of q are in sorted_arr, by binary search (no sort of the big array)."""
    if len(sorted_arr) == 0 or len(q) == 0:
        return np.zeros(len(q), bool)
    i = np.searchsorted(sorted_arr, q)
    i[i >= len(sorted_arr)] = 0
    return np.asarray(sorted_arr[i] == q)


def union(a: Pages, b: Pages) -> Pages:
    """Sorted union of two page sets. Not np.union1d/np.unique: numpy 2's hash-based unique costs
    ~6 ms even on tiny inputs, which matters inside a freeze."""
    if len(b) == 0:
        return a
    if len(a) == 0:
        return b
    if is_small(a) and is_small(b):
        if _fast(len(a) + len(b)):
            return _small_of(_sorted_unique(np.concatenate([_big(a), _big(b)])))
        return array("Q", sorted(set(a).union(b)))
    return _sorted_unique(np.concatenate([_big(a), _big(b)]))


def as_set(a: Pages) -> Pages:
    """`a` as a page set (sorted, each page once): `a` itself when it already is, which one
    vectorised comparison tells (under 1 ms for a GiB of pages); otherwise sorted and deduplicated."""
    if is_small(a):
        if _ascending(a):
            return a
        return _small_of(_sorted_unique(_big(a))) if _fast(len(a)) else array("Q", sorted(set(a)))
    if len(a) < 2 or bool(np.all(a[1:] > a[:-1])):
        return a
    return _sorted_unique(a)


def unique(a: np.ndarray) -> np.ndarray:
    """np.unique(a) for the 1-D integer arrays ckpt handles, without numpy 2.4's np.unique, which
    imports numpy.ma on first use (~28 ms, a tenth of a small restore's wall time)."""
    return _sorted_unique(np.asarray(a).ravel())


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    c = np.sort(a)
    keep = np.ones(len(c), bool)
    keep[1:] = c[1:] != c[:-1]
    return c[keep]


class PageRuns:
    """A sorted set of pages held as disjoint [start, end) runs, for sets that may be huge (every
    page of a TiB mapping that was added): len() counts pages and iteration yields page addresses,
    as for a page array, without ever holding one entry per page."""

    def __init__(self, rs: Sequence[Range] = ()) -> None:
        self.ranges: list[Range] = merge([(int(s), int(e)) for s, e in rs if e > s])

    def __len__(self) -> int:
        return npages(self.ranges)

    def __iter__(self) -> Iterator[np.uint64]:
        for s, e in self.ranges:
            for a in range(s, e, PAGE):
                yield np.uint64(a)

    def __repr__(self) -> str:
        return f"PageRuns({self.ranges!r})"

    def within(self, rs: Sequence[Range]) -> PageRuns:
        return PageRuns(intersect(self.ranges, rs))

    def __or__(self, other: PageRuns) -> PageRuns:
        return PageRuns(self.ranges + other.ranges)


def runs(pages: np.ndarray | PageRuns) -> np.ndarray:
    """Sorted page addresses as maximal [start, end) runs: an (n, 2) uint64 array."""
    if isinstance(pages, PageRuns):
        return np.array(pages.ranges, dtype=np.uint64).reshape(-1, 2)
    p = np.asarray(pages, dtype=np.uint64)
    if not len(p):
        return np.zeros((0, 2), dtype=np.uint64)
    brk = np.flatnonzero(np.diff(p) != PAGE)
    starts = np.concatenate([p[:1], p[brk + 1]])
    ends = np.concatenate([p[brk], p[-1:]]) + np.uint64(PAGE)
    return np.stack([starts, ends], axis=1)


def run_list(a: Pages) -> list[Range]:
    """Sorted page addresses of either kind as maximal [start, end) runs, in a list."""
    if not is_small(a):
        r = runs(a)
        return list(zip(r[:, 0].tolist(), r[:, 1].tolist(), strict=True))
    out: list[Range] = []
    if not a:
        return out
    start = prev = a[0]
    for x in a[1:]:
        if x != prev + PAGE:
            out.append((start, prev + PAGE))
            start = x
        prev = x
    out.append((start, prev + PAGE))
    return out


def to_pages(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Every page of the [start, end) spans, in order."""
    counts = ((ends - starts) // np.uint64(PAGE)).astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.uint64)
    first = np.repeat(starts.astype(np.uint64), counts)
    idx = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return first + idx.astype(np.uint64) * np.uint64(PAGE)
