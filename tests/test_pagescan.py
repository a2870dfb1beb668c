"""ckpt/image/pagescan.py: the zero-page test and the page digests give the full scan's answers."""

from __future__ import annotations

import numpy as np
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.image.pagescan import PAGE_SIZE, page_digests, zero_rows


def _full_scan(pages: np.ndarray) -> np.ndarray:
    return np.array([not bytes(p).strip(b"\0") for p in pages], dtype=bool)


# Byte offsets that make a page non-zero where the cheap words (first, middle, last) do not look.
_HIDDEN = [8, 100, PAGE_SIZE // 2 - 1, PAGE_SIZE // 2 + 8, PAGE_SIZE - 9]
_KINDS = ["zero", "random", "first", "middle", "last", *[f"hidden{o}" for o in _HIDDEN]]


def _page(kind: str, rng: np.random.Generator) -> np.ndarray:
    p = np.zeros(PAGE_SIZE, np.uint8)
    if kind == "random":
        p[:] = rng.integers(1, 256, PAGE_SIZE, dtype=np.uint8)
    elif kind == "first":
        p[3] = 1
    elif kind == "middle":
        p[PAGE_SIZE // 2 + 2] = 7
    elif kind == "last":
        p[-1] = 0x80
    elif kind.startswith("hidden"):
        p[int(kind[6:])] = 1
    return p


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_KINDS), max_size=64), st.integers(0, 2**32 - 1))
def test_zero_rows_is_the_full_scan(kinds: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    pages = np.stack([_page(k, rng) for k in kinds]) if kinds else np.empty((0, PAGE_SIZE), np.uint8)
    got = zero_rows(pages)
    assert got.dtype == bool and got.shape == (len(kinds),)
    assert (got == _full_scan(pages)).all()
    assert [bool(x) for x in got] == [k == "zero" for k in kinds]


def test_zero_rows_mostly_zero_and_none_zero() -> None:
    rng = np.random.default_rng(1)
    # Most pages candidates (the whole-array scan), a few of them not zero after all.
    pages = np.zeros((300, PAGE_SIZE), np.uint8)
    pages[::7, 1000] = 5
    assert (zero_rows(pages) == _full_scan(pages)).all()
    assert int(zero_rows(pages).sum()) == 300 - len(range(0, 300, 7))
    # No candidate at all.
    pages = rng.integers(1, 256, (50, PAGE_SIZE), dtype=np.uint8)
    assert not zero_rows(pages).any()


def test_zero_rows_of_a_view_into_a_larger_buffer() -> None:
    """The dump hands the writer slices of its copy buffer, not arrays of their own."""
    buf = np.zeros((40, PAGE_SIZE), np.uint8)
    buf[10:20, 2048 + 16] = 1  # hidden from the three words
    assert list(zero_rows(buf[5:25])) == [True] * 5 + [False] * 10 + [True] * 5


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 600), st.integers(0, PAGE_SIZE - 1), st.integers(0, 2**32 - 1))
def test_page_digests_are_each_pages_xxh3(npages: int, tail: int, seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, npages * PAGE_SIZE + tail, dtype=np.uint8).tobytes()
    h = xxhash.xxh3_64_intdigest
    want = [h(data[i : i + PAGE_SIZE]) for i in range(0, npages * PAGE_SIZE, PAGE_SIZE)]
    for buf in (data, bytearray(data), memoryview(data)):
        got = page_digests(buf)
        assert got.dtype == np.uint64
        assert [int(x) for x in got] == want  # a partial page at the end has no digest


def test_zero_rows_many_candidates_in_several_gathers() -> None:
    """More candidates than one gather takes (64), fewer than half the pages: several passes."""
    rng = np.random.default_rng(7)
    pages = rng.integers(1, 256, (1000, PAGE_SIZE), dtype=np.uint8)
    cand = rng.choice(1000, 400, replace=False)
    pages[cand] = 0
    hidden = cand[::3]
    pages[hidden, 1234] = 9  # candidates by their three words, not zero
    want = _full_scan(pages)
    assert int(want.sum()) == 400 - len(hidden)
    assert (zero_rows(pages) == want).all()
