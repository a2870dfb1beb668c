"""The per-page work of a full dump's chunks in one C call without the GIL (pagework.c), or None.

`scripts/setup.sh` builds `_pagework.so` (and `_pagework-avx2.so`) from pagework.c with gcc and
Debian's xxhash.h. ctypes releases the GIL around each call, so the writer's two pool threads gather,
digest and checksum a chunk at the same time as each other and as zstd (docs/benchmarks.md,
"wall9c"). Where the library is missing, was built from another version of pagework.c, or
`CKPT_PAGEWORK=0` is set, `lib()` is None and callers take the pure-Python path
(ckpt/image/pagescan.py, python-xxhash, numpy's take), which gives the same bytes: both are
xxh3_64 with seed 0, and tests/test_pagework.py compares the two, layer for layer.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np
import xxhash

from ckpt.clib import Library

PAGE_SIZE = 4096
ABI = 2  # pagework.c's ABI: a library built from another version of it is not used
HERE = Path(__file__).resolve().parent
BUILDS = (HERE / "_pagework.so", HERE / "_pagework-avx2.so")
_u64 = ctypes.c_uint64
_ptr = ctypes.c_void_p
_size = ctypes.c_size_t


def _setup(so: ctypes.CDLL) -> bool:
    so.ckpt_has_avx2.restype = ctypes.c_int
    so.ckpt_has_avx2.argtypes = []
    so.ckpt_gather_digest.restype = _u64
    so.ckpt_gather_digest.argtypes = [_ptr, _ptr, _size, _ptr, _ptr]
    so.ckpt_digest_pages.restype = _u64
    so.ckpt_digest_pages.argtypes = [_ptr, _size, _ptr]
    so.ckpt_zero_pages.restype = None
    so.ckpt_zero_pages.argtypes = [_ptr, _size, _ptr]
    so.ckpt_xxh3.restype = _u64
    so.ckpt_xxh3.argtypes = [ctypes.c_char_p, _size]
    # The same hash as python-xxhash's, or not used at all (a layer must not depend on the path).
    probe = bytes(range(256)) * 17
    return bool(so.ckpt_xxh3(probe, len(probe)) == xxhash.xxh3_64_intdigest(probe))


# (the AVX2 build where the CPU has it)
_LIB = Library("CKPT_PAGEWORK", BUILDS, "ckpt_pagework_abi", ABI, _setup, lambda so: bool(so.ckpt_has_avx2()))


def lib() -> ctypes.CDLL | None:
    """The library, loaded on first use (a small dump never asks); None where it is not usable."""
    return _LIB.get()


def reset(enabled: bool) -> None:
    """Load again on next use (tests: both paths in one process); with `enabled` False, never."""
    _LIB.reset(enabled)


def _pages(a: np.ndarray) -> None:
    if a.ndim != 2 or a.shape[1] != PAGE_SIZE or a.dtype != np.uint8 or not a.flags.c_contiguous:
        raise ValueError("pages must be a C-contiguous (n, PAGE_SIZE) uint8 array")


def gather_digest(
    so: ctypes.CDLL, pages: np.ndarray, rows: np.ndarray, out: np.ndarray
) -> tuple[np.ndarray, int]:
    """pages[rows] copied into out[:len(rows)]; (each page's xxh3_64, the xxh3_64 of them all)."""
    _pages(pages)
    _pages(out)
    r = np.ascontiguousarray(rows, dtype=np.int64)
    n = len(r)
    # The C code trusts every row: bound them here.
    if r.ndim != 1 or n > len(out) or (n and (int(r.min()) < 0 or int(r.max()) >= len(pages))):
        raise ValueError(f"{n} rows of {len(pages)} pages into {len(out)}")
    dg = np.empty(n, np.uint64)
    whole = so.ckpt_gather_digest(pages.ctypes.data, r.ctypes.data, n, out.ctypes.data, dg.ctypes.data)
    return dg, int(whole)


def digest_pages(so: ctypes.CDLL, pages: np.ndarray) -> tuple[np.ndarray, int]:
    """(each page's xxh3_64, the xxh3_64 of all of `pages`), an (n, PAGE_SIZE) uint8 array."""
    _pages(pages)
    dg = np.empty(len(pages), np.uint64)
    whole = so.ckpt_digest_pages(pages.ctypes.data, len(pages), dg.ctypes.data)
    return dg, int(whole)


def zero_pages(so: ctypes.CDLL, pages: np.ndarray) -> np.ndarray:
    """True for each all-zero page of `pages`, an (n, PAGE_SIZE) uint8 array (pagescan.zero_rows)."""
    _pages(pages)
    out = np.empty(len(pages), np.bool_)
    so.ckpt_zero_pages(pages.ctypes.data, len(pages), out.ctypes.data)
    return out
