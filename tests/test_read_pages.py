"""memory.read_pages takes a page set in either kind (array('Q') or numpy) and, in numpy's, below
READ_FEW pages the list steps: every way must copy the same pages to the same rows and give up on
the same ones. A real process's memory: data pages, pages of a PROT_NONE mapping holding data
(read through /proc/PID/mem), and pages unmapped (given up). A process of its own, idle in read():
in the test's own process another thread's allocation could take the unmapped pages' place."""

from __future__ import annotations

import random
import subprocess
import sys
from array import array
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ckpt.memory import READ_FEW, PageBuffer, read_pages
from ckpt.proc.maps import PAGE_SIZE
from tests.util import HYPOTHESIS_SEED

N = 96  # pages: 0-63 data, 64-79 PROT_NONE holding data, 80-95 unmapped
CHILD = f"""
import ctypes, mmap, random, sys
P = mmap.PAGESIZE
m = mmap.mmap(-1, {N} * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = random.Random(7).randbytes({N} * P)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
libc = ctypes.CDLL(None)
assert libc.mprotect(ctypes.c_void_p(base + 64 * P), ctypes.c_size_t(16 * P), 0) == 0
assert libc.munmap(ctypes.c_void_p(base + 80 * P), ctypes.c_size_t(16 * P)) == 0
print(base, flush=True)
sys.stdin.read()
"""
DATA = random.Random(7).randbytes(N * PAGE_SIZE)


@pytest.fixture(scope="module")
def child() -> Iterator[tuple[int, int]]:
    """(pid, base of its region)."""
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line, p.wait(30)
        yield p.pid, int(line)
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(30)


@seed(HYPOTHESIS_SEED)
@settings(max_examples=120, deadline=None, database=None)
@given(
    pages=st.lists(st.integers(0, N - 1), unique=True, min_size=1, max_size=READ_FEW + 24),
    at=st.integers(0, 3),
)
def test_every_kind_reads_the_same(child: tuple[int, int], pages: list[int], at: int) -> None:
    pid, base = child
    idx = sorted(pages)
    addrs = [base + i * PAGE_SIZE for i in idx]
    want_ok = [i for i in idx if i < 80]
    want_failed = [base + i * PAGE_SIZE for i in idx if i >= 80]
    kinds = {
        "array": array("Q", addrs),
        "numpy": np.array(addrs, dtype=np.uint64),  # the few-pages path when len <= READ_FEW
        "numpy, a view": np.array([0, *addrs], dtype=np.uint64)[1:],
    }
    for kind, a in kinds.items():
        buf = PageBuffer(len(idx) + at)
        try:
            rr = read_pages(pid, a, buf, at)
            assert list(rr.addrs) == [base + i * PAGE_SIZE for i in want_ok], kind
            assert list(rr.failed) == want_failed, kind
            assert rr.nbytes == len(want_ok) * PAGE_SIZE, kind
            got = bytes(buf.view[at * PAGE_SIZE : (at + len(want_ok)) * PAGE_SIZE])
            assert got == b"".join(DATA[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in want_ok), kind
            if not isinstance(a, array):  # numpy in, numpy out (what the pre-copy merge takes)
                assert isinstance(rr.addrs, np.ndarray) and rr.addrs.dtype == np.uint64, kind
                assert isinstance(rr.failed, np.ndarray) and rr.failed.dtype == np.uint64, kind
        finally:
            buf.close()
