"""Per-page scans of a dump's pages: which are all zero, and each page's xxh3_64.

Both run over every page a full dump copies, on the writer's threads, beside zstd: at 256 MiB of
the dump bench's mix they were ~1/4 of those threads' CPU (docs/benchmarks.md, "The big path").

- Zero pages: a page of data almost always has a non-zero word among its first, middle and last
  ones (random bytes, text, pointers, headers), so only the pages where all three are zero are
  scanned whole. The answer is the full scan's: a page is zero only if every word is.
- Digests: xxhash has no call for many buffers; one C call per page is the floor, and driving the
  calls from C (map over precomputed slices) rather than from a Python generator saves its frames.
"""

from __future__ import annotations

import threading
from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np
import xxhash

from ckpt.image import pagework

PAGE_SIZE = 4096
_WORDS = PAGE_SIZE // 8
_GATHER = 64  # candidate pages scanned per gather: 256 KiB, within a core's L2
_h = xxhash.xxh3_64_intdigest
_local = threading.local()
_slices: list[slice] = []
_ZERO_PAGE = bytes(PAGE_SIZE)


def zero_rows(pages: np.ndarray) -> np.ndarray:
    """True for each all-zero row of an (n, PAGE_SIZE) uint8 array whose rows are contiguous."""
    w = pages.view(np.uint64)
    if not len(w):
        return np.zeros(0, bool)
    cand = np.flatnonzero((w[:, 0] | w[:, _WORDS // 2] | w[:, -1]) == 0)
    if 2 * len(cand) > len(w):
        # Mostly zero (or zero-headed) pages: gathering the candidates would cost more than it saves.
        return ~np.bitwise_or.reduce(w, axis=1).astype(bool)
    z = np.zeros(len(w), bool)
    if len(cand):
        # Gathered a few at a time into this thread's small buffer (it stays in cache), never
        # into a fresh array: that faulted in ~1000 new pages per batch of 16 MiB.
        scratch: np.ndarray | None = getattr(_local, "scratch", None)
        if scratch is None:
            scratch = _local.scratch = np.empty((_GATHER, _WORDS), np.uint64)
        for lo in range(0, len(cand), _GATHER):
            c = cand[lo : lo + _GATHER]
            buf = scratch[: len(c)]
            np.take(w, c, axis=0, out=buf, mode="clip")
            z[c] = ~np.bitwise_or.reduce(buf, axis=1).astype(bool)
    return z


def _page_slices(n: int) -> list[slice]:
    global _slices
    if len(_slices) < n:
        # Rebuilt whole (never appended in place): another thread may be reading the old list.
        _slices = [slice(i * PAGE_SIZE, (i + 1) * PAGE_SIZE) for i in range(max(n, 2 * len(_slices), 256))]
    return _slices[:n]


def page_digests(buf: bytes | bytearray | memoryview) -> np.ndarray:
    """xxh3_64 of each whole page of `buf`, as uint64."""
    mv = memoryview(buf).cast("B")
    n = len(mv) // PAGE_SIZE
    so = pagework.lib()
    if so is not None and n:
        return pagework.digest_pages(so, np.frombuffer(mv, np.uint8, n * PAGE_SIZE).reshape(n, PAGE_SIZE))[0]
    return np.array(list(map(_h, map(mv.__getitem__, _page_slices(n)))), dtype=np.uint64)


def zero_flags(buf: bytes | bytearray | memoryview) -> list[bool]:
    """zero_rows for a small buffer of whole pages, without numpy: the same three-word test, then
    a whole-page compare for the candidates."""
    mv = memoryview(buf).cast("B")
    w = mv.cast("Q")
    out = []
    for i in range(len(mv) // PAGE_SIZE):
        o = i * _WORDS
        # (tobytes, then one memcmp: a memoryview's own == compares byte by byte, ~80 us a page)
        out.append(
            not (w[o] | w[o + _WORDS // 2] | w[o + _WORDS - 1])
            and mv[i * PAGE_SIZE : (i + 1) * PAGE_SIZE].tobytes() == _ZERO_PAGE
        )
    return out


def digest_array(buf: bytes | bytearray | memoryview) -> array[int]:
    """page_digests as an array('Q') (no numpy: a small dump's)."""
    mv = memoryview(buf).cast("B")
    return array("Q", map(_h, map(mv.__getitem__, _page_slices(len(mv) // PAGE_SIZE))))
