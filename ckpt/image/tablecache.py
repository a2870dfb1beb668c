"""The merged page table of a chain, kept beside its top layer: `.ckpt-table.LAYER.table` (images/FORMAT.md).

An incremental dump needs its parent's merged view only as a table: each present page's digest (to
find dirty pages written with the same bytes) and the present set (to find pages that went away).
Built by a walk, that opens every layer of the chain and costs time that grows with its length
(~3.5 ms a layer at 64 MiB: 0.36 s at 100 layers). So each dump writes the table of the chain it
tops, which the next dump reads in one go and extends by its own layer, in O(its rows), whatever
the chain's length.

The file is derived and untrusted: a reader checks it against the layer it describes, whose
metadata records (`table`: `TableRef`) the sha256 of the file's body as its writer computed it, the
number of rows, the chain's length and its root. A file that is missing, of another layer (stale),
cut short, of any other size, or whose body's sha256 differs is not used: the walk is. The body ends
with the chain's layers under the top one, by name (version 2): a dump that starts from the file
checks that each is still there, so a layer deleted anywhere in the chain is noticed before a new
layer is put on a chain no restore can read (the walk then refuses, naming it). The sha256
(not xxh3, which is no defence against crafted input) makes a file that passes exactly what the
dump of that layer wrote, so a file written by someone else cannot make a dump or restore wrong; a
layer's own metadata is trusted as far as it always was. The rows are then checked for shape
(ascending page addresses inside the layer's dumped mappings, states, layers in range), which
keeps a hostile *layer* with a matching file from getting further than its own metadata would.

Rows: one per present page (data or zero) of the merged view, ascending; columns as PageTable's
(`layer` is the index in MergedView.layers: 0 is this layer). Absent pages are not listed: they
read as unlisted ones do (PageTable's docstring), so a walk's table and this one agree on every
page, and they are equal once the walk's absent rows are dropped (`present_rows`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import stat
import struct
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt import pageset
from ckpt.image.chain import STATE_ABSENT, STATE_DATA, STATE_ZERO, PageTable
from ckpt.image.format import (
    ADDR_LIMIT,
    MAX_TABLE_ROWS,
    PAGE_SIZE,
    PATH_STR,
    ZERO_PAGE_DIGEST,
    LayerMeta,
    TableRef,
)
from ckpt.image.validate import is_numpy

if TYPE_CHECKING:
    import numpy as np

    from ckpt.image.reader import Layer

# Beside .ckpt-lock and .ckpt-armed: hidden, and named so that neither `layer-*` nor `*.ckpt` (which
# pathlib's glob matches on hidden files too) meets it.
PREFIX = ".ckpt-table."
SUFFIX = ".table"
MAGIC = b"CKPTTABL"
VERSION = 2  # 2: the body ends with the chain's layer names (version 1 files are not read: the walk)
# magic, version, flags (0), the layer's digest (16 bytes), rows, body length
_HEADER = struct.Struct("<8sII16sQQ")
HEADER_SIZE = _HEADER.size  # 48
# per row: addr u64, digest u64, index i64, layer u16, state u8 (column after column)
ROW_BYTES = 8 + 8 + 8 + 2 + 1
MAX_LAYER = (1 << 16) - 1
# A name in the chain list, in bytes: a layer's path as a parent reference may hold it (PATH_STR
# characters, each up to 4 bytes of UTF-8).
MAX_NAME_BYTES = 4 * PATH_STR
_LITTLE = sys.byteorder == "little"


class TableRefused(Exception):
    """The table file cannot be used (missing, stale, corrupt): why, for tests and --debug."""


def table_path(layer: Path) -> Path:
    return layer.with_name(PREFIX + layer.name + SUFFIX)


@dataclass
class Loaded:
    table: PageTable
    ref: TableRef
    root: Path  # the chain's bottom layer
    # The chain's layers under this one, its parent first, as recorded (relative to this layer's
    # directory, or absolute): ref.layers - 1 of them, the last being ref.root.
    names: list[str]


def dumped_spans(meta: LayerMeta) -> tuple[list[tuple[int, int]], list[bool]]:
    dumped = [v for v in meta.vmas if v.dumped]
    return [(v.start, v.end) for v in dumped], [v.anonymous for v in dumped]


def root_of(layer_path: Path, ref: TableRef) -> Path:
    r = Path(ref.root)
    return r if r.is_absolute() else layer_path.parent / r


# -- the next table: a layer laid over its parent's -----------------------------------------------
def present_rows(t: PageTable) -> PageTable:
    """`t` without its absent rows (a walk lists the absent pages some layer names)."""
    if t.small:
        keep = [i for i, s in enumerate(t.state) if s != STATE_ABSENT]
        if len(keep) == len(t.state):
            return t
        return PageTable(
            array("Q", [t.addr[i] for i in keep]),
            array("B", [t.state[i] for i in keep]),
            array("i", [t.layer[i] for i in keep]),
            array("q", [t.index[i] for i in keep]),
            array("Q", [t.digest[i] for i in keep]),
            t.spans,
            t.anon,
        )
    m = t.state != STATE_ABSENT
    if bool(m.all()):
        return t
    return PageTable(t.addr[m], t.state[m], t.layer[m], t.index[m], t.digest[m], t.spans, t.anon)


def next_table(parent: PageTable | None, meta: LayerMeta) -> PageTable:
    """The present rows of the merged view of a layer with metadata `meta` (its page index filled
    in) over a chain whose table is `parent` (None: the layer has no parent). The walk's rule
    (chain.py) for a page of the layer's dumped mappings: the layer's own data or zero entry; else
    absent if the layer names it absent, holds it in a fresh range, or has no parent; else the
    parent's row, one layer further down. Pages outside its dumped mappings have no row."""
    spans, anon = dumped_spans(meta)
    pg = meta.pages
    n_new = len(pg.data) + len(pg.zero)
    n_par = 0 if parent is None else len(parent)
    if (parent is None or parent.small) and n_new + n_par <= pageset.small_max() and not is_numpy(pg.data):
        return _next_small(parent, meta, spans, anon)
    return _next_np(parent, meta, spans, anon)


