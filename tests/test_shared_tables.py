"""proc/tree.shared_tables: processes of a tree sharing clone()'s tables, found by sorting on kcmp's
order (O(n log n) calls per kind) instead of comparing every pair: the same pairs, in the same order,
as the pairwise way, for real processes cloned with CLONE_FILES, CLONE_FS, CLONE_VM|CLONE_SIGHAND."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ckpt.proc import tree
from tests.util import Target

Spawn = Callable[..., Target]
FILES, FS, VM, SIGHAND = (tree.KCMP_SHARED[k] for k in (2, 3, 1, 4))


def _pairwise(pids: list[int]) -> list[str]:
    """The way before: every pair, every kind."""
    pids = sorted(pids)
    out = []
    for i, a in enumerate(pids):
        for b in pids[i + 1 :]:
            for kind, what in tree.KCMP_SHARED.items():
                if tree._kcmp(a, b, kind) == 0:
                    out.append(f"processes {a} and {b} share one {what}")
    return out


def _start(spawn: Spawn, *specs: str) -> list[int]:
    t = spawn("sharers", *specs)
    return [int(w) for w in t.ready.split()[1:]]


def test_the_pairs_that_share(spawn: Spawn) -> None:
    main, p1, p2, p3, p4, p5, p6 = _start(spawn, "0F", "0S", "1F", "0VH", "2-", "0")
    want = sorted(
        [
            (main, p1, 1, FILES), (main, p3, 1, FILES), (min(p1, p3), max(p1, p3), 1, FILES),
            (main, p2, 2, FS), (main, p4, 0, VM), (main, p4, 3, SIGHAND),
        ]
    )  # fmt: skip
    got = tree.shared_tables([p6, p5, p4, p3, p2, p1, main])
    assert got == [f"processes {a} and {b} share one {what}" for a, b, _, what in want]
    assert got == _pairwise([main, p1, p2, p3, p4, p5, p6])


@pytest.mark.parametrize(
    "specs",
    [
        (),
        ("0",),
        ("0F", "1F", "2F", "3F", "4F"),  # one table, six holders
        ("0S", "0F", "1S", "2F", "1VH", "5F", "0", "7S", "8VH", "3-"),
        ("0-", "1-", "2-", "0FS", "4FS", "4VH", "6F"),
    ],
)
def test_as_the_pairwise_way(spawn: Spawn, specs: tuple[str, ...]) -> None:
    pids = _start(spawn, *specs)
    assert tree.shared_tables(pids) == _pairwise(pids)


def test_unordered_answers_fall_back_to_every_pair(spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """kcmp that gives no order (an error for one pair): the pairs are still those it calls equal."""
    pids = _start(spawn, "0F", "1F", "0S")
    ref = _pairwise(pids)
    real = tree._kcmp

    def kcmp(a: int, b: int, kind: int) -> int:
        r = real(a, b, kind)
        return 3 if r == 1 else r  # "not equal, order unavailable"

    monkeypatch.setattr(tree, "_kcmp", kcmp)
    assert tree.shared_tables(pids) == ref
