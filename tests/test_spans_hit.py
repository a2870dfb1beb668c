"""ranges.spans_hit, which both the dump (mappings with a page whose read failed) and a tree's
shared memory (TreeShare.settle: unreadable holders that stand for later members) ask: the same
answer as looking at every point for every span, for spans in any order, overlapping or not."""

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