def _next_small(
    parent: PageTable | None, meta: LayerMeta, spans: list[tuple[int, int]], anon: list[bool]
) -> PageTable:
    pg = meta.pages
    starts = [s for s, _ in spans]

    def dumped(x: int) -> bool:
        i = bisect.bisect_right(starts, x) - 1
        return i >= 0 and x < spans[i][1]

    rows: dict[int, tuple[int, int, int, int]] = {}  # addr -> (state, layer, index, digest)
    if parent is not None:
        fresh = [(int(s), int(e)) for s, e in pg.fresh]
        fstarts = [s for s, _ in fresh]
        named = set(pg.absent)
        cols = (parent.addr, parent.state, parent.layer, parent.index, parent.digest)
        for a, s, k, i, d in zip(*cols, strict=True):
            if s == STATE_ABSENT or a in named or not dumped(a):
                continue
            j = bisect.bisect_right(fstarts, a) - 1
            if j >= 0 and a < fresh[j][1]:
                continue
            rows[a] = (s, k + 1, i, d)
    for i, (a, d) in enumerate(zip(pg.data, pg.digests, strict=True)):
        rows[int(a)] = (STATE_DATA, 0, i, int(d))
    for a in pg.zero:
        if dumped(a):
            rows[int(a)] = (STATE_ZERO, 0, -1, ZERO_PAGE_DIGEST)
    addr = array("Q", sorted(rows))
    state, layer, index, digest = array("B"), array("i"), array("q"), array("Q")
    for a in addr:
        s, k, i, d = rows[a]
        state.append(s)
        layer.append(k)
        index.append(i)
        digest.append(d)
    return PageTable(addr, state, layer, index, digest, spans, anon)


