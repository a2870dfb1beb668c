"""A full dump's copy buffer unmapped on a thread of its own, beside the dump's last steps.

Unmapping the buffer costs ~16 ms of CPU per 256 MiB here (the kernel frees every page; ~64 ms at
1 GiB), and it came between the last chunk and the metadata, on the one thread that then encodes
the metadata and waits for the publish's fsyncs. On a thread of its own it runs while they do; the
dump joins it before it returns (`locks`, the dump's ExitStack), on every path. Most of the pages are
given back before that, batch by batch as the writer finishes with them (`releasing`,
PageBuffer.release), so the unmap has little left to free.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

PAGE_SIZE = 4096
ASIDE_MIN = 64 << 20  # bytes: below this the unmap (~4 ms) costs about what a thread's start saves


def releasing(pages: Any) -> bool:
    """Whether the last processing of `pages` (dump._Pages) gives their buffers' pages back batch by
    batch (PageBuffer.release): where close_aside would unmap them on its thread, that is where the
    buffers are not going back to a pool and are large enough for the unmap to cost."""
    return pages.pool is None and _own(pages) >= ASIDE_MIN


def _own(pages: Any) -> int:
    return sum(b.npages for b in pages.buffers if not b.borrowed) * PAGE_SIZE


def close_aside(pages: Any, locks: contextlib.ExitStack) -> threading.Thread | None:
    """pages.close() (dump._Pages): here when there is little to unmap or the buffers go back to a
    pool, else on a new thread, joined when `locks` closes; that thread, or None."""
    if pages.pool is not None or _own(pages) < ASIDE_MIN:
        pages.close()
        return None
    t = threading.Thread(target=pages.close, name="ckpt-unmap")
    t.start()
    locks.callback(t.join)
    return t
