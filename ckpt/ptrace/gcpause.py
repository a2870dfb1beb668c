"""Python's cyclic garbage collector held off while a process is frozen.

A freeze allocates thousands of small containers (/proc texts parsed into dicts, ctypes structs,
records), so the collector's generation-0 threshold (700 allocations) is crossed once or twice in
every incremental freeze of even an idle process, and now and then a generation-1 or -2 collection
runs there: 0.2-0.9 ms measured here, every one of them inside the target's freeze (bench_freeze
--counts). Nothing a freeze makes lives in a reference cycle that must go before the thaw, so the
collections are put off until the last freeze of this process ends, where the next allocation runs
them as it would have. Counted, so that freezes that overlap (a process tree's members, held
together until the tree thaws) resume it only once the last of them has ended.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_depth = 0
_was_enabled = False


def pause() -> None:
    """Hold off collections until the matching resume() (nested pauses count)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1


def resume() -> None:
    """End one pause(); the last one gives the collector back as it was found."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth == 0 and _was_enabled:
            gc.enable()


def paused() -> int:
    """How many pauses are open (for tests)."""
    return _depth
