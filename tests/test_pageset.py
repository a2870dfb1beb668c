"""ckpt.pageset keeps small page sets in an array('Q') and big ones in numpy: for any input both kinds
must give the same answer to every operation, and the same as plain Python sets say. Each example
builds one set of each kind from the same addresses (the threshold plays no part in which kind a
test gets); the seed is pytest's header's (tests/util.py HYPOTHESIS_SEED)."""

from __future__ import annotations

import itertools
from array import array

import numpy as np
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ckpt import pageset
from ckpt.pageset import PAGE, BigPages, PageSet, SmallPages
from tests.util import HYPOTHESIS_SEED

BASE = 0x7F0000000000
# Page numbers clustered so that runs, gaps and overlaps between two sets all come up.
pages = st.lists(st.integers(0, 300) | st.integers(0, 1 << 24), max_size=200).map(
    lambda xs: sorted({BASE + x * PAGE for x in xs})
)
spans = st.lists(st.tuples(st.integers(0, 320), st.integers(0, 40)), max_size=12).map(
    lambda xs: [(BASE + a * PAGE, BASE + (a + n) * PAGE) for a, n in _disjoint(xs)]
)
SETTINGS = settings(max_examples=300, deadline=None, database=None)


def _disjoint(xs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, n in sorted(xs):
        if n and (not out or a >= out[-1][0] + out[-1][1]):
            out.append((a, n))
    return out


def both(xs: list[int]) -> tuple[SmallPages, BigPages]:
    return SmallPages(array("Q", xs)), BigPages(np.array(xs, dtype=np.uint64))


def same(a: PageSet, b: PageSet, want: list[int]) -> None:
    assert list(a) == want and list(b) == want
    assert a == b and a.to_bytes() == b.to_bytes() == np.array(want, dtype="<u8").tobytes()
    assert len(a) == len(b) == len(want)


@seed(HYPOTHESIS_SEED)
@SETTINGS
@given(xs=pages, ys=pages, sp=spans)
def test_small_and_numpy_sets_agree(xs: list[int], ys: list[int], sp: list[tuple[int, int]]) -> None:
    sx, bx = both(xs)
    sy, by = both(ys)
    same(sx.union(sy), bx.union(by), sorted(set(xs) | set(ys)))
    same(sx.difference(sy), bx.difference(by), [x for x in xs if x not in set(ys)])
    same(sx.intersection(sy), bx.intersection(by), [x for x in xs if x in set(ys)])
    assert sx.isin(sy) == bx.isin(by) == [x in set(ys) for x in xs]
    same(sx.within(sp), bx.within(sp), [x for x in xs if any(s <= x < e for s, e in sp)])
    runs = sx.runs()
    assert runs == bx.runs()
    assert [a for s, e in runs for a in range(s, e, PAGE)] == xs
    assert all(e < s2 for (_, e), (s2, _) in itertools.pairwise(runs))  # maximal: never adjacent
    for a, b in ((sx, by), (bx, sy)):  # mixed kinds
        same(a.union(b), bx.union(by), sorted(set(xs) | set(ys)))
        same(a.difference(b), bx.difference(by), [x for x in xs if x not in set(ys)])
        assert a.isin(b) == [x in set(ys) for x in xs]
    assert np.array_equal(sx.numpy(), bx.numpy()) and sx.numpy().dtype == np.uint64
    if xs:
        assert sx[0] == bx[0] == xs[0] and sx[-1] == bx[-1] == xs[-1]
        assert type(bx[0]) is int


@seed(HYPOTHESIS_SEED)
@SETTINGS
@given(raw=st.lists(st.integers(0, (1 << 64) - 1) | st.sampled_from([0, BASE, BASE + PAGE]), max_size=50))
def test_bytes_and_checks_agree(raw: list[int]) -> None:
    """Untrusted bytes: both kinds read them the same and find the same first bad entry."""
    b = np.array(raw, dtype="<u8").tobytes()
    got = []
    for limit in ("0", "1000000"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CKPT_PAGESET_SMALL_MAX", limit)
            p = pageset.from_bytes(b)
        assert list(p) == raw and p.to_bytes() == b
        assert isinstance(p, BigPages if limit == "0" and raw else SmallPages)
        got.append((pageset.first_unordered(p), pageset.first_unaligned(p)))
    bad = [i for i in range(1, len(raw)) if raw[i] <= raw[i - 1]]
    unal = [i for i, x in enumerate(raw) if x % PAGE]
    assert got[0] == got[1] == (bad[0] if bad else -1, unal[0] if unal else -1)


@seed(HYPOTHESIS_SEED)
@SETTINGS
@given(xs=st.lists(st.integers(0, 400), max_size=300), limit=st.integers(0, 64))
def test_factories_pick_the_kind_by_size(xs: list[int], limit: int) -> None:
    """of / from_sorted / from_runs and the results of operations: numpy above the threshold only,
    the same addresses either way."""
    want = sorted({BASE + x * PAGE for x in xs})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPT_PAGESET_SMALL_MAX", str(limit))
        made = [
            pageset.of(BASE + x * PAGE for x in xs),
            pageset.of(np.array([BASE + x * PAGE for x in xs], dtype=np.uint64)),
            pageset.from_sorted(want),
            pageset.from_runs(SmallPages(array("Q", want)).runs()),
            pageset.empty().union(pageset.from_sorted(want)),
        ]
    for p in made:
        assert list(p) == want
        assert isinstance(p, BigPages if len(want) > limit else SmallPages), (type(p), len(want), limit)
