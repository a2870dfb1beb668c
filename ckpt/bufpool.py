"""One page buffer kept from a migration round to the next.

Each dump faults its copy buffer in before the freeze (2-4 us a page here; 40-80 ms a round for the
dirty set of a GiB writing 1% per 100 ms on a loaded machine): rounds that come every few hundred
ms would spend much of their time faulting in memory they had a moment before."""

from __future__ import annotations

from ckpt.memory import PageBuffer


class BufferPool:
    def __init__(self) -> None:
        self._held: PageBuffer | None = None

    def get(self, npages: int) -> PageBuffer:
        """A buffer of at least `npages` (the one held when it is large enough)."""
        b, self._held = self._held, None
        if b is not None and b.npages >= npages:
            return b
        if b is not None:
            b.close()
        return PageBuffer(npages)

    def put(self, b: PageBuffer) -> None:
        """Keep the larger of `b` and the one held; close the other."""
        if self._held is not None and self._held.npages >= b.npages:
            b.close()
            return
        if self._held is not None:
            self._held.close()
        self._held = b

    def close(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None
