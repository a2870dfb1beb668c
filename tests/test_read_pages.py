"""memory.read_pages takes a page set in either kind (array('Q') or numpy) and, in numpy's, below
READ_FEW pages the list steps: every way must copy the same pages to the same rows and give up on
the same ones. Real memory of this process: data pages, pages of a PROT_NONE mapping holding data
(read through /proc/PID/mem), and pages unmapped under the reader (given up)."""

from __future__ import annotations

import ctypes
import mmap
import os
from array import array

import numpy as np
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ckpt.memory import READ_FEW, PageBuffer, read_pages
from ckpt.proc.maps import PAGE_SIZE
from tests.util import HYPOTHESIS_SEED

N = 96  # pages: 0-63 data, 64-79 PROT_NONE holding data, 80-95 unmapped
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class _Region:
    def __init__(self) -> None:
        self.m = mmap.mmap(-1, N * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.m))
        self.data = np.random.default_rng(7).integers(0, 256, N * PAGE_SIZE, dtype=np.uint8).tobytes()
        self.m[:] = self.data
        assert _libc.mprotect(self.base + 64 * PAGE_SIZE, 16 * PAGE_SIZE, 0) == 0
        assert _libc.munmap(self.base + 80 * PAGE_SIZE, 16 * PAGE_SIZE) == 0

    def page(self, i: int) -> bytes:
        return self.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]


_REGION: _Region | None = None


def _region() -> _Region:
    """One region for every example (a mapping with a hole punched cannot be closed by mmap's own
    close: it stays for the test process's life)."""
    global _REGION
    if _REGION is None:
        _REGION = _Region()
    return _REGION


@seed(HYPOTHESIS_SEED)
@settings(max_examples=120, deadline=None, database=None)
@given(
    pages=st.lists(st.integers(0, N - 1), unique=True, min_size=1, max_size=READ_FEW + 24),
    at=st.integers(0, 3),
)
def test_every_kind_reads_the_same(pages: list[int], at: int) -> None:
    r = _region()
    idx = sorted(pages)
    addrs = [r.base + i * PAGE_SIZE for i in idx]
    want_ok = [i for i in idx if i < 80]
    want_failed = [r.base + i * PAGE_SIZE for i in idx if i >= 80]
    kinds = {
        "array": array("Q", addrs),
        "numpy": np.array(addrs, dtype=np.uint64),  # the few-pages path when len <= READ_FEW
        "numpy, a view": np.array([0, *addrs], dtype=np.uint64)[1:],
    }
    for kind, a in kinds.items():
        buf = PageBuffer(len(idx) + at)
        try:
            rr = read_pages(os.getpid(), a, buf, at)
            assert list(rr.addrs) == [r.base + i * PAGE_SIZE for i in want_ok], kind
            assert list(rr.failed) == want_failed, kind
            assert rr.nbytes == len(want_ok) * PAGE_SIZE, kind
            got = bytes(buf.view[at * PAGE_SIZE : (at + len(want_ok)) * PAGE_SIZE])
            assert got == b"".join(r.page(i) for i in want_ok), kind
            if not isinstance(a, array):  # numpy in, numpy out (what the pre-copy merge takes)
                assert isinstance(rr.addrs, np.ndarray) and rr.addrs.dtype == np.uint64, kind
                assert isinstance(rr.failed, np.ndarray) and rr.failed.dtype == np.uint64, kind
        finally:
            buf.close()
