"""PreCopied.merged() gathering into the buffer faulted in with the live copy (out of the freeze):
the same pages and bytes as into a fresh buffer, that buffer reused by each merge, and a fresh one
when a merge does not fit."""

from __future__ import annotations

import numpy as np

from ckpt.memory import PageBuffer
from ckpt.precopy import PreCopied

PAGE = 4096


def _filled(pages: list[int]) -> tuple[PageBuffer, np.ndarray]:
    b = PageBuffer(len(pages))
    for i, p in enumerate(pages):
        b.view[i * PAGE : (i + 1) * PAGE] = bytes([p % 251 + 1]) * PAGE
    return b, np.array([p * PAGE for p in pages], dtype=np.uint64)


def _pages(parts: list[tuple[PageBuffer, int, np.ndarray]]) -> list[int]:
    """The parts' pages, each checked to hold its own bytes."""
    got = []
    for b, first, a in parts:
        for i, addr in enumerate(int(x) for x in a):
            p = addr // PAGE
            assert bytes(b.view[(first + i) * PAGE : (first + i + 1) * PAGE]) == bytes([p % 251 + 1]) * PAGE
            got.append(p)
    return got


def test_merges_go_into_the_prefaulted_buffer_until_one_does_not_fit() -> None:
    lb, la = _filled([1, 2, 3, 8, 20, 22, 40, 41])
    out = PageBuffer(6)
    pre = PreCopied(la, lb, np.arange(len(la), dtype=np.int64), np.empty(0, np.uint64), la, 0, out=out)
    fb1, fa1 = _filled([0, 5])
    first = pre.merged([(fb1, 0, fa1)], 6 * PAGE)  # pages 1, 2, 3 live, 0 and 5 frozen
    assert [b is out for b, _, _ in first] == [True]
    assert _pages(first) == [0, 1, 2, 3, 5]  # checked before the next merge, as a dump processes it
    fb2, fa2 = _filled([9, 10, 25])
    second = pre.merged([(fb2, 0, fa2)], 30 * PAGE)
    assert [b is out for b, _, _ in second] == [True]  # the same buffer again
    assert _pages(second) == [8, 9, 10, 20, 22, 25]
    fb3, fa3 = _filled([30, 31, 32, 33, 34, 35])
    third = pre.merged([(fb3, 0, fa3)], None)  # 8 pages: more than the buffer holds
    assert [b is out for b, _, _ in third] == [False]
    assert _pages(third) == [30, 31, 32, 33, 34, 35, 40, 41]
    for b in (fb1, fb2, fb3):
        b.close()
    pre.close()
    assert pre.out is None and pre.buffers == []
