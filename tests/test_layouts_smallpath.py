"""Property tests (issue 9 part 3): a dump's small path (page sets in array('Q'), no numpy) and its
numpy path give the same layers for every memory layout, full and incremental.

The layouts are tests/test_layouts.py's (a real process each, tests/targets/layout.c). The same
process is dumped with `CKPT_PAGESET_SMALL_MAX` at its default (sets of up to 4096 pages are
small), at 0 (numpy for every set), and at a threshold drawn inside the layout's size, so that one
dump holds both kinds and crosses the boundary (a small dirty set against a big parent, a present
set just over the threshold). Each layer's merged view must equal the process's memory page for
page, and the layers of the two paths must name the same pages the same way.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import example, given, seed
from hypothesis import strategies as st

from ckpt.dump import dump
from ckpt.image import open_layer
from tests.test_layouts import (
    ISSUE_9,
    Case,
    Mapping,
    Op,
    Run,
    _settings,
    _writable,
    cases,
    running,
)
from tests.util import HYPOTHESIS_SEED, assert_view_equals_memory

ENV = "CKPT_PAGESET_SMALL_MAX"


@contextmanager
def small_max(n: int | None) -> Iterator[None]:
    old = os.environ.get(ENV)
    if n is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def _dump(pid: int, d: Path, case: Case, threshold: int | None, incremental: bool, track: str) -> Path:
    """One dump with the given threshold; the target is left stopped (the caller continues it), so
    that the dumps compared saw the same memory: a target that answered "ready" may still be on its
    way into read() (libc's stdout lock: a page of zeros but that word) when the first is taken."""
    with small_max(threshold):
        r = dump(
            pid,
            d,
            incremental=incremental,
            track=track,
            max_buffer=case.max_buffer,
            threads=case.threads,
            leave_stopped=True,
        )
    assert r.incremental == incremental
    assert_view_equals_memory(pid, r.layer)
    return Path(r.layer)


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The dumps inside see one moment of the process (each leaves it stopped); continued after."""
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _columns(layer: Path) -> dict[str, list[int]]:
    pg = open_layer(layer).layers[0].meta.pages  # the newest
    return {k: [int(x) for x in getattr(pg, k)] for k in ("data", "zero", "absent", "unchanged")}


def _table(layer: Path) -> list[tuple[int, int]]:
    pt = open_layer(layer).page_table()
    return [(int(a), int(s)) for a, s in zip(pt.addr, pt.state, strict=True)]


def _pages(case: Case) -> int:
    return sum(m.npages for m in case.maps)


CAP = 6000  # pages: the default threshold (4096) falls inside many of the layouts


@seed(HYPOTHESIS_SEED)
@_settings(8)
@given(case=cases(cap=CAP), frac=st.floats(0.0, 1.0))
@example(case=ISSUE_9, frac=0.5)
@example(case=Case(maps=[Mapping("rw", "hole", 0, False, [Run("d", 4090, 3), Run("z", 7)])]), frac=0.0)
def test_full_dump_small_and_numpy_agree(case: Case, frac: float) -> None:
    """A full dump (no tracker: the chains do not meet) with every set small, every set numpy's, and
    a threshold inside the layout: the same stored, zero and absent pages, each view exact."""
    mid = max(1, int(_pages(case) * frac))
    with running(case) as (t, d), stopped(t.pid):
        got = {n: _columns(_dump(t.pid, d / f"t{n}", case, n, False, "none")) for n in (None, 0, mid)}
    assert got[None] == got[0] == got[mid]


@pytest.mark.skipif(not _writable(), reason="no dirty tracker on this kernel")
@seed(HYPOTHESIS_SEED)
@_settings(5)
@given(case=cases(rounds=2, cap=CAP), frac=st.floats(0.0, 1.0))
@example(
    case=Case(ISSUE_9.maps, rounds=[[Op("data", 0, 3, 300, 9), Op("drop", 0, 1000, 513)], []]),
    frac=0.05,
)
def test_incremental_small_and_numpy_agree(case: Case, frac: float) -> None:
    """Two chains of one process, one on the small path (default threshold), the other on numpy's
    (threshold 0) or on a threshold inside the layout: after each round of writes both chains' merged
    views equal the memory, and their merged page tables are the same."""
    mid = max(1, int(_pages(case) * frac))
    other = 0 if frac < 0.3 else mid
    case = dataclasses.replace(case, tracker=case.tracker if case.tracker != "none" else "hash")
    with running(case) as (t, root):
        a, b = root / "a", root / "b"
        with stopped(t.pid):
            _dump(t.pid, a, case, None, False, case.tracker)
            _dump(t.pid, b, case, other, False, case.tracker)
        for ops_ in case.rounds:
            t.apply(case.maps, ops_)
            with stopped(t.pid):
                la = _dump(t.pid, a, case, None, True, "auto")
                lb = _dump(t.pid, b, case, other, True, "auto")
            assert _table(la) == _table(lb)
