"""The restore's fill groups a chunk's pages into runs (address and position in the chunk both
advancing one page at a time) for process_vm_writev; the vectorised grouping must give exactly the
runs of the per-run one it replaced."""

from __future__ import annotations

from pathlib import Path

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


def test_file_digests_read_by_runs(tmp_path: Path) -> None:
    """The digests of a private file mapping's pages, read a run at a time: equal to each page's
    own, a partial last page and pages past the end of the file reading as zeros."""
    import os

    import xxhash

    from ckpt.restore.memory import _file_digests

    f = tmp_path / "f"
    data = np.random.default_rng(1).integers(0, 256, int(2.5 * P) + 300 * P, dtype=np.uint8).tobytes()
    f.write_bytes(data)
    start, offset = 0x7F0000000000, 3 * P  # the mapping starts at file offset 3 pages
    pages = [0, 1, 2, 5, *range(7, 300), 301, 302, 303]  # runs of 1, 3, 293 (over 256), past EOF
    addrs = np.array([start + p * P for p in pages], dtype=np.uint64)

    def one(p: int) -> int:
        b = data[offset + p * P : offset + (p + 1) * P]
        return xxhash.xxh3_64_intdigest(b.ljust(P, b"\0"))

    fd = os.open(f, os.O_RDONLY)
    try:
        got = _file_digests(fd, offset, start, addrs)
    finally:
        os.close(fd)
    assert got.tolist() == [one(p) for p in pages]
    assert os.path.getsize(f) < offset + 304 * P  # the last pages really are past the end
