"""The restore's fill groups a chunk's pages into runs (address and position in the chunk both
advancing one page at a time) for process_vm_writev; the vectorised grouping must give exactly the
runs of the per-run one it replaced."""

from __future__ import annotations

import numpy as np
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ckpt.restore.memory import _runs, _runs_array
from tests.util import HYPOTHESIS_SEED

P = 4096


@seed(HYPOTHESIS_SEED)
@settings(max_examples=150, deadline=None, database=None)
@given(
    pages=st.lists(st.integers(0, 2000), unique=True, max_size=300),
    gaps=st.lists(st.integers(1, 3), max_size=300),
)
def test_runs_array_equals_runs(pages: list[int], gaps: list[int]) -> None:
    addrs = np.array(sorted(pages), dtype=np.uint64) * np.uint64(P) + np.uint64(0x7F0000000000)
    steps = (gaps + [1] * len(addrs))[: len(addrs)]
    pos = np.cumsum(np.array(steps, dtype=np.int64)) - 1 if len(addrs) else np.zeros(0, np.int64)
    want = np.array(list(_runs(addrs, pos)), dtype=np.uint64).reshape(-1, 3)
    got = _runs_array(addrs, pos)
    assert got.dtype == np.uint64 and np.array_equal(got, want)
    assert int(got[:, 2].sum()) == len(addrs)
