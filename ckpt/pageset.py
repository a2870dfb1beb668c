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

import os
import sys
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ckpt import ranges

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
    """Sorted, duplicate-free page addresses. Immutable: every operation returns a new set.

    The operations are ckpt.ranges' set functions, which take either kind of array: each kind
    only says how its array is read and written."""

    __slots__ = ()
    _a: Any  # an array('Q') (SmallPages) or a uint64 numpy array (BigPages)

    def __len__(self) -> int:
        return len(self._a)

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

    def runs(self) -> list[Range]:
        """Maximal [start, end) runs of adjacent pages, in order."""
        return ranges.run_list(self._a)

    def _mask(self, other: PageSet) -> np.ndarray:
        return ranges.member(ranges.as_numpy(self._a), ranges.as_numpy(other._a))

    def isin(self, other: PageSet) -> list[bool]:
        """For each page of this set, whether `other` holds it."""
        if ranges.is_small(self._a) and ranges.is_small(other._a):
            s = set(other._a)
            return [x in s for x in self._a]
        return self._mask(other).tolist()

    def union(self, other: PageSet) -> PageSet:
        u = ranges.union(self._a, other._a)
        if u is self._a:
            return self
        if u is other._a:
            return other
        return _wrap(u) if not ranges.is_small(u) else _small_or_big(u)

    def difference(self, other: PageSet) -> PageSet:
        return _result(ranges.minus(self._a, other._a))

    def intersection(self, other: PageSet) -> PageSet:
        if ranges.is_small(self._a) and ranges.is_small(other._a):
            s = set(other._a)
            return SmallPages(array("Q", [x for x in self._a if x in s]))
        return _wrap(ranges.as_numpy(self._a)[self._mask(other)])

    def within(self, spans: Sequence[Range]) -> PageSet:
        """The pages that lie in one of the sorted, disjoint [start, end) spans."""
        return _result(ranges.inside(self._a, spans))

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


class BigPages(PageSet):
    """A page set in a numpy uint64 array."""

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray) -> None:
        self._a = a  # sorted and unique, uint64

    def __iter__(self) -> Iterator[int]:
        return iter(self._a.tolist())

    def __getitem__(self, i: int) -> int:
        return int(self._a[i])

    def to_bytes(self) -> bytes:
        return self._a.astype("<u8", copy=False).tobytes()

    def numpy(self) -> np.ndarray:
        return self._a


def _result(a: Any) -> PageSet:
    """An operation's result as a set: an array('Q') stays one (no bigger than its operand), a
    numpy array takes the kind its size asks for."""
    return SmallPages(a) if ranges.is_small(a) else _wrap(a)


def _wrap(a: np.ndarray) -> PageSet:
    """A sorted unique uint64 array as the kind of set its size asks for."""
    if len(a) > small_max():
        return BigPages(a)
    return SmallPages(_u64(a.astype("<u8", copy=False).tobytes()))


def _small_or_big(xs: Sequence[int]) -> PageSet:
    if len(xs) > small_max():
        import numpy as np

        return BigPages(np.array(xs, dtype=np.uint64))
    return SmallPages(xs if isinstance(xs, array) else array("Q", xs))


def empty() -> PageSet:
    return SmallPages(array("Q"))


def of(addrs: Iterable[int] | Any) -> PageSet:
    """A page set of any addresses (any order, repeats allowed): a numpy array stays numpy's
    business when it is big, anything else is sorted in Python."""
    if type(addrs).__module__ == "numpy":
        import numpy as np

        return _wrap(ranges.as_set(np.asarray(addrs, dtype=np.uint64).ravel()))
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
    # Without a Python step per run for a big set: a fragmented GiB has ~100000 of them.
    a = ranges.pages_of(rs, small=ranges.npages(rs) <= small_max())
    return SmallPages(a) if ranges.is_small(a) else BigPages(a)


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
