"""Copy buffers are faulted in by MADV_POPULATE_WRITE in 1 MiB steps (ckpt/prefault.py populate), so
that the mmap lock of ckpt's process is never held for a whole buffer while the command imports:
every page must still be resident afterwards, whatever the size's alignment to a step."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from ckpt.memory import PageBuffer
from ckpt.prefault import STEP, EarlyBuffer, populate

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def _resident(addr: int, npages: int) -> int:
    vec = ctypes.create_string_buffer(npages)
    assert _libc.mincore(addr, npages * PAGE, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw)


@pytest.mark.parametrize(
    "npages", [1, STEP // PAGE - 1, STEP // PAGE, STEP // PAGE + 1, 3 * STEP // PAGE + 17]
)
def test_populate_faults_in_exactly_the_pages_asked_for(npages: int) -> None:
    m = mmap.mmap(-1, (npages + 2) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert _resident(addr, npages + 2) == 0
        assert populate(addr + PAGE, npages * PAGE)
        assert _resident(addr, 1) == 0  # not the page before, not the one after
        assert _resident(addr + PAGE, npages) == npages
        assert _resident(addr + (npages + 1) * PAGE, 1) == 0
        assert m[:] == bytes(len(m))
    finally:
        m.close()


def test_early_buffer_is_resident_when_taken() -> None:
    eb = EarlyBuffer(5000 + (64 << 20) // PAGE)  # above the split: two threads share it
    m, populated = eb.take()
    assert populated and len(m) == eb.npages * PAGE
    assert _resident(ctypes.addressof(ctypes.c_char.from_buffer(m)), eb.npages) == eb.npages
    m.close()


def test_page_buffer_is_resident_when_made() -> None:
    b = PageBuffer(3 + (80 << 20) // PAGE)  # above its split too
    try:
        assert _resident(b.addr, b.npages) == b.npages
    finally:
        b.close()
