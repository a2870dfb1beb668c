"""A dump whose caller waits for it with the process stopped: a migration's final round, whose every
millisecond after the thaw is downtime (ckpt/migrate/source.py passes `downtime=True`).

Its caller's threads run real-time then (ckpt/migrate/boost.py), but a thread it hands work to does
not: a pool thread, or a thread started after the thaw, first waits for a CPU behind every ordinary
task of the machine (1-15 ms each under the project's load, for work of 0.1-1 ms). So a small final
layer is made on the calling thread: its chunks (LayerWriter's `inline_pages`) and the counts for
its records. A big one (a busy writer's GiB) keeps the pools: there the work itself is what takes
the time, and two CPUs do it faster than one."""

from __future__ import annotations

from collections.abc import Sized

# Pages of a chunk or batch the calling thread works on itself (one default chunk: 1 MiB, whose
# xxh3 takes ~0.2 ms, zstd -1 ~2-3 ms).
INLINE_PAGES = 256


def inline_after_thaw(to_read: Sized) -> bool:
    """Whether the work after the thaw stays on the calling thread: a final set of one chunk."""
    return len(to_read) <= INLINE_PAGES
