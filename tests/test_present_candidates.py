"""An incremental uffd-wp dump adds every present page of its candidate ranges (new mappings, those
no tracker follows: PROT_NONE guards, [vdso]) to the dirty set (dump._present_in). The mappings of
each candidate are found by bisection (an 8-thread process has a stack guard a thread among them):
the pages must be those the comparison of every mapping with every candidate gives, on this
process's own memory (pages touched at random in mappings split by mprotect), for generated
candidates; mappings out of address order take the comparison itself."""

from __future__ import annotations

import mmap
import os
import random
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ckpt import ranges
from ckpt.dump import _present_in, _with_vdso
from ckpt.memory import present_in
from ckpt.proc.maps import Vma, copied_vmas, read_maps
from tests.util import HYPOTHESIS_SEED, PAGE

N = 600  # pages of the test's region


@pytest.fixture(scope="module")
def region() -> Iterator[tuple[int, list[Vma]]]:
    """A region of N pages in chunks of 1-40 pages, every other chunk PROT_NONE (separate mappings),
    a random third of the pages touched before: its start and this process's copied mappings."""
    m = mmap.mmap(-1, N * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(m, dtype=np.uint8).ctypes.data
    rnd = random.Random(HYPOTHESIS_SEED)
    for i in range(N):
        if rnd.random() < 0.33:
            m[i * PAGE] = 1
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at, k = 0, 0
    while at < N:
        n = min(rnd.randint(1, 40), N - at)
        if k % 2:
            assert libc.mprotect(ctypes.c_void_p(base + at * PAGE), n * PAGE, 0) == 0
        at, k = at + n, k + 1
    try:
        yield base, copied_vmas(read_maps(os.getpid()))
    finally:
        assert libc.mprotect(ctypes.c_void_p(base), N * PAGE, 3) == 0
        m.close()


def _reference(pid: int, dv: list[Vma], cand: list[tuple[int, int]]) -> list[int]:
    inside = [v for v in dv if any(v.start < b and a < v.end for a, b in cand)]
    scan = [v for v in inside if v.path != "[vdso]"]
    spans = [(max(a, v.start), min(b, v.end)) for a, b in cand for v in scan if v.start < b and a < v.end]
    pp = present_in(pid, ranges.merge(spans), small=True) if spans else ranges.empty()
    return [int(x) for x in ranges.as_set(_with_vdso(pp, [v for v in inside if v.path == "[vdso]"]))]


@seed(HYPOTHESIS_SEED)
@settings(max_examples=60, deadline=None, database=None)
@given(
    cuts=st.lists(st.tuples(st.integers(-5, N + 5), st.integers(1, 80)), min_size=0, max_size=12),
    vdso=st.booleans(),
    shuffle=st.booleans(),
)
def test_candidates_pages_as_every_pair_compared(
    region: tuple[int, list[Vma]], cuts: list[tuple[int, int]], vdso: bool, shuffle: bool
) -> None:
    base, dv = region
    cand = [(base + a * PAGE, base + (a + n) * PAGE) for a, n in cuts]
    if vdso:
        cand += [(v.start, v.end) for v in dv if v.path == "[vdso]"]
    cand = ranges.merge(cand)
    order = list(dv)
    if shuffle:
        random.Random(len(cand)).shuffle(order)
    pid = os.getpid()
    got = [int(x) for x in ranges.as_set(_present_in(pid, order, cand))]
    assert got == _reference(pid, dv, cand)
