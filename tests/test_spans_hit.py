"""ranges.spans_hit, which both the dump (mappings with a page whose read failed) and a tree's
shared memory (TreeShare.settle: unreadable holders that stand for later members) ask: the same
answer as looking at every point for every span, for spans in any order, overlapping or not. And
ranges.overlapping (the uffd-wp tracker: which mappings are unregistered, or another's): the same
answer as comparing every span with every range."""

from __future__ import annotations

from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ckpt import ranges
from tests.util import HYPOTHESIS_SEED

spans = st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1])), max_size=12
)
points = st.lists(st.integers(0, 480), max_size=40)


@seed(HYPOTHESIS_SEED)
@settings(max_examples=400, deadline=None)
@given(spans, points)
def test_as_every_point_for_every_span(ss: list[tuple[int, int]], ps: list[int]) -> None:
    assert ranges.spans_hit(ss, ps) == [any(s <= p < e for p in ps) for s, e in ss]


def test_edges() -> None:
    assert ranges.spans_hit([(10, 20), (20, 30), (5, 5)], iter([20])) == [False, True, False]
    assert ranges.spans_hit([], [1, 2]) == []
    assert ranges.spans_hit([(0, 1)], []) == [False]


@seed(HYPOTHESIS_SEED)
@settings(max_examples=400, deadline=None)
@given(spans, spans)
def test_overlapping_as_every_range_for_every_span(
    ss: list[tuple[int, int]], rs: list[tuple[int, int]]
) -> None:
    assert ranges.overlapping(ss, rs) == [any(a < e and s < b for a, b in rs) for s, e in ss]


def test_overlapping_edges() -> None:
    assert ranges.overlapping([(0, 10), (10, 20), (20, 30)], [(10, 20)]) == [False, True, False]
    assert ranges.overlapping([(0, 10)], []) == [False]
    assert ranges.overlapping([], [(0, 10)]) == []
    assert ranges.overlapping([(5, 15)], [(0, 6), (6, 8)]) == [True]
    # An empty span where two ranges touch: in neither (hypothesis found a merge of the two wrong).
    assert ranges.overlapping([(198, 198)], [(138, 198), (198, 199)]) == [False]
