"""One page-table walk run in a thread beside another, while the target is frozen.

A PAGEMAP_SCAN walks every page-table entry of the span it is given, in the kernel, under the mm's
lock taken for reading: two of them over the same process run side by side on two CPUs (the ioctl
releases the GIL for its whole length). An incremental uffd-wp dump of a big process walks twice
(the written pages, re-protected, and the holes): 1.8 ms each for 1 GiB present, here. Side by side
the freeze holds the longer of the two instead of their sum. For a small process a thread costs
more than it saves (~0.1 ms to start against a walk of ~0.1 ms), so the caller says when.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")

# Bytes of followed mappings from which the two walks are worth a thread: as for the smaps walk
# (dump.PAGETABLES_BACKGROUND).
PARALLEL_BYTES = 64 << 20


class Result(Generic[T]):
    """What the walk beside returned, or raised (raised again by get())."""

    def __init__(self) -> None:
        self.value: T | None = None
        self.error: BaseException | None = None
        self.done = False

    def get(self) -> T:
        if self.error is not None:
            raise self.error
        if not self.done:
            raise RuntimeError("the walk beside has not run")
        return self.value  # type: ignore[return-value]


@contextmanager
def beside(fn: Callable[[], T], parallel: bool) -> Iterator[Result[T]]:
    """Run ``fn`` in a thread while the block runs (``parallel``), or before the block; its result
    is in the yielded Result once the block has ended. The thread is joined whatever happens in the
    block: no walk of the target outlasts its caller (nor its freeze)."""
    out: Result[T] = Result()

    def run() -> None:
        try:
            out.value = fn()
        except BaseException as e:  # handed to the caller: get() raises it
            out.error = e
        out.done = True

    if not parallel:
        run()
        yield out
        return
    th = threading.Thread(target=run, name="ckpt-scan", daemon=True)
    th.start()
    try:
        yield out
    finally:
        th.join()
