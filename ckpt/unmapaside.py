"""A full dump's copy buffer unmapped on a thread of its own, beside the dump's last steps.

Unmapping the buffer costs ~16 ms of CPU per 256 MiB here (the kernel frees every page; ~64 ms at
1 GiB), and it came between the last chunk and the metadata, on the one thread that then encodes
the metadata and waits for the publish's fsyncs. On a thread of its own it runs while they do; the
dump joins it before it returns (`locks`, the dump's ExitStack), on every path.

That thread gives the pages back 16 MiB at a time (MADV_DONTNEED, PageBuffer.release) before it
unmaps what is left. One munmap of a 256 MiB buffer held ckpt's mmap lock for the ~20 ms it took to
free the pages, and every mmap the dump's own thread made meanwhile (Python's arenas, as the
metadata is built) waited for it: the metadata step took 21-25 ms of wall for ~2 ms of CPU. A step
holds the lock ~1 ms, and the other thread's mmaps get in between steps.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from ckpt.threadpool import start as start_thread

PAGE_SIZE = 4096
ASIDE_MIN = 64 << 20  # bytes: below this the unmap (~4 ms) costs about what a thread's start saves
RELEASE_STEP = 4096  # pages given back by one madvise: ~1 ms of the mmap lock


def _own(pages: Any) -> int:
    return sum(b.npages for b in pages.buffers if not b.borrowed) * PAGE_SIZE


def close_aside(pages: Any, locks: contextlib.ExitStack) -> threading.Thread | None:
    """pages.close() (dump._Pages): here when there is little to unmap or the buffers go back to a
    pool, else on a new thread, joined when `locks` closes; that thread, or None."""
    if pages.pool is not None or _own(pages) < ASIDE_MIN:
        pages.close()
        return None
    t = threading.Thread(target=_release_and_close, args=(pages,), name="ckpt-unmap")
    start_thread(t)
    locks.callback(t.join)
    return t


def _release_and_close(pages: Any) -> None:
    for b in pages.buffers:
        for lo in range(0, b.npages, RELEASE_STEP):
            b.release(lo, min(b.npages, lo + RELEASE_STEP))  # (a no-op for a borrowed or shared one)
    pages.close()