def _next_np(
    parent: PageTable | None, meta: LayerMeta, spans: list[tuple[int, int]], anon: list[bool]
) -> PageTable:
    import numpy as np

    from ckpt import ranges

    pg = meta.pages
    data = np.asarray(pg.data, dtype=np.uint64)
    zero = np.asarray(pg.zero, dtype=np.uint64)
    zero = zero[ranges.contains(zero, spans)]
    parts_a = [data, zero]
    parts_s = [np.full(len(data), STATE_DATA, np.uint8), np.full(len(zero), STATE_ZERO, np.uint8)]
    parts_k = [np.zeros(len(data) + len(zero), np.int32)]
    parts_i = [np.arange(len(data), dtype=np.int64), np.full(len(zero), -1, np.int64)]
    parts_d = [np.asarray(pg.digests, dtype=np.uint64), np.full(len(zero), ZERO_PAGE_DIGEST, np.uint64)]
    if parent is not None and len(parent):
        p = parent.numpy()
        a = p.addr
        keep = (p.state != STATE_ABSENT) & ranges.contains(a, spans)
        fresh = [(int(s), int(e)) for s, e in pg.fresh]
        if fresh:
            keep &= ~ranges.contains(a, fresh)
        for named in (data, np.asarray(pg.zero, dtype=np.uint64), np.asarray(pg.absent, dtype=np.uint64)):
            if len(named):
                keep &= ~ranges.member(a, named)
        parts_a.append(a[keep])
        parts_s.append(p.state[keep])
        parts_k.append(p.layer[keep].astype(np.int32) + 1)
        parts_i.append(p.index[keep].astype(np.int64))
        parts_d.append(p.digest[keep])
    addr = np.concatenate(parts_a)
    order = np.argsort(addr, kind="stable")
    return PageTable(
        addr[order],
        np.concatenate(parts_s)[order],
        np.concatenate(parts_k)[order],
        np.concatenate(parts_i)[order],
        np.concatenate(parts_d)[order],
        np.array(spans, dtype=np.uint64).reshape(-1, 2),
        np.array(anon, dtype=bool),
    )


# -- the file ---------------------------------------------------------------------------------------
def _col(a: Any, typecode: str, dtype: str) -> bytes:
    if is_numpy(a):
        import numpy as np

        return np.ascontiguousarray(a, dtype=dtype).tobytes()
    out = a if isinstance(a, array) and a.typecode == typecode else array(typecode, a)
    if not _LITTLE:
        out = array(typecode, out)
        out.byteswap()
    return out.tobytes()


def encode(t: PageTable, names: list[str]) -> bytes:
    """The body of a table file: its columns one after the other, then the names of the chain's
    layers under the top one (its parent first), each ended by a NUL."""
    if len(t) and int(t.layer.max() if is_numpy(t.layer) else max(t.layer)) > MAX_LAYER:
        raise ValueError(f"a chain of more than {MAX_LAYER + 1} layers")
    return b"".join(
        (
            _col(t.addr, "Q", "<u8"),
            _col(t.digest, "Q", "<u8"),
            _col(t.index, "q", "<i8"),
            _col(t.layer, "H", "<u2"),
            _col(t.state, "B", "u1"),
            b"".join(os.fsencode(n) + b"\0" for n in names),
        )
    )


def _sha256(b: bytes | memoryview) -> str:
    import hashlib  # (here: a small dump's start does without OpenSSL's module)

    return hashlib.sha256(b).hexdigest()


def table_ref(body: bytes, rows: int, layers: int, root: str) -> TableRef:
    return TableRef(_sha256(body), rows, layers, root)


def write(layer: Path, digest: str, body: bytes, rows: int) -> bool:
    """Write .ckpt-table.LAYER.table (0600) for the layer of digest `digest`: a temp file renamed over any old
    one. A cache: a failure leaves no file (the next dump walks) and is no failure of the dump."""
    final = table_path(layer)
    tmp = layer.with_name(f"{final.name}.tmp.{os.getpid()}")
    head = _HEADER.pack(MAGIC, VERSION, 0, bytes.fromhex(digest), rows, len(body))
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(head + body)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, final)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False


def remove(layer: Path) -> None:
    """Drop a layer's table file (its child's replaces it: one per chain is kept)."""
    with contextlib.suppress(OSError):
        os.unlink(table_path(layer))


_ASK_MEMORY_ABOVE = 64 << 20  # (a table of 64 MiB: a ~9 GiB process; below it nothing is read)


