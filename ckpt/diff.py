"""`ckpt diff`: what differs between the merged views of two layers.

Pages are compared by the per-page digests of the two page tables (MergedView.page_table()), with
numpy set operations: nothing is decompressed unless `content` asks for one page's bytes. A page in
both views whose digest (or kind: data/zero versus a file page left in the file) differs is
*changed*; a page only in B is *added*, only in A *removed*; a page whose address is mapped in the
other view but was not dumped there (unreadable, skipped) cannot be compared and is *uncompared*.

*Dirty but unchanged* pages are those a tracker reported written between A and B (any page a layer
between them stores, zeroes or lists as `unchanged`) whose bytes are equal in both views: a write of
the same bytes, or a write undone by a later one. They are what soft-dirty and uffd-wp really
report, as opposed to what changed.

Mappings are compared as records: pieces of the same mapping (same anonymous name, or same file at
the same file offset per address) that overlap are grouped, and a group is grown, shrunk, resized or
re-protected; a mapping only in A and one only in B that look alike (same file and offset; for
anonymous memory the same page digests) are one mapping *moved* (mremap). See docs/diff.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from ckpt.errors import ChainError, CkptError, CorruptLayer, LayerError, NotMapped
from ckpt.image import STATE_ABSENT, ZERO_PAGE_DIGEST, FileId, Layer, MergedView, PageTable, VmaRecord
from ckpt.image.format import PAGE_SIZE, page_digests
from ckpt.image.reader import open_regular
from ckpt.ranges import PageRuns, contains, member, npages, pages_of, runs, unique
from ckpt.ranges import intersect as _intersect
from ckpt.ranges import merge as _merge_ranges
from ckpt.ranges import subtract as _subtract

Range = tuple[int, int]
_PAGE = np.uint64(PAGE_SIZE)
_EMPTY = np.zeros(0, dtype=np.uint64)
# Odd multiplier spreading a file page number over 64 bits (Knuth's golden ratio constant).
_MIX = np.uint64(0x9E3779B97F4A7C15)
_ROW = 16  # bytes per line of the hex diff
_CONTEXT = 1  # unchanged lines shown around a differing one


# -- records ----------------------------------------------------------------------------------------
@dataclass
class MappingDiff:
    """One mapping (or group of pieces of one mapping) that differs between A and B.

    `changes` holds any of: added, removed, moved, grown, shrunk, resized, reprotected. Page counts
    are per address (a moved mapping's pages are removed at the old place and added at the new one);
    `moved_pages_changed` compares a moved mapping's pages with those at its old place.
    """

    path: str
    a: list[tuple[int, int, str]]  # the pieces in A: (start, end, perms)
    b: list[tuple[int, int, str]]
    changes: list[str] = field(default_factory=list)
    grown: list[Range] = field(default_factory=list)  # address ranges mapped only in B
    shrunk: list[Range] = field(default_factory=list)  # address ranges mapped only in A
    # (start, end, perms in A, perms in B) where the protection differs
    reprotected: list[tuple[int, int, str, str]] = field(default_factory=list)
    moved_pages_changed: int | None = None
    changed: np.ndarray = field(default_factory=lambda: _EMPTY)  # page addresses
    # whole mappings' worth of pages: held as runs, so that a TiB mapping added costs one row
    added: PageRuns = field(default_factory=PageRuns)
    removed: PageRuns = field(default_factory=PageRuns)
    uncompared: PageRuns = field(default_factory=PageRuns)

    @property
    def span(self) -> Range:
        """The range shown for the mapping: B's if it exists there, else A's."""
        side = self.b or self.a
        return side[0][0], side[-1][1]

    @property
    def perms(self) -> str:
        side = self.b or self.a
        return side[0][2]

    @property
    def bytes(self) -> int:
        return (len(self.changed) + len(self.added) + len(self.removed)) * PAGE_SIZE

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "start": self.span[0],
            "end": self.span[1],
            "a": [list(p) for p in self.a],
            "b": [list(p) for p in self.b],
            "changes": list(self.changes),
            "grown": [list(r) for r in self.grown],
            "shrunk": [list(r) for r in self.shrunk],
            "reprotected": [list(r) for r in self.reprotected],
            "moved_pages_changed": self.moved_pages_changed,
            "pages_changed": len(self.changed),
            "pages_added": len(self.added),
            "pages_removed": len(self.removed),
            "pages_uncompared": len(self.uncompared),
            "bytes": self.bytes,
            "changed_ranges": ranges(self.changed),
            "added_ranges": ranges(self.added),
            "removed_ranges": ranges(self.removed),
            "uncompared_ranges": ranges(self.uncompared),
        }


@dataclass
class ThreadDiff:
    tid: int
    status: str  # added | removed | changed
    registers: list[str] = field(default_factory=list)  # general registers whose values differ
    xsave: bool = False  # FP/vector state differs
    sigmask: bool = False
    state: tuple[str, str] | None = None  # (A, B) when the scheduler state differs

    def to_dict(self) -> dict[str, Any]:
        return {
            "tid": self.tid,
            "status": self.status,
            "registers": self.registers,
            "xsave": self.xsave,
            "sigmask": self.sigmask,
            "state": None if self.state is None else list(self.state),
        }


@dataclass
class FdDiff:
    fd: int
    status: str  # opened | closed | changed | moved (the same open file under another number)
    fields: list[str] = field(default_factory=list)  # for changed: which of the record's fields differ
    path: str = ""
    moved_to: int | None = None
    a: dict[str, Any] | None = None
    b: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fd": self.fd,
            "status": self.status,
            "fields": self.fields,
            "path": self.path,
            "moved_to": self.moved_to,
            "a": self.a,
            "b": self.b,
        }


@dataclass
class ContentDiff:
    """The page at `addr` in both views, and which 16-byte lines to show (differing ones plus context)."""

    addr: int
    a_state: str | None  # data | zero | absent, or None when not mapped (or not dumped) in A
    b_state: str | None
    a_error: str | None
    b_error: str | None
    a_bytes: bytes | None
    b_bytes: bytes | None
    bytes_differ: int | None  # None when one side has no bytes
    lines: list[int] = field(default_factory=list)  # offsets of the lines shown, ascending

    def line_diff(self, off: int) -> list[int]:
        """Offsets within the line at `off` of the bytes that differ."""
        if self.a_bytes is None or self.b_bytes is None:
            return []
        return [i for i in range(_ROW) if self.a_bytes[off + i] != self.b_bytes[off + i]]

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for off in self.lines:
            rows.append({
                "offset": off,
                "a": None if self.a_bytes is None else self.a_bytes[off : off + _ROW].hex(),
                "b": None if self.b_bytes is None else self.b_bytes[off : off + _ROW].hex(),
                "differ": self.line_diff(off),
            })  # fmt: skip
        return {
            "addr": self.addr,
            "a_state": self.a_state,
            "b_state": self.b_state,
            "a_error": self.a_error,
            "b_error": self.b_error,
            "bytes_differ": self.bytes_differ,
            "lines": rows,
        }


@dataclass
class DiffResult:
    a: str
    b: str
    a_digest: str
    b_digest: str
    relation: str  # same | ancestor (A is below B in B's chain) | descendant | siblings | unrelated
    same_process: bool
    dirty_layers: int  # layers whose written pages make up the dirty set
    changed: np.ndarray  # page addresses, ascending
    added: PageRuns
    removed: PageRuns
    uncompared: PageRuns
    dirty_unchanged: np.ndarray
    pages_compared: int  # pages in both views
    mappings: list[MappingDiff] = field(default_factory=list)
    threads: list[ThreadDiff] = field(default_factory=list)
    fds: list[FdDiff] = field(default_factory=list)
    mm: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    sigactions: list[int] = field(default_factory=list)  # signals whose action differs
    content: ContentDiff | None = None
    elapsed_ms: float = 0.0

    @property
    def empty(self) -> bool:
        """No difference at all (dirty-but-unchanged pages are not a difference)."""
        return not (
            len(self.changed)
            or len(self.added)
            or len(self.removed)
            or len(self.uncompared)
            or self.mappings
            or self.threads
            or self.fds
            or self.mm
            or self.sigactions
        )

    def summary(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for m in self.mappings:
            for c in m.changes:
                kinds[c] = kinds.get(c, 0) + 1
        return {
            "pages_compared": self.pages_compared,
            "pages_changed": len(self.changed),
            "pages_added": len(self.added),
            "pages_removed": len(self.removed),
            "pages_uncompared": len(self.uncompared),
            "pages_dirty_unchanged": len(self.dirty_unchanged),
            "bytes_changed": len(self.changed) * PAGE_SIZE,
            "bytes_added": len(self.added) * PAGE_SIZE,
            "bytes_removed": len(self.removed) * PAGE_SIZE,
            "mappings_differing": len(self.mappings),
            **{f"mappings_{k}": v for k, v in sorted(kinds.items())},
            "threads_differing": len(self.threads),
            "fds_differing": len(self.fds),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "a_digest": self.a_digest,
            "b_digest": self.b_digest,
            "relation": self.relation,
            "same_process": self.same_process,
            "dirty_layers": self.dirty_layers,
            "empty": self.empty,
            "summary": self.summary(),
            "changed_ranges": ranges(self.changed),
            "dirty_unchanged_ranges": ranges(self.dirty_unchanged),
            "added_ranges": ranges(self.added),
            "removed_ranges": ranges(self.removed),
            "uncompared_ranges": ranges(self.uncompared),
            "mappings": [m.to_dict() for m in self.mappings],
            "threads": [t.to_dict() for t in self.threads],
            "fds": [f.to_dict() for f in self.fds],
            "mm": {k: list(v) for k, v in self.mm.items()},
            "sigactions": self.sigactions,
            "content": None if self.content is None else self.content.to_dict(),
            "elapsed_ms": self.elapsed_ms,
        }


# -- page sets --------------------------------------------------------------------------------------
def ranges(pages: np.ndarray | PageRuns) -> list[list[int]]:
    """Sorted page addresses as JSON-ready [start, end) pairs."""
    out: list[list[int]] = runs(pages).tolist()
    return out


def _file_key(v: VmaRecord) -> int:
    """A number naming the file a mapping shows (and its state at dump time), for absent file pages."""
    f = v.file
    ident = f"{v.dev}\0{v.inode}\0{v.path}\0" + ("" if f is None else f"{f.size}\0{f.mtime_ns}")
    return xxhash.xxh3_64_intdigest(ident.encode("utf-8", "surrogateescape"))


def _file_keys(view: MergedView, addr: np.ndarray) -> np.ndarray:
    """Comparison keys of file pages left in their file (addresses in the view's dumped mappings)."""
    dumped = [v for v in view.vmas if v.dumped]
    starts = np.array([v.start for v in dumped], dtype=np.uint64)
    base = np.array([v.offset - v.start for v in dumped], dtype=np.int64)
    fkey = np.array([_file_key(v) for v in dumped], dtype=np.uint64)
    vi = np.searchsorted(starts, addr, side="right") - 1
    file_page = ((addr.astype(np.int64) + base[vi]) // PAGE_SIZE).astype(np.uint64)
    out: np.ndarray = fkey[vi] ^ (file_page * _MIX)
    return out


def _keys(view: MergedView, pt: PageTable) -> tuple[np.ndarray, np.ndarray]:
    """Per listed page: a comparison key and whether the page is a file page left in the file.

    The table gives absent file pages digest 0 whatever the file; their key here is instead derived
    from the file and the page's offset in it, so two such pages compare equal only when they show the
    same page of the same file.
    """
    key = pt.digest.copy()
    file_absent = (pt.state == STATE_ABSENT) & (pt.digest == 0)
    idx = np.flatnonzero(file_absent)
    if len(idx):
        key[idx] = _file_keys(view, pt.addr[idx])
    return key, file_absent


@dataclass
class _Side:
    """One view's page table with its comparison keys."""

    view: MergedView
    pt: PageTable
    key: np.ndarray  # per listed row
    file_absent: np.ndarray  # per listed row

    def spans(self) -> list[Range]:
        return [(int(a), int(b)) for a, b in self.pt.spans]

    def key_at(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(key, file page left in its file) of any pages of the dumped mappings, listed or not: an
        unlisted page is absent, so zeros if anonymous, else its file's page."""
        row, key = self.pt.lookup(q)
        fa = np.zeros(len(q), dtype=bool)
        listed = row >= 0
        key[listed] = self.key[row[listed]]
        fa[listed] = self.file_absent[row[listed]]
        unl_file = np.flatnonzero(~listed & (key == 0))
        if len(unl_file):
            key[unl_file] = _file_keys(self.view, q[unl_file])
            fa[unl_file] = True
        return key, fa


def _vma_ranges(vmas: Sequence[VmaRecord]) -> tuple[np.ndarray, np.ndarray]:
    starts = np.array([v.start for v in vmas], dtype=np.uint64)
    return starts, np.array([v.end for v in vmas], dtype=np.uint64)


@dataclass
class _Pages:
    changed: np.ndarray
    added: PageRuns
    removed: PageRuns
    uncompared: PageRuns
    both: list[Range]  # where both views have dumped mappings: every page there is compared
    compared: int


def _file_page_digests(view: MergedView, addrs: np.ndarray) -> np.ndarray:
    """xxh3 of pages the view leaves in their files (sorted `addrs`), read from the files now; 0 where
    the file is gone, unreadable or no longer the one recorded at dump time."""
    out = np.zeros(len(addrs), dtype=np.uint64)
    dumped = [v for v in view.vmas if v.dumped]
    starts, _ = _vma_ranges(dumped)
    vi = np.searchsorted(starts, addrs, side="right") - 1
    for k in unique(vi):  # one open per mapping, one read per run of pages
        v = dumped[int(k)]
        sel = np.flatnonzero(vi == k)
        if v.file is None:
            continue
        try:
            # Never a FIFO or device (a hostile layer may name one with its recorded identity).
            fd, st = open_regular(v.path, nofollow=True)
        except (OSError, ValueError):
            continue
        try:
            if FileId.of(st) != v.file:
                continue
            pos = 0
            for s, e in runs(addrs[sel]).tolist():
                n = (e - s) // PAGE_SIZE
                # Past the end of the file a mapping reads as zeros.
                buf = os.pread(fd, e - s, v.offset + s - v.start).ljust(e - s, b"\0")
                out[sel[pos : pos + n]] = page_digests(buf)
                pos += n
        except (OSError, OverflowError):
            continue
        finally:
            os.close(fd)
    return out


def _unlisted_differ(a: MergedView, b: MergedView, both: list[Range]) -> list[Range]:
    """Where both views hold dumped mappings whose absent pages read differently (anonymous on one
    side, a file on the other, or another file or offset): there even pages neither table lists must
    be compared. Elsewhere an unlisted page reads the same on both sides (zeros, or the same page of
    the same file), so a reservation of any size costs nothing."""
    xs = [v for v in a.vmas if v.dumped]
    ys = [v for v in b.vmas if v.dumped]
    out: list[Range] = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        x, y = xs[i], ys[j]
        lo, hi = max(x.start, y.start), min(x.end, y.end)
        if lo < hi:
            same = (x.anonymous and y.anonymous) or (
                not x.anonymous
                and not y.anonymous
                and _file_key(x) == _file_key(y)
                and x.offset - x.start == y.offset - y.start
            )
            if not same:
                out.append((lo, hi))
        if x.end <= y.end:
            i += 1
        else:
            j += 1
    return _intersect(out, both)


def _compare_pages(a: MergedView, sa: _Side, b: MergedView, sb: _Side) -> _Pages:
    da, db = sa.spans(), sb.spans()
    both = _intersect(da, db)
    # The pages to look at: those either table lists, where both views have them, and the unlisted
    # pages of mappings whose absent pages differ in kind. Everything else is absent on both sides
    # and reads the same.
    common = np.union1d(sa.pt.addr, sb.pt.addr)
    common = common[contains(common, both)]
    odd = _unlisted_differ(a, b, both)
    if odd:
        common = np.union1d(common, pages_of(odd))
    ca, fa = sa.key_at(common)
    cb, fb = sb.key_at(common)
    differ = ca != cb
    # A page left in its file on one side and stored on the other (faulted in, or evicted, between
    # the dumps) is changed only if the file's bytes differ: those pages (few) are read from the file.
    for mine, theirs, view in ((fa & ~fb, cb, a), (fb & ~fa, ca, b)):
        idx = np.flatnonzero(differ & mine)
        if len(idx):
            differ[idx] = _file_page_digests(view, common[idx]) != theirs[idx]
    # An address mapped on the other side but not dumped there (unreadable, skipped) has no bytes
    # to compare with: neither added nor removed. These are whole mappings: kept as runs.
    only_a, only_b = _subtract(da, db), _subtract(db, da)
    ma = _merge_ranges([(v.start, v.end) for v in a.vmas])
    mb = _merge_ranges([(v.start, v.end) for v in b.vmas])
    return _Pages(
        changed=common[differ],
        added=PageRuns(_subtract(only_b, ma)),
        removed=PageRuns(_subtract(only_a, mb)),
        uncompared=PageRuns(_intersect(only_a, mb) + _intersect(only_b, ma)),
        both=both,
        compared=npages(both),
    )


# -- chains -----------------------------------------------------------------------------------------
def _relation(a: MergedView, b: MergedView) -> tuple[str, list[Layer]]:
    """How the two chains relate, and the layers written between them (above the common ancestor)."""
    da = [layer.digest for layer in a.layers]
    db = [layer.digest for layer in b.layers]
    if da[0] == db[0]:
        return "same", []
    if da[0] in db:
        return "ancestor", b.layers[: db.index(da[0])]
    if db[0] in da:
        return "descendant", a.layers[: da.index(db[0])]
    sb = set(db)
    for i, d in enumerate(da):
        if d in sb:
            return "siblings", a.layers[:i] + b.layers[: db.index(d)]
    return "unrelated", []


def _dirty(layers: list[Layer]) -> np.ndarray:
    """Pages the layers' trackers reported written: stored, zero, or left as unchanged."""
    parts = [arr for layer in layers for arr in (layer.pages.data, layer.pages.zero, layer.pages.unchanged)]
    parts = [p for p in parts if len(p)]
    if not parts:
        return _EMPTY
    return unique(np.concatenate(parts))


def _check_same_process(a: MergedView, b: MergedView) -> bool:
    ia, ib = a.top.inventory, b.top.inventory
    return (ia.pid, ia.start_time, ia.boot_id) == (ib.pid, ib.start_time, ib.boot_id)


# -- mappings ---------------------------------------------------------------------------------------
def _ident(v: VmaRecord) -> tuple[Any, ...]:
    """What makes two mapping records pieces of one mapping, apart from the address."""
    if v.anonymous:
        return ("anon", v.path, v.dev if v.inode else "", v.inode, v.perms[3])
    return ("file", v.dev, v.inode, v.path, v.perms[3])


def _same_mapping(x: VmaRecord, y: VmaRecord) -> bool:
    """Overlapping records that are one mapping: same identity, and for a file the same file offset
    at each address (a file mapped twice at different offsets is two mappings)."""
    if _ident(x) != _ident(y):
        return False
    return x.anonymous or x.offset - x.start == y.offset - y.start


class _Union:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, x: int, y: int) -> None:
        self.parent[self.find(x)] = self.find(y)


def _moved_pages(x: list[VmaRecord], y: list[VmaRecord], sa: _Side, sb: _Side) -> tuple[int, int, int]:
    """Pages at the same offset in both groups: (compared, differing, non-zero among the equal)."""
    x0, y0 = x[0].start, y[0].start
    # Offsets (from each group's start) where both sides have a dumped page.
    ox = [(s - x0, e - x0) for s, e in _intersect(sa.spans(), [(x0, x[-1].end)])]
    oy = [(s - y0, e - y0) for s, e in _intersect(sb.spans(), [(y0, y[-1].end)])]
    both = _intersect(ox, oy)
    # Only offsets some table lists can differ or be non-zero: an unlisted page on both sides is
    # absent on both (zeros for the anonymous memory this is asked about).
    lx0, lx1 = sa.pt.rows(x0, x[-1].end)
    ly0, ly1 = sb.pt.rows(y0, y[-1].end)
    off = np.union1d(sa.pt.addr[lx0:lx1] - np.uint64(x0), sb.pt.addr[ly0:ly1] - np.uint64(y0))
    off = off[contains(off, both)]
    kx, _ = sa.key_at(off + np.uint64(x0))
    ky, _ = sb.key_at(off + np.uint64(y0))
    same = kx == ky
    nonzero = int(np.count_nonzero(same & (kx != np.uint64(ZERO_PAGE_DIGEST))))
    return npages(both), int(np.count_nonzero(~same)), nonzero


def _looks_moved(x: list[VmaRecord], y: list[VmaRecord], sa: _Side, sb: _Side) -> bool:
    """Whether A's group `x` (gone from B) and B's group `y` (new) are one mapping moved by mremap."""
    if _ident(x[0]) != _ident(y[0]):
        return False
    if not x[0].anonymous:
        return x[0].offset == y[0].offset  # the same file from the same offset: a strong sign
    # Anonymous memory has no name to go by: the same bytes (some not zero) at the same offsets in
    # the new place are a strong hint. All-zero mappings are too common to call.
    compared, differ, nonzero = _moved_pages(x, y, sa, sb)
    return compared > 0 and differ == 0 and nonzero > 0


def _pieces(vs: list[VmaRecord]) -> list[tuple[int, int, str]]:
    return [(v.start, v.end, v.perms) for v in vs]


def _reprotected(av: list[VmaRecord], bv: list[VmaRecord], shift: int = 0) -> list[tuple[int, int, str, str]]:
    """Where A's pieces (moved by `shift`) and B's overlap with other permissions, in B's addresses."""
    out: list[tuple[int, int, str, str]] = []
    for x in av:
        for y in bv:
            s, e = max(x.start + shift, y.start), min(x.end + shift, y.end)
            if s < e and x.perms != y.perms:
                out.append((s, e, x.perms, y.perms))
    out.sort()
    merged: list[tuple[int, int, str, str]] = []
    for r in out:
        if merged and merged[-1][1] == r[0] and merged[-1][2:] == r[2:]:
            merged[-1] = (merged[-1][0], r[1], r[2], r[3])
        else:
            merged.append(r)
    return merged


def _group_changes(d: MappingDiff, av: list[VmaRecord], bv: list[VmaRecord]) -> None:
    sa = _merge_ranges([(v.start, v.end) for v in av])
    sb = _merge_ranges([(v.start, v.end) for v in bv])
    d.grown = _subtract(sb, sa)
    d.shrunk = _subtract(sa, sb)
    if d.grown and d.shrunk:
        d.changes.append("resized")
    elif d.grown:
        d.changes.append("grown")
    elif d.shrunk:
        d.changes.append("shrunk")
    d.reprotected = _reprotected(av, bv)
    if d.reprotected:
        d.changes.append("reprotected")


def _join_one_sided(uf: _Union, va: list[VmaRecord], vb: list[VmaRecord]) -> None:
    """Adjacent records of one mapping found on one side only (a new mapping split by mprotect, a
    library unloaded whole) make one group. Records with a counterpart are never joined this way:
    the kernel keeps apart adjacent mappings it could not merge, and so does the diff."""
    na = len(va)
    sides: dict[int, set[bool]] = {}
    for n in range(na + len(vb)):
        sides.setdefault(uf.find(n), set()).add(n < na)
    for vs, base in ((va, 0), (vb, na)):
        for i in range(1, len(vs)):
            x, y = base + i - 1, base + i
            if (
                vs[i - 1].end == vs[i].start
                and _same_mapping(vs[i - 1], vs[i])
                and len(sides[uf.find(x)]) == 1
                and len(sides[uf.find(y)]) == 1
            ):
                uf.join(x, y)


def _mappings(
    va: list[VmaRecord], vb: list[VmaRecord], sa: _Side, sb: _Side
) -> tuple[list[MappingDiff], np.ndarray, np.ndarray]:
    """One MappingDiff per mapping (group of records) on either side; and each A and B record's row."""
    na = len(va)
    uf = _Union(na + len(vb))
    i = j = 0
    while i < na and j < len(vb):  # overlapping pairs, by one sweep over both sorted lists
        x, y = va[i], vb[j]
        if x.start < y.end and y.start < x.end and _same_mapping(x, y):
            uf.join(i, na + j)
        if x.end <= y.end:
            i += 1
        else:
            j += 1
    _join_one_sided(uf, va, vb)
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for n in range(na + len(vb)):
        g = groups.setdefault(uf.find(n), ([], []))
        if n < na:
            g[0].append(n)
        else:
            g[1].append(n - na)
    row_a = np.zeros(na, dtype=np.int64)
    row_b = np.zeros(len(vb), dtype=np.int64)
    rows: list[MappingDiff] = []
    recs: list[tuple[list[VmaRecord], list[VmaRecord]]] = []
    gone: list[int] = []  # rows of mappings only in A, and only in B: candidates for a move
    new: list[int] = []

    def first(ia: list[int], ib: list[int]) -> int:
        return min([va[k].start for k in ia] + [vb[k].start for k in ib])

    for ia, ib in sorted(groups.values(), key=lambda g: first(*g)):
        av, bv = [va[k] for k in ia], [vb[k] for k in ib]
        d = MappingDiff(path=(bv or av)[0].path, a=_pieces(av), b=_pieces(bv))
        if not bv:
            d.changes.append("removed")
            gone.append(len(rows))
        elif not av:
            d.changes.append("added")
            new.append(len(rows))
        else:
            _group_changes(d, av, bv)
        row_a[ia] = len(rows)
        row_b[ib] = len(rows)
        rows.append(d)
        recs.append((av, bv))
    # A mapping gone from A and a new one in B that look alike are one mapping, moved: B's row is
    # merged into A's, and the emptied row is dropped later.
    for gi in gone:
        xs = recs[gi][0]
        for n in new:
            ys = recs[n][1]
            if not rows[n].b or not _looks_moved(xs, ys, sa, sb):
                continue
            d = rows[gi]
            d.path, d.b, d.changes = ys[0].path, rows[n].b, ["moved"]
            size_a, size_b = sum(v.npages for v in xs), sum(v.npages for v in ys)
            if size_a != size_b:
                d.changes.append("grown" if size_b > size_a else "shrunk")
            d.reprotected = _reprotected(xs, ys, ys[0].start - xs[0].start)
            if d.reprotected:
                d.changes.append("reprotected")
            d.moved_pages_changed = _moved_pages(xs, ys, sa, sb)[1]
            row_b[row_b == n] = gi
            rows[n].b = []
            break
    return rows, row_a, row_b


def _assign(
    rows: list[MappingDiff],
    pd: _Pages,
    tb: PageTable,
    va: list[VmaRecord],
    row_a: np.ndarray,
    vb: list[VmaRecord],
    row_b: np.ndarray,
) -> None:
    """Give each row its pages: B's records own changed and added pages, A's own removed ones;
    an uncompared page belongs to the side whose table holds it."""
    sb, _ = _vma_ranges(vb)

    def split(pages: np.ndarray, starts: np.ndarray, row_of: np.ndarray) -> list[np.ndarray]:
        if not len(pages):
            return [_EMPTY] * len(rows)
        r = row_of[np.searchsorted(starts, pages, side="right") - 1]
        order = np.argsort(r, kind="stable")  # stays ascending by address within a row
        cuts = np.searchsorted(r[order], np.arange(len(rows) + 1))
        sp = pages[order]
        return [sp[cuts[k] : cuts[k + 1]] for k in range(len(rows))]

    def split_runs(pages: PageRuns, vmas: list[VmaRecord], row_of: np.ndarray) -> list[PageRuns]:
        out = [PageRuns() for _ in rows]
        if not len(pages):
            return out
        parts: list[list[Range]] = [[] for _ in rows]
        for i, v in enumerate(vmas):
            parts[int(row_of[i])] += _intersect(pages.ranges, [(v.start, v.end)])
        return [PageRuns(p) for p in parts]

    db = [(int(x), int(y)) for x, y in tb.spans]
    ch = split(pd.changed, sb, row_b)
    ad = split_runs(pd.added, vb, row_b)
    rm = split_runs(pd.removed, va, row_a)
    ub = split_runs(pd.uncompared.within(db), vb, row_b)
    ua = split_runs(PageRuns(_subtract(pd.uncompared.ranges, db)), va, row_a)
    for k, d in enumerate(rows):
        d.changed, d.added, d.removed = ch[k], ad[k], rm[k]
        d.uncompared = ua[k] | ub[k]


# -- threads, fds, mm -------------------------------------------------------------------------------
def _threads(a: MergedView, b: MergedView) -> list[ThreadDiff]:
    ta = {t.tid: t for t in a.top.threads}
    tb = {t.tid: t for t in b.top.threads}
    out: list[ThreadDiff] = []
    for tid in sorted(ta.keys() | tb.keys()):
        x, y = ta.get(tid), tb.get(tid)
        if x is None:
            out.append(ThreadDiff(tid, "added"))
        elif y is None:
            out.append(ThreadDiff(tid, "removed"))
        else:
            regs = sorted(k for k in x.regs.keys() | y.regs.keys() if x.regs.get(k) != y.regs.get(k))
            d = ThreadDiff(
                tid,
                "changed",
                regs,
                x.xsave != y.xsave,
                x.sigmask != y.sigmask,
                None if x.state == y.state else (x.state, y.state),
            )
            if regs or d.xsave or d.sigmask or d.state:
                out.append(d)
    return out


_FD_FIELDS = ("kind", "path", "flags", "pos", "mnt_id", "dev", "ino", "mode", "size", "mtime_ns")


def _fds(a: MergedView, b: MergedView) -> list[FdDiff]:
    fa = {f.fd: f for f in a.top.fds}
    fb = {f.fd: f for f in b.top.fds}
    out: list[FdDiff] = []
    closed = sorted(fa.keys() - fb.keys())
    opened = sorted(fb.keys() - fa.keys())
    # A file closed under one number and open under another (dup2 + close): moved, not closed + opened.
    moved: dict[int, int] = {}
    for n in closed:
        x = fa[n]
        for m in opened:
            y = fb[m]
            if m not in moved.values() and (x.kind, x.path, x.dev, x.ino) == (y.kind, y.path, y.dev, y.ino):
                moved[n] = m
                break
    for n in sorted(fa.keys() | fb.keys()):
        xa, yb = fa.get(n), fb.get(n)
        if xa is not None and yb is not None:
            fields = [k for k in _FD_FIELDS if getattr(xa, k) != getattr(yb, k)]
            if fields:
                out.append(FdDiff(n, "changed", fields, yb.path, a=xa.to_dict(), b=yb.to_dict()))
        elif xa is not None:
            if n in moved:
                m = moved[n]
                out.append(FdDiff(n, "moved", path=xa.path, moved_to=m, a=xa.to_dict(), b=fb[m].to_dict()))
            else:
                out.append(FdDiff(n, "closed", path=xa.path, a=xa.to_dict()))
        elif yb is not None and n not in moved.values():
            out.append(FdDiff(n, "opened", path=yb.path, b=yb.to_dict()))
    return out


def _mm(a: MergedView, b: MergedView) -> dict[str, tuple[Any, Any]]:
    """mm fields that differ; byte blobs (auxv, cmdline, environ) by their size only."""
    da, db = a.top.mm.to_dict(), b.top.mm.to_dict()
    out: dict[str, tuple[Any, Any]] = {}
    for k in da:
        x, y = da[k], db.get(k)
        if x == y:
            continue
        out[k] = (len(x), len(y)) if isinstance(x, bytes) and isinstance(y, bytes) else (x, y)
    return out


def _sigactions(a: MergedView, b: MergedView) -> list[int]:
    sa = {s.sig: s for s in a.top.sigactions}
    sb = {s.sig: s for s in b.top.sigactions}
    return sorted(s for s in sa.keys() | sb.keys() if sa.get(s) != sb.get(s))


# -- one page's bytes -------------------------------------------------------------------------------
def _read_side(view: MergedView, addr: int) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, state, why not) of the page holding `addr`. A damaged layer is an error, not a note."""
    page = addr - addr % PAGE_SIZE
    try:
        state = view.page_state(addr)[0]
    except NotMapped as e:
        return None, None, str(e)
    try:
        return view.read(page, PAGE_SIZE), state, None
    except (CorruptLayer, ChainError):
        raise
    except LayerError as e:  # a page left in a file that has changed since, or cannot be read
        return None, state, str(e)


def content_diff(a: MergedView, b: MergedView, addr: int) -> ContentDiff:
    """The page holding `addr` read from both views (verified), and the lines that differ."""
    page = addr - addr % PAGE_SIZE
    xa, sa, ea = _read_side(a, addr)
    xb, sb, eb = _read_side(b, addr)
    if xa is None and xb is None:
        if sa is None and sb is None:
            raise NotMapped(
                f"address 0x{addr:x} is not mapped, or its mapping was not dumped, in "
                f"{a.top.path} nor in {b.top.path}"
            )
        raise LayerError(f"the page at 0x{addr:x} cannot be read on either side: {ea}; {eb}")
    cd = ContentDiff(page, sa, sb, ea, eb, xa, xb, None)
    if xa is None or xb is None:
        return cd
    va = np.frombuffer(xa, dtype=np.uint8).reshape(-1, _ROW)
    vb = np.frombuffer(xb, dtype=np.uint8).reshape(-1, _ROW)
    ne = va != vb
    cd.bytes_differ = int(np.count_nonzero(ne))
    line = ne.any(axis=1)
    shown = line.copy()
    for k in range(1, _CONTEXT + 1):  # context lines around each differing one
        shown[:-k] |= line[k:]
        shown[k:] |= line[:-k]
    cd.lines = [int(i) * _ROW for i in np.flatnonzero(shown)]
    return cd


# -- the whole diff ---------------------------------------------------------------------------------
def diff(a: MergedView, b: MergedView, *, force: bool = False, content: int | None = None) -> DiffResult:
    """Compare two merged views; B is the newer one by convention (added = only in B)."""
    t0 = time.perf_counter()
    same = _check_same_process(a, b)
    if not same and not force:
        ia, ib = a.top.inventory, b.top.inventory
        raise CkptError(
            f"{a.top.path} and {b.top.path} are dumps of different processes (pid {ia.pid} started at "
            f"{ia.start_time}, pid {ib.pid} started at {ib.start_time}"
            + ("" if ia.boot_id == ib.boot_id else ", in different boots")
            + "); use --force to compare them anyway"
        )
    ta, tb = a.page_table(), b.page_table()
    sa, sb = _Side(a, ta, *_keys(a, ta)), _Side(b, tb, *_keys(b, tb))
    pd = _compare_pages(a, sa, b, sb)
    relation, between = _relation(a, b)
    dirty = _dirty(between)
    if len(dirty):
        dirty = dirty[contains(dirty, pd.both) & ~member(dirty, pd.changed)]
    rows, row_a, row_b = _mappings(a.vmas, b.vmas, sa, sb)
    _assign(rows, pd, tb, a.vmas, row_a, b.vmas, row_b)
    rows = [
        d
        for d in rows
        if (d.a or d.b)
        and (d.changes or len(d.changed) or len(d.added) or len(d.removed) or len(d.uncompared))
    ]
    res = DiffResult(
        a=str(a.top.path),
        b=str(b.top.path),
        a_digest=a.top.digest,
        b_digest=b.top.digest,
        relation=relation,
        same_process=same,
        dirty_layers=len(between),
        changed=pd.changed,
        added=pd.added,
        removed=pd.removed,
        uncompared=pd.uncompared,
        dirty_unchanged=dirty,
        pages_compared=pd.compared,
        mappings=rows,
        threads=_threads(a, b),
        fds=_fds(a, b),
        mm=_mm(a, b),
        sigactions=_sigactions(a, b),
        content=None if content is None else content_diff(a, b, content),
    )
    res.elapsed_ms = round((time.perf_counter() - t0) * 1e3, 3)
    return res
