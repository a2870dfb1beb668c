"""ctypes buffers and arrays whose types outlive a garbage collection.

`ctypes.create_string_buffer(n)` and `(T * n)()` make an array type `T * n` first. ctypes keeps
such types in a cache that holds them only weakly, and a type sits in a reference cycle of its own
(its __mro__), so the next garbage collection frees it and the next `T * n` builds it again: ~20 us
each here, against ~1 us for the buffer itself. A dump's freeze holds the collector off
(ptrace/gcpause.py) and it runs at the thaw, so every freeze built again each size it used
(siginfo, rseq, the queued signals, a copy's iovec array...): ~0.1-0.3 ms of the target's freeze.
Here the types are held for good, keyed by element type and length, up to a bound (beyond it, a
type is made as before: sizes that vary without end must not grow this). The modules on a freeze's
path make theirs at import (`warm`), so that not even a new `ckpt dump` process's first freeze
builds one; an array whose length varies (a copy's iovecs) is made of a power of two elements
(`vector`), so that few lengths are ever made.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

MAX_TYPES = 256

_types: dict[tuple[type, int], Any] = {}
_lock = threading.Lock()


def array_type(ctype: type, n: int) -> Any:
    """``ctype * n``, made once."""
    key = (ctype, n)
    t = _types.get(key)
    if t is None:
        t = ctype * n  # type: ignore[operator]
        with _lock:
            if len(_types) < MAX_TYPES:
                t = _types.setdefault(key, t)
    return t


def warm(ctype: type, *lengths: int) -> None:
    """Make (and hold) ``ctype * n`` for each of ``lengths`` now: at import, not in a freeze."""
    for n in lengths:
        array_type(ctype, n)


def char_buffer(size: int, init: bytes = b"") -> ctypes.Array[ctypes.c_char]:
    """``ctypes.create_string_buffer(init, size)``: ``size`` zeroed bytes, ``init`` at the start."""
    buf: ctypes.Array[ctypes.c_char] = array_type(ctypes.c_char, size)()
    if init:
        if len(init) > size:
            raise ValueError(f"{len(init)} bytes do not fit a buffer of {size}")
        ctypes.memmove(buf, init, len(init))
    return buf


def vector(ctype: type, items: list[Any]) -> Any:
    """An array holding ``items`` first, of the next power of two elements at least (the rest
    zeroed): for a call that is told the count apart (an iovec array and its length)."""
    n = 1 << max(len(items) - 1, 0).bit_length()
    out = array_type(ctype, n)()
    out[: len(items)] = items
    return out
