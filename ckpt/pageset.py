"""Sets of page addresses, small or big, behind one interface (issue 9 part 3).

A page set is the sorted, duplicate-free u64 addresses of pages. A 1 MiB process has a few hundred
of them; a 1 GiB one 262144. numpy does the big sets ~10x faster than Python (PERF-NOTES), but
importing it costs ~70-90 ms, a third of a small dump's whole wall time. So a set of at most
`small_max()` pages lives in an `array('Q')` and is worked on with bisect, set and the array's C
loops; a bigger one is a numpy array, numpy being imported only then. Both kinds answer every
operation the same way (tests/test_pageset.py compares them on generated inputs), and an operation
on two sets of different kinds is done by the big kind.

`CKPT_PAGESET_SMALL_MAX` (pages) moves the threshold: 0 makes every non-empty set a numpy one, a
huge value none; the tests run both ways.
"""

from __future__ import annotations

import bisect
import os
import sys
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

Range = tuple[int, int]
PAGE = 4096
# Up to 16 MiB of pages: every operation of the interface on 4096 pages in an array('Q') costs
# ~1-4 ms together, against numpy's import of ~70-90 ms; at 16384 pages a dump's handful of them
# would come near that (bench/bench_pageset.py).
DEFAULT_SMALL_MAX = 4096
_LITTLE = sys.byteorder == "little"


def small_max() -> int:
    """The most pages a set keeps in an `array('Q')` (read each time, so a test can move it)."""
    v = os.environ.get("CKPT_PAGESET_SMALL_MAX")
    return int(v) if v else DEFAULT_SMALL_MAX


def _u64(b: bytes | bytearray | memoryview) -> array[int]:
    a = array("Q")
    a.frombytes(b)
    if not _LITTLE:
        a.byteswap()
    return a