def _mem_available() -> int:
    """MemAvailable in bytes (0 when unreadable: the table is refused, the walk runs)."""
    from ckpt.proc.meminfo import available

    return available() or 0


def _read_all(layer: Layer, ref: TableRef) -> bytearray:
    p = table_path(layer.path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise TableRefused(f"{p}: missing") from None
    except OSError as e:
        raise TableRefused(f"{p}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TableRefused(f"{p}: not a regular file")
        # (Before any allocation: the size is bounded by the layer's record, not by the file's word.)
        least = HEADER_SIZE + ref.rows * ROW_BYTES + 2 * (ref.layers - 1)
        most = HEADER_SIZE + ref.rows * ROW_BYTES + (MAX_NAME_BYTES + 1) * (ref.layers - 1)
        want = st.st_size
        if not least <= want <= most:
            raise TableRefused(f"{p}: {want} bytes, the layer's table has {least} to {most}")
        # The layer's row count is bounded by the format (MAX_TABLE_ROWS), not by anything real: a
        # crafted layer beside a sparse file of its size would have this allocate up to ~1.8 TB. A
        # table larger than the memory available is refused (the walk decides about such a layer).
        if want > _ASK_MEMORY_ABOVE and want > _mem_available():
            raise TableRefused(f"{p}: {want} bytes, more than the memory available")
        try:
            buf = bytearray(want)
        except MemoryError:
            raise TableRefused(f"{p}: {want} bytes, more than can be allocated") from None
        got = 0
        mv = memoryview(buf)
        while got < want:
            n = os.preadv(fd, [mv[got:]], got)
            if not n:
                raise TableRefused(f"{p}: cut short")
            got += n
        return buf  # (writable: the columns are views of it, and a restore's plan may mark rows)
    except OSError as e:
        raise TableRefused(f"{p}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def read(layer: Layer, *, small: bool = False) -> Loaded:
    """The table file of `layer`, checked against the layer; TableRefused saying why not.
    `small`: array.array columns (no numpy) when it has at most pageset.small_max() rows."""
    ref = layer.meta.table
    if ref is None:
        raise TableRefused(f"{layer.path}: records no table (an older ckpt, or a migration's layer)")
    raw = _read_all(layer, ref)
    magic, version, flags, digest, rows, blen = _HEADER.unpack_from(raw)
    where = table_path(layer.path)
    if magic != MAGIC or version != VERSION or flags:
        raise TableRefused(f"{where}: not a table file of version {VERSION}")
    if digest.hex() != layer.digest:
        raise TableRefused(f"{where}: of another layer (stale)")
    if rows != ref.rows or blen != len(raw) - HEADER_SIZE:
        raise TableRefused(f"{where}: {rows} rows, the layer's table has {ref.rows}")
    body = memoryview(raw)[HEADER_SIZE:]
    if _sha256(body) != ref.sha256:
        raise TableRefused(f"{where}: corrupt (its sha256 is not the one the layer recorded)")
    names = _names(body[rows * ROW_BYTES :], ref, where)
    spans, anon = dumped_spans(layer.meta)
    n = rows
    o = [0, 8 * n, 16 * n, 24 * n, 26 * n, 27 * n]
    if small and n <= pageset.small_max():
        t = _small_columns(body, o, spans, anon)
    else:
        t = _np_columns(body, o, spans, anon)
    _check_shape(t, ref, where)
    return Loaded(t, ref, root_of(layer.path, ref), names)


def _names(tail: memoryview, ref: TableRef, where: Path) -> list[str]:
    """The chain list: ref.layers - 1 names, each ended by a NUL, the last the record's root."""
    raw = bytes(tail)
    if ref.layers == 1:
        if raw:
            raise TableRefused(f"{where}: names layers under a layer that has no parent")
        return []
    if not raw.endswith(b"\0"):
        raise TableRefused(f"{where}: its chain list is cut short")
    names = [os.fsdecode(b) for b in raw[:-1].split(b"\0")]
    if len(names) != ref.layers - 1 or names[-1] != ref.root:
        raise TableRefused(f"{where}: its chain list is not of the layer's chain")
    if any(not n or len(n) > PATH_STR for n in names):
        raise TableRefused(f"{where}: a malformed name in its chain list")
    return names


def _small_columns(
    body: memoryview, o: list[int], spans: list[tuple[int, int]], anon: list[bool]
) -> PageTable:
    def col(tc: str, lo: int, hi: int) -> array[int]:
        a = array(tc)
        a.frombytes(body[lo:hi])
        if not _LITTLE:
            a.byteswap()
        return a

    layer16 = col("H", o[3], o[4])
    return PageTable(
        col("Q", o[0], o[1]),
        col("B", o[4], o[5]),
        array("i", layer16),
        col("q", o[2], o[3]),
        col("Q", o[1], o[2]),
        spans,
        anon,
    )


def _np_columns(body: memoryview, o: list[int], spans: list[tuple[int, int]], anon: list[bool]) -> PageTable:
    import numpy as np

    def col(dt: str, lo: int, hi: int) -> np.ndarray:
        a = np.frombuffer(body[lo:hi], dtype=dt)
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))

    return PageTable(
        col("<u8", o[0], o[1]),
        col("u1", o[4], o[5]),
        col("<u2", o[3], o[4]).astype(np.int32),
        col("<i8", o[2], o[3]),
        col("<u8", o[1], o[2]),
        np.array(spans, dtype=np.uint64).reshape(-1, 2),
        np.array(anon, dtype=bool),
    )


def _check_shape(t: PageTable, ref: TableRef, where: Path) -> None:
    """What any table of a chain of ref.layers layers over these mappings holds: ascending page
    addresses inside the dumped mappings, data or zero states, layers of the chain, data indexes
    (checked against each layer's data pages by whoever reads them) and zero rows' digests."""
    if t.small:
        addr, spans = t.addr, t.spans
        starts = [s for s, _ in spans]
        prev = -1
        for a, s, k, i, d in zip(addr, t.state, t.layer, t.index, t.digest, strict=True):
            j = bisect.bisect_right(starts, a) - 1
            bad = (
                a <= prev
                or a % PAGE_SIZE
                or j < 0
                or a >= spans[j][1]
                or k >= ref.layers
                or (s == STATE_DATA and i < 0)
                or (s == STATE_ZERO and (i != -1 or d != ZERO_PAGE_DIGEST))
                or s not in (STATE_DATA, STATE_ZERO)
            )
            if bad:
                raise TableRefused(f"{where}: malformed row for 0x{a:x}")
            prev = a
        return
    import numpy as np

    a = t.addr
    # Ascending, so every row lies in a span exactly when the rows the spans hold add up to all.
    inside = np.searchsorted(a, t.spans.reshape(-1)).reshape(-1, 2) if len(t.spans) else np.zeros((0, 2))
    ok = (
        bool(np.all(a[1:] > a[:-1]))
        and not bool(np.any(a & np.uint64(PAGE_SIZE - 1)))
        and (not len(a) or int(a[-1]) < ADDR_LIMIT)
        and int((inside[:, 1] - inside[:, 0]).sum()) == len(a)
        and bool(np.all(t.layer < ref.layers))
    )
    is_data, is_zero = t.state == STATE_DATA, t.state == STATE_ZERO
    ok = (
        ok
        and bool(np.all(is_data | is_zero))
        and bool(np.all(t.index[is_data] >= 0))
        and bool(np.all(t.index[is_zero] == -1))
        and bool(np.all(t.digest[is_zero] == np.uint64(ZERO_PAGE_DIGEST)))
    )
    if not ok:
        raise TableRefused(f"{where}: malformed rows")


def load(layer: Layer, *, small: bool = False) -> Loaded | None:
    """read(), or None where the table file cannot be used (the caller walks the chain)."""
    try:
        return read(layer, small=small)
    except TableRefused:
        return None


__all__ = [
    "MAX_TABLE_ROWS",
    "PREFIX",
    "SUFFIX",
    "Loaded",
    "TableRefused",
    "encode",
    "load",
    "next_table",
    "present_rows",
    "read",
    "remove",
    "table_path",
    "table_ref",
    "write",
]
