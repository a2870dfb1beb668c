"""Checks for values decoded from a layer's metadata.

Everything read from an image is untrusted: a layer whose checksums are right may still have been
written by a buggy or hostile program. These helpers turn a wrong type or an out-of-range value into
a MetaError that says where it is ("vmas[3].start: ..."), before any of it is used.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ckpt import pageset
from ckpt.ranges import span_at

if TYPE_CHECKING:
    import numpy as np

U64_MAX = (1 << 64) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
# Bounds on strings and blobs only keep a hostile layer from making us hold absurd objects; they
# sit far above anything a real process has (PATH_MAX is 4096, ARG_MAX a few MiB).
MAX_STR = 1 << 16
MAX_BLOB = 1 << 26


class MetaError(ValueError):
    """Metadata that does not describe a well-formed layer; the message starts with where."""


def fail(where: str, msg: str) -> NoReturn:
    raise MetaError(f"{where}: {msg}")


def as_map(v: Any, where: str) -> dict[Any, Any]:
    if not isinstance(v, dict):
        fail(where, f"expected a map, found {type(v).__name__}")
    return v


def as_list(v: Any, where: str, max_len: int) -> list[Any]:
    if not isinstance(v, list):
        fail(where, f"expected a list, found {type(v).__name__}")
    if len(v) > max_len:
        fail(where, f"{len(v)} entries, more than the {max_len} allowed")
    return v


def get(d: dict[Any, Any], key: str, where: str) -> Any:
    if key not in d:
        fail(where, f"missing field {key!r}")
    return d[key]


def as_int(v: Any, where: str, lo: int = 0, hi: int = U64_MAX) -> int:
    # bool is an int subclass in Python; a True where a count belongs is a malformed record.
    if not isinstance(v, int) or isinstance(v, bool):
        fail(where, f"expected an integer, found {type(v).__name__}")
    if not lo <= v <= hi:
        fail(where, f"{v} is outside [{lo}, {hi}]")
    return v


def as_float(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        fail(where, f"expected a number, found {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        fail(where, f"{f} is not a finite number")
    return f


def as_str(v: Any, where: str, max_len: int = MAX_STR) -> str:
    if not isinstance(v, str):
        fail(where, f"expected a string, found {type(v).__name__}")
    if len(v) > max_len:
        fail(where, f"string of {len(v)} characters, more than the {max_len} allowed")
    if "\0" in v:  # no name, path or word the format holds can have one; os.open would raise
        fail(where, "contains a NUL character")
    return v


def as_opt_str(v: Any, where: str, max_len: int = MAX_STR) -> str | None:
    return None if v is None else as_str(v, where, max_len)


def as_bytes(v: Any, where: str, max_len: int = MAX_BLOB) -> bytes:
    if not isinstance(v, bytes):
        fail(where, f"expected bytes, found {type(v).__name__}")
    if len(v) > max_len:
        fail(where, f"{len(v)} bytes, more than the {max_len} allowed")
    return v


def as_bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        fail(where, f"expected true or false, found {type(v).__name__}")
    return v


def is_numpy(a: Any) -> bool:
    return type(a).__module__ == "numpy"


def as_u64_array(v: Any, where: str, small: bool | None = None) -> array[int] | np.ndarray:
    """A packed array of little-endian u64: a layer's column. An array('Q') when small, a numpy
    uint64 array when big, as ckpt/pageset.py holds page sets, so that a small layer is read
    without importing numpy (~70-130 ms, a third of a small restore). `small`: an array('Q') (a
    copy) if true, a read-only numpy view if false; by default the kind its length asks for."""
    b = as_bytes(v, where, max_len=1 << 40)
    if len(b) % 8:
        fail(where, f"array of {len(b)} bytes is not a whole number of u64 values")
    if small is None:
        small = len(b) // 8 <= pageset.small_max()
    if small:
        return pageset._u64(b)
    import numpy as np

    return np.frombuffer(b, dtype="<u8")


def _as_set(a: Any) -> pageset.PageSet:
    """`a` seen as a page set of its kind, unchecked (for pageset's checks of untrusted input)."""
    if is_numpy(a):
        return pageset.BigPages(a)
    return pageset.SmallPages(a if isinstance(a, array) else array("Q", a))


def check_ascending(a: array[int] | np.ndarray, where: str) -> None:
    i = pageset.first_unordered(_as_set(a))
    if i >= 0:
        fail(where, f"not sorted strictly ascending (entry {i}: 0x{int(a[i]):x} after 0x{int(a[i - 1]):x})")


def check_pages(a: array[int] | np.ndarray, where: str, page_size: int, limit: int) -> None:
    """Sorted, unique, page-aligned user addresses below `limit`."""
    if not len(a):
        return
    s = _as_set(a)
    i = pageset.first_unaligned(s, page_size)
    if i >= 0:
        fail(where, f"address 0x{int(a[i]):x} is not page-aligned")
    check_ascending(a, where)
    if int(a[-1]) >= limit:
        fail(where, f"address 0x{int(a[-1]):x} is not below 0x{limit:x}")


def first_common(q: array[int] | np.ndarray, a: array[int] | np.ndarray) -> int:
    """The index of the first entry of `q` that sorted `a` holds too, or -1."""
    if not len(q) or not len(a):
        return -1
    if is_numpy(q) or is_numpy(a):
        import numpy as np

        from ckpt.ranges import member

        both = member(np.asarray(q, dtype=np.uint64), np.asarray(a, dtype=np.uint64))
        return int(np.argmax(both)) if bool(both.any()) else -1
    s = set(a)
    return next((i for i, x in enumerate(q) if x in s), -1)


def first_outside(q: Any, spans: Sequence[tuple[int, int]]) -> int:
    """The index of the first entry of `q` in none of the sorted, disjoint [start, end) spans, or -1."""
    if not len(q):
        return -1
    if is_numpy(q):
        import numpy as np

        from ckpt.ranges import contains

        inside = contains(q, spans)
        return -1 if bool(inside.all()) else int(np.argmin(inside))
    starts = [s for s, _ in spans]
    for i, x in enumerate(q):
        if span_at(starts, spans, x) < 0:
            return i
    return -1


MAX_OPAQUE_DEPTH = 8
MAX_OPAQUE_ITEMS = 1 << 16


def check_opaque(v: Any, where: str) -> dict[str, Any]:
    """A free-form map (a tracker's state): string or integer keys, plain values, shallow, small.

    It is printed as JSON and packed again by merge; bytes keys or a 1000-level nesting would
    break both, and no tracker needs either."""
    todo: list[tuple[Any, str, int]] = [(as_map(v, where), where, 1)]
    items = 0
    while todo:
        x, w, depth = todo.pop()
        if depth > MAX_OPAQUE_DEPTH:
            fail(w, f"nested more than {MAX_OPAQUE_DEPTH} levels deep")
        if isinstance(x, dict):
            items += len(x)
            if items > MAX_OPAQUE_ITEMS:
                fail(where, f"more than {MAX_OPAQUE_ITEMS} entries")
            for k, sub in x.items():
                if isinstance(k, int) and not isinstance(k, bool):
                    key = str(as_int(k, f"{w} key", I64_MIN, I64_MAX))
                else:
                    key = as_str(k, f"{w} key", 256)
                todo.append((sub, f"{w}.{key}", depth + 1))
        elif isinstance(x, list):
            items += len(x)
            if items > MAX_OPAQUE_ITEMS:
                fail(where, f"more than {MAX_OPAQUE_ITEMS} entries")
            todo.extend((sub, f"{w}[{i}]", depth + 1) for i, sub in enumerate(x))
        elif isinstance(x, float):
            as_float(x, w)
        elif isinstance(x, int) and not isinstance(x, bool):
            as_int(x, w, I64_MIN, U64_MAX)
        elif not (x is None or isinstance(x, bool | str | bytes)):
            fail(w, f"unexpected {type(x).__name__}")
    return v
