"""The freeze's copy behind the live copy, in one buffer (ckpt/precopy.py `Rows`, `Gathered`): the
merge hands out an order of rows with each page's own bytes and digest, no copy; a frozen part that
lies elsewhere falls back to the merge copy. (The whole dump: tests/test_precopy.py.)"""

from __future__ import annotations

import numpy as np

from ckpt.image.pagescan import page_digests, zero_rows
from ckpt.memory import PageBuffer
from ckpt.precopy import Gathered, PreCopied, Rows

PAGE = 4096


def _byte(page: int) -> int:
    return 0 if page == 8 else page % 250 + 1  # page 8 is all zeros


def _fill(buf: PageBuffer, row: int, addr: int) -> None:
    buf.view[row * PAGE : (row + 1) * PAGE] = bytes([_byte(addr // PAGE)]) * PAGE


def _live(addrs: list[int], room: int) -> PreCopied:
    buf = PageBuffer(len(addrs) + room)
    for i, a in enumerate(addrs):
        _fill(buf, i, a)
    n = len(addrs)
    live = np.frombuffer(buf.view, np.uint8, count=n * PAGE).reshape(n, PAGE)
    a = np.array(addrs, np.uint64)
    pre = PreCopied(a, buf, np.arange(n, dtype=np.int64), np.empty(0, np.uint64), a, 0)
    pre.digests, pre.zero = page_digests(live.tobytes()), zero_rows(live)
    pre.tail = Rows(buf, n)
    return pre


def test_frozen_pages_behind_the_live_ones_are_handed_out_as_rows() -> None:
    pre = _live([p * PAGE for p in (1, 2, 3, 7, 8, 20)], room=4)
    assert pre.tail is not None
    pre.keep(np.array([7 * PAGE], np.uint64), [(0, 30 * PAGE)], [], None)  # page 7 read again frozen
    frozen = [p * PAGE for p in (0, 7, 25)]
    for i, a in enumerate(frozen):
        _fill(pre.tail, i, a)
    first = pre.merged([(pre.tail, 0, np.array(frozen[:2], np.uint64))], 8 * PAGE)
    rest = pre.merged([(pre.tail, 2, np.array(frozen[2:], np.uint64))], None)
    got: list[int] = []
    for g in first + rest:
        assert isinstance(g, Gathered)
        assert g.pages.base is not None  # rows of the one buffer, not a copy
        for addr, row, dg, z in zip(g.addrs, g.rows, g.digests, g.zero, strict=True):
            want = g.pages[row].tobytes()
            assert want == bytes([_byte(int(addr) // PAGE)]) * PAGE
            assert int(dg) == int(page_digests(want)[0])
            assert bool(z) == (int(addr) // PAGE == 8)
            got.append(int(addr) // PAGE)
    assert got == [0, 1, 2, 3, 7, 8, 20, 25]  # each page once, ascending; 7 from the freeze
    pre.close()


def test_a_frozen_part_outside_the_tail_is_merged_by_a_copy() -> None:
    pre = _live([p * PAGE for p in (1, 2)], room=1)
    other = PageBuffer(1)
    _fill(other, 0, 5 * PAGE)
    out = pre.merged([(other, 0, np.array([5 * PAGE], np.uint64))], None)
    assert not any(isinstance(p, Gathered) for p in out)
    pages = [(int(a) // PAGE, bytes(b.view[(f + i) * PAGE : (f + i + 1) * PAGE])) for b, f, aa in out  # type: ignore[misc]
             for i, a in enumerate(aa)]  # fmt: skip
    assert pages == [(p, bytes([_byte(p)]) * PAGE) for p in (1, 2, 5)]
    other.close()
    pre.close()
