"""The early copy buffer is faulted in by reads of /dev/zero, one byte a page (ckpt/prefault.py
touch_pages), so that the mmap lock of ckpt's process is never held for the whole buffer while the
command imports: every page must then be resident, whatever the count's alignment to a readv."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from ckpt.prefault import IOV_PAGES, EarlyBuffer, touch_pages

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def _resident(addr: int, npages: int) -> int:
    vec = ctypes.create_string_buffer(npages)
    assert _libc.mincore(addr, npages * PAGE, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw)


@pytest.mark.parametrize("npages", [1, IOV_PAGES - 1, IOV_PAGES, IOV_PAGES + 1, 3 * IOV_PAGES + 17])
def test_touch_pages_faults_in_every_page_and_leaves_them_zero(npages: int) -> None:
    m = mmap.mmap(-1, (npages + 2) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert _resident(addr, npages + 2) == 0
        assert touch_pages(addr + PAGE, npages) == npages
        # exactly the pages asked for: not the guard page before, not the one after
        assert _resident(addr, 1) == 0
        assert _resident(addr + PAGE, npages) == npages
        assert _resident(addr + (npages + 1) * PAGE, 1) == 0
        assert m[:] == bytes(len(m))
    finally:
        m.close()


def test_early_buffer_is_resident_when_taken() -> None:
    eb = EarlyBuffer(5000 + (64 << 20) // PAGE)  # above the split: two threads share it
    m, populated = eb.take()
    assert populated and len(m) == eb.npages * PAGE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert _resident(addr, eb.npages) == eb.npages
    m.close()
