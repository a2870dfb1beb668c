"""Records validated once for a run of layers that repeat them: a migration's rounds.

Every round of a migration is a layer with the whole process state, and from one round to the
next most of it is the same bytes (64 mappings' records, 64 signal actions, the fds, mm, task,
props). Opening the final layer checked all of it again, field by field, inside the downtime:
1.5-2.5 ms of the destination's CPU for a small process, the largest step between the last byte
received and READY. A memo keeps, per section of the metadata, the bytes it was validated from and
the records it gave; a section whose bytes are the same again gives the same records without a
second check.

Exact: the key is the section packed again with the layer's own encoding (msgpack, bin type,
surrogateescape), not Python equality, which takes 1 for True or 1.0 and would let a value pass
that the check refuses. A record's check is a function of its section's bytes alone (the checks
across sections, and the page index, run every time), so a hit is what a fresh check would give.
The records are shared between the layers that hold them: nothing changes a record after it is
read (restores build plans from them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")

# The sections worth keeping: large, and equal from round to round (the inventory and the page
# index change every time; threads carry registers but are cheap to compare).
SECTIONS = ("vmas", "threads", "sigactions", "fds", "mm", "task", "props", "pipes", "anonfds")


class RecordMemo:
    def __init__(self) -> None:
        self._last: dict[str, tuple[bytes, Any]] = {}
        self.hits = 0

    def take(self, key: str, raw: Any, build: Callable[[], T]) -> T:
        """`build()`'s records for section `key` whose metadata is `raw`, or the same records as
        the last time these bytes were built."""
        try:
            packed = msgpack.packb(raw, use_bin_type=True, unicode_errors="surrogateescape")
        except (TypeError, ValueError, OverflowError):
            return build()  # (not what a decoded layer holds: let the check say why)
        last = self._last.get(key)
        if last is not None and last[0] == packed:
            self.hits += 1
            v = last[1]
            return list(v) if isinstance(v, list) else v  # type: ignore[return-value]
        out = build()
        self._last[key] = (packed, list(out) if isinstance(out, list) else out)
        return out


def section(memo: RecordMemo | None, d: dict[Any, Any], key: str, build: Callable[[], T]) -> T:
    """Section `key` of metadata `d` (a missing one is built: its own error, or its default)."""
    return build() if memo is None or key not in d else memo.take(key, d[key], build)


def take(memo: RecordMemo | None, key: str, raw: Any, build: Callable[[], T]) -> T:
    return build() if memo is None else memo.take(key, raw, build)
