"""ranges.py's set functions give the same answer for both kinds of page set (issue 9 part 3): a small
dump's array('Q') and a big one's numpy array, and one of each.

Compared with plain Python sets on generated page sets (runs, gaps, overlaps) and ranges."""

from __future__ import annotations

from array import array

import numpy as np
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ckpt import ranges
from tests.util import HYPOTHESIS_SEED

P = 4096
pages = st.lists(st.integers(0, 300), max_size=120).map(lambda xs: sorted({x * P for x in xs}))
spans = st.lists(st.tuples(st.integers(0, 310), st.integers(1, 40)), max_size=8).map(
    lambda xs: ranges.merge([(a * P, (a + n) * P) for a, n in xs])
)


def kinds(xs: list[int]) -> list[object]:
    return [array("Q", xs), np.array(xs, dtype=np.uint64)]


def flat(a: object) -> list[int]:
    return [int(x) for x in a]  # type: ignore[attr-defined]


@seed(HYPOTHESIS_SEED)
@settings(max_examples=200, deadline=None)
@given(a=pages, b=pages, rs=spans)
def test_set_functions_agree_across_kinds(a: list[int], b: list[int], rs: list[tuple[int, int]]) -> None:
    # Both ways of working on two small sets: in Python, and (past PY_MAX pages, numpy imported
    # already) on their bytes by numpy, the answer small again.
    old = ranges.PY_MAX
    try:
        for ranges.PY_MAX in (10**9, 0, old):
            _agree(a, b, rs)
    finally:
        ranges.PY_MAX = old


def _agree(a: list[int], b: list[int], rs: list[tuple[int, int]]) -> None:
    def inside(x: int) -> bool:
        return any(s <= x < e for s, e in rs)

    for ka in kinds(a):
        assert flat(ranges.inside(ka, rs)) == [x for x in a if inside(x)]
        assert flat(ranges.outside(ka, rs)) == [x for x in a if not inside(x)]
        assert flat(ranges.as_set(ka)) == a
        for s, e in rs:
            assert ranges.any_in(ka, s, e) == any(s <= x < e for x in a)
        for kb in kinds(b):
            assert flat(ranges.minus(ka, kb)) == [x for x in a if x not in set(b)]
            assert flat(ranges.union(ka, kb)) == sorted(set(a) | set(b))
        disjoint = [x for x in b if x not in set(a)]
        for kd in kinds(disjoint):
            assert flat(ranges.cat([ka, kd])) == sorted(set(a) | set(disjoint))
    # Small stays small (no numpy), an unordered small one is sorted and deduplicated.
    sa, sb = array("Q", a), array("Q", b)
    assert ranges.is_small(ranges.union(sa, sb))
    assert ranges.is_small(ranges.minus(sa, sb))
    assert ranges.is_small(ranges.cat([sa, array("Q", [x for x in b if x not in set(a)])]))
    unordered = ranges.as_set(array("Q", list(reversed(a)) + a))
    assert ranges.is_small(unordered) and flat(unordered) == a
    assert flat(ranges.cat([array("Q", list(reversed(a)))])) == sorted(a)