class PageSet(ABC):
    """Sorted, duplicate-free page addresses. Immutable: every operation returns a new set."""

    __slots__ = ()

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[int]: ...

    @abstractmethod
    def __getitem__(self, i: int) -> int: ...

    @abstractmethod
    def to_bytes(self) -> bytes:
        """The addresses as packed little-endian u64 (the image's encoding)."""

    @abstractmethod
    def numpy(self) -> np.ndarray:
        """The addresses as a uint64 array, for code that works on numpy arrays (imports numpy)."""

    @abstractmethod
    def runs(self) -> list[Range]:
        """Maximal [start, end) runs of adjacent pages, in order."""

    @abstractmethod
    def isin(self, other: PageSet) -> list[bool]:
        """For each page of this set, whether `other` holds it."""

    @abstractmethod
    def union(self, other: PageSet) -> PageSet: ...

    @abstractmethod
    def difference(self, other: PageSet) -> PageSet: ...

    @abstractmethod
    def intersection(self, other: PageSet) -> PageSet: ...

    @abstractmethod
    def within(self, spans: Sequence[Range]) -> PageSet:
        """The pages that lie in one of the sorted, disjoint [start, end) spans."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageSet):
            return NotImplemented
        return len(self) == len(other) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(f"0x{a:x}" for a in list(self)[:4])
        return f"{type(self).__name__}({len(self)} pages: {head}{', ...' if len(self) > 4 else ''})"

    def __bool__(self) -> bool:
        return len(self) > 0


class SmallPages(PageSet):
    """A page set in an `array('Q')`: no numpy."""

    __slots__ = ("_a",)

    def __init__(self, a: array[int]) -> None:
        self._a = a  # sorted and unique: the factories below make sure

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[int]:
        return iter(self._a)

    def __getitem__(self, i: int) -> int:
        return self._a[i]

    def to_bytes(self) -> bytes:
        if _LITTLE:
            return self._a.tobytes()
        b = array("Q", self._a)
        b.byteswap()
        return b.tobytes()

    def numpy(self) -> np.ndarray:
        import numpy as np

        return np.array(self._a, dtype=np.uint64)

    def runs(self) -> list[Range]:
        out: list[Range] = []
        a = self._a
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

    def isin(self, other: PageSet) -> list[bool]:
        if isinstance(other, BigPages):
            return BigPages(self.numpy()).isin(other)
        s = set(other)
        return [x in s for x in self._a]

    def union(self, other: PageSet) -> PageSet:
        if isinstance(other, BigPages):
            return other.union(self)
        return _small_or_big(sorted(set(self._a).union(other)))

    def difference(self, other: PageSet) -> PageSet:
        if isinstance(other, BigPages):
            return BigPages(self.numpy()).difference(other)
        s = set(other)
        return SmallPages(array("Q", [x for x in self._a if x not in s]))

    def intersection(self, other: PageSet) -> PageSet:
        if isinstance(other, BigPages):
            return other.intersection(self)
        s = set(other)
        return SmallPages(array("Q", [x for x in self._a if x in s]))

    def within(self, spans: Sequence[Range]) -> PageSet:
        a = self._a
        out = array("Q")
        for s, e in spans:
            out.extend(a[bisect.bisect_left(a, s) : bisect.bisect_left(a, e)])
        return SmallPages(out)


class BigPages(PageSet):
    """A page set in a numpy uint64 array."""

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray) -> None:
        self._a = a  # sorted and unique, uint64

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[int]:
        return iter(self._a.tolist())

    def __getitem__(self, i: int) -> int:
        return int(self._a[i])

    def to_bytes(self) -> bytes:
        return self._a.astype("<u8", copy=False).tobytes()

    def numpy(self) -> np.ndarray:
        return self._a

    def runs(self) -> list[Range]:
        import numpy as np

        p = self._a
        if not len(p):
            return []
        brk = np.flatnonzero(np.diff(p) != PAGE)
        starts = np.concatenate([p[:1], p[brk + 1]])
        ends = np.concatenate([p[brk], p[-1:]]) + np.uint64(PAGE)
        return list(zip(starts.tolist(), ends.tolist(), strict=True))

    def _mask(self, other: PageSet) -> np.ndarray:
        import numpy as np

        b = other.numpy()
        q = self._a
        if not len(b) or not len(q):
            return np.zeros(len(q), bool)
        i = np.searchsorted(b, q)
        i[i >= len(b)] = 0
        return np.asarray(b[i] == q)

    def isin(self, other: PageSet) -> list[bool]:
        return self._mask(other).tolist()

    def union(self, other: PageSet) -> PageSet:
        import numpy as np

        b = other.numpy()
        if not len(b):
            return self
        c = np.sort(np.concatenate([self._a, b]))
        keep = np.ones(len(c), bool)
        keep[1:] = c[1:] != c[:-1]
        return _wrap(c[keep])

    def difference(self, other: PageSet) -> PageSet:
        return _wrap(self._a[~self._mask(other)])

    def intersection(self, other: PageSet) -> PageSet:
        return _wrap(self._a[self._mask(other)])

    def within(self, spans: Sequence[Range]) -> PageSet:
        import numpy as np

        q = self._a
        if not spans or not len(q):
            return _wrap(q[:0])
        sp = np.array(spans, dtype=np.uint64).reshape(-1, 2)
        i = np.searchsorted(sp[:, 0], q, side="right") - 1
        ok = i >= 0
        keep = np.zeros(len(q), bool)
        keep[ok] = q[ok] < sp[i[ok], 1]
        return _wrap(q[keep])


def _wrap(a: np.ndarray) -> PageSet:
    """A sorted unique uint64 array as the kind of set its size asks for."""
    if len(a) > small_max():
        return BigPages(a)
    return SmallPages(_u64(a.astype("<u8", copy=False).tobytes()))


def _small_or_big(xs: list[int]) -> PageSet:
    if len(xs) > small_max():
        import numpy as np

        return BigPages(np.array(xs, dtype=np.uint64))
    return SmallPages(array("Q", xs))


def empty() -> PageSet:
    return SmallPages(array("Q"))


def of(addrs: Iterable[int] | Any) -> PageSet:
    """A page set of any addresses (any order, repeats allowed): a numpy array stays numpy's
    business when it is big, anything else is sorted in Python."""
    if type(addrs).__module__ == "numpy":
        import numpy as np

        a = np.asarray(addrs, dtype=np.uint64).ravel()
        if len(a) > 1 and not bool(np.all(a[1:] > a[:-1])):
            a = np.sort(a)
            keep = np.ones(len(a), bool)
            keep[1:] = a[1:] != a[:-1]
            a = a[keep]
        return _wrap(a)
    return _small_or_big(sorted(set(addrs)))


def from_sorted(addrs: Sequence[int]) -> PageSet:
    """A page set of addresses the caller knows to be sorted and unique (not checked)."""
    if len(addrs) > small_max():
        import numpy as np

        return BigPages(np.asarray(addrs, dtype=np.uint64))
    return SmallPages(array("Q", addrs))


def from_bytes(b: bytes | bytearray | memoryview) -> PageSet:
    """Packed little-endian u64 addresses, as the image stores them. The order is not checked:
    see `first_unordered` (image data is untrusted; validate.check_pages says what is wrong)."""
    if len(b) % 8:
        raise ValueError(f"{len(b)} bytes is not a whole number of u64 values")
    if len(b) // 8 > small_max():
        import numpy as np

        return BigPages(np.frombuffer(b, dtype="<u8").astype(np.uint64, copy=False))
    return SmallPages(_u64(b))


def from_runs(runs: Iterable[Range]) -> PageSet:
    """Every page of sorted, disjoint [start, end) runs."""
    rs = [(int(s), int(e)) for s, e in runs if e > s]
    n = sum((e - s) // PAGE for s, e in rs)
    if n > small_max():
        import numpy as np

        # Without a Python step per run: a fragmented GiB has ~100000 of them.
        a = np.array(rs, dtype=np.uint64).reshape(-1, 2)
        counts = ((a[:, 1] - a[:, 0]) // np.uint64(PAGE)).astype(np.int64)
        first = np.repeat(a[:, 0], counts)
        idx = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        return BigPages(first + idx.astype(np.uint64) * np.uint64(PAGE))
    out = array("Q")
    for s, e in rs:
        out.extend(range(s, e, PAGE))
    return SmallPages(out)


def first_unordered(p: PageSet) -> int:
    """The index of the first address not above the one before it, or -1 if the addresses ascend
    strictly (for sets from untrusted bytes, which `from_bytes` does not check)."""
    if isinstance(p, BigPages):
        import numpy as np

        n = p.numpy()
        if len(n) < 2:
            return -1
        up = n[1:] > n[:-1]
        return -1 if bool(np.all(up)) else int(np.argmin(up)) + 1
    a = p._a if isinstance(p, SmallPages) else array("Q", p)
    for i in range(1, len(a)):
        if a[i] <= a[i - 1]:
            return i
    return -1


def first_unaligned(p: PageSet, page_size: int = PAGE) -> int:
    """The index of the first address that is not a multiple of `page_size`, or -1."""
    mask = page_size - 1
    if isinstance(p, BigPages):
        import numpy as np

        bad = (p.numpy() & np.uint64(mask)) != 0
        return int(np.argmax(bad)) if bool(bad.any()) else -1
    for i, x in enumerate(p):
        if x & mask:
            return i
    return -1
