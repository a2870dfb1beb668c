"""MergedView: a chain of layers resolved top-down into one picture of memory.

A page of the top layer's dumped mappings comes from the newest layer that says something about it:
stored data, zero, or absent. A layer with no parent, a `fresh` range, or no dumped mapping at that
address ends the walk as absent: nothing older may show through.
"""

from __future__ import annotations

import bisect
import os
import stat
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ckpt import pageset
from ckpt.errors import ChainError, LayerError, NotMapped
from ckpt.image.format import PAGE_SIZE, ZERO_PAGE_DIGEST, FileId, VmaRecord
from ckpt.image.reader import Layer
from ckpt.image.recmemo import RecordMemo
from ckpt.image.validate import I64_MAX, is_numpy
from ckpt.openas import open_as
from ckpt.ranges import span_at

if TYPE_CHECKING:
    import numpy as np

STATE_ABSENT, STATE_ZERO, STATE_DATA = 0, 1, 2
STATE_NAMES = ("absent", "zero", "data")
MAX_CHAIN = 10000
# Layers past this depth give their fd back after opening and reopen it on demand, so a long chain
# does not run into RLIMIT_NOFILE.
KEEP_OPEN = 64


def _no_spans() -> np.ndarray:
    import numpy as np

    return np.zeros((0, 2), np.uint64)


def _no_anon() -> np.ndarray:
    import numpy as np

    return np.zeros(0, bool)


@dataclass(frozen=True, eq=False)
class PageTable:
    """The pages some layer of the chain names (stores, zeroes or lists absent), resolved for the top
    layer's dumped mappings; parallel arrays.

    Every other page of a dumped mapping is absent (zeros, or its file's bytes) and is not listed: the
    table follows what the layers hold, never the mappings' virtual size (a 16 TiB reservation with
    two pages touched has a table of two rows). `spans` says where those unlisted absent pages lie.

    Two kinds, as ckpt/pageset.py's sets: numpy arrays, or (a small table, `page_table(small=True)`
    for at most pageset.small_max() rows) array.array columns of the same item types, `spans` a list
    of (start, end) and `anon` a list of bools, so that a small restore never imports numpy. The
    methods answer the same for both; `numpy()` gives the numpy kind to code that works on arrays.
    """

    addr: Any  # uint64, ascending (array 'Q')
    state: Any  # uint8: STATE_ABSENT, STATE_ZERO, STATE_DATA (array 'B')
    layer: Any  # int32: index in MergedView.layers of the layer that decided the page (array 'i')
    index: Any  # int64: for data pages, the page's index in that layer's data arrays; else -1 ('q')
    digest: Any  # uint64: data: its digest; zero and anonymous absent: ZERO_PAGE_DIGEST; file absent: 0
    spans: Any = field(default_factory=_no_spans)  # dumped mappings: (n, 2) uint64, or [(start, end)]
    anon: Any = field(default_factory=_no_anon)  # per span: anonymous

    def __len__(self) -> int:
        return len(self.addr)

    @property
    def small(self) -> bool:
        return not is_numpy(self.addr)

    def numpy(self) -> PageTable:
        """This table with numpy columns (itself if it has them)."""
        if not self.small:
            return self
        import numpy as np

        return PageTable(
            np.array(self.addr, dtype=np.uint64),
            np.array(self.state, dtype=np.uint8),
            np.array(self.layer, dtype=np.int32),
            np.array(self.index, dtype=np.int64),
            np.array(self.digest, dtype=np.uint64),
            np.array(self.spans, dtype=np.uint64).reshape(-1, 2),
            np.array(self.anon, dtype=bool),
        )

    @property
    def total(self) -> int:
        """Pages of the dumped mappings, listed or not."""
        if self.small:
            return sum((e - s) // PAGE_SIZE for s, e in self.spans)
        import numpy as np

        return int(((self.spans[:, 1] - self.spans[:, 0]) // np.uint64(PAGE_SIZE)).sum())

    def counts(self) -> dict[str, int]:
        if self.small:
            data, zero = self.state.count(STATE_DATA), self.state.count(STATE_ZERO)
        else:
            import numpy as np

            c = np.bincount(self.state, minlength=3)
            data, zero = int(c[STATE_DATA]), int(c[STATE_ZERO])
        return {"absent": self.total - data - zero, "zero": zero, "data": data}

    def rows(self, start: int, end: int) -> tuple[int, int]:
        """The rows [lo, hi) of pages in [start, end)."""
        if self.small:
            return bisect.bisect_left(self.addr, start), bisect.bisect_left(self.addr, end)
        import numpy as np

        lo, hi = np.searchsorted(self.addr, np.array([start, end], dtype=np.uint64))
        return int(lo), int(hi)

    def present_in(self, start: int, end: int) -> int:
        """Pages of [start, end) the view holds as data or zero."""
        lo, hi = self.rows(start, end)
        if self.small:
            return hi - lo - self.state[lo:hi].count(STATE_ABSENT)
        import numpy as np

        return int(np.count_nonzero(self.state[lo:hi] != STATE_ABSENT))

    def data_indexes(self, k: int) -> Any:
        """The data arrays' indexes of the data pages layer `k` decided (a list for a small table)."""
        if self.small:
            # Grouped by layer in one pass, the first time: a restore's plan asks for every layer of
            # the chain, and a pass per layer was rows x layers (21 ms of an 80-layer plan's 60).
            by = self.__dict__.get("_by_layer")
            if by is None:
                by = {}
                for i, lay in zip(self.index, self.layer, strict=True):
                    if i >= 0:
                        by.setdefault(lay, []).append(i)
                object.__setattr__(self, "_by_layer", by)
            return list(by.get(k, ()))
        return self.index[(self.layer == k) & (self.index >= 0)]

    def mapped(self, q: Any) -> Any:
        """Which of the page addresses q lie in a dumped mapping (a numpy mask for a numpy array or
        a table of numpy columns, else a list of bools)."""
        if self.small and not is_numpy(q):
            starts = [s for s, _ in self.spans]
            return [span_at(starts, self.spans, x) >= 0 for x in q]
        from ckpt.ranges import in_spans

        t = self.numpy()
        return in_spans(_np_u64(q), t.spans[:, 0], t.spans[:, 1])

    def lookup(self, q: Any) -> tuple[Any, Any]:
        """(row of each page of q, or -1 where unlisted; digest of each, unlisted pages of a dumped
        mapping taking the absent digest: ZERO_PAGE_DIGEST if anonymous, else 0). numpy arrays for
        a numpy array or a table of numpy columns, else lists."""
        if self.small and not is_numpy(q):
            return self._lookup_small(q)
        return self.numpy()._lookup(_np_u64(q))

    def _lookup_small(self, q: Sequence[int]) -> tuple[list[int], list[int]]:
        addr, digest, spans = self.addr, self.digest, self.spans
        starts = [s for s, _ in spans]
        rows, digs = [], []
        for x in q:
            i = bisect.bisect_left(addr, x)
            if i < len(addr) and addr[i] == x:
                rows.append(i)
                digs.append(digest[i])
                continue
            rows.append(-1)
            j = span_at(starts, spans, x)
            digs.append(ZERO_PAGE_DIGEST if j >= 0 and self.anon[j] else 0)
        return rows, digs

    def _lookup(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        row = np.full(len(q), -1, dtype=np.int64)
        dig = np.zeros(len(q), dtype=np.uint64)
        if len(self.addr) and len(q):
            i = np.searchsorted(self.addr, q)
            ic = np.minimum(i, len(self.addr) - 1)
            hit = self.addr[ic] == q
            row[hit] = ic[hit]
            dig[hit] = self.digest[ic[hit]]
        miss = np.flatnonzero(row < 0)
        if len(miss) and len(self.spans):
            si = np.searchsorted(self.spans[:, 0], q[miss], side="right") - 1
            ok = si >= 0
            ok[ok] &= q[miss][ok] < self.spans[si[ok], 1]
            anon = np.zeros(len(miss), dtype=bool)
            anon[ok] = self.anon[si[ok]]
            dig[miss[anon]] = ZERO_PAGE_DIGEST
        return row, dig


def _np_u64(q: Any) -> np.ndarray:
    import numpy as np

    return np.asarray(q, dtype=np.uint64)


class _Scope:
    """One layer's resolution inputs, built once: its columns as they are, its ranges as lists; the
    numpy forms only when a big table asks for them."""

    def __init__(self, layer: Layer) -> None:
        pg = layer.pages
        self.data, self.zero, self.absent = pg.data, pg.zero, pg.absent
        self.fresh = [(int(s), int(e)) for s, e in pg.fresh]
        self.fresh_first = [s for s, _ in self.fresh]
        self.vmas = [(v.start, v.end) for v in layer.meta.vmas if v.dumped]
        self.vma_first = [s for s, _ in self.vmas]
        self.has_parent = layer.inventory.parent is not None
        self._np: tuple[np.ndarray, ...] | None = None

    def stops(self, page: int) -> bool:
        """Whether the walk of `page` ends in this layer when the layer does not name the page."""
        return (
            not self.has_parent
            or span_at(self.fresh_first, self.fresh, page) >= 0
            or span_at(self.vma_first, self.vmas, page) < 0
        )

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(data, zero, absent, fresh starts, fresh ends, vma starts, vma ends) as uint64 arrays."""
        if self._np is None:
            import numpy as np

            def col(a: Any) -> np.ndarray:
                return np.asarray(a, dtype=np.uint64)

            fr = np.array(self.fresh, dtype=np.uint64).reshape(-1, 2)
            vm = np.array(self.vmas, dtype=np.uint64).reshape(-1, 2)
            self._np = (
                col(self.data),
                col(self.zero),
                col(self.absent),
                fr[:, 0],
                fr[:, 1],
                vm[:, 0],
                vm[:, 1],
            )
        return self._np


def _has(sorted_arr: Any, x: int) -> tuple[bool, int]:
    i = bisect.bisect_left(sorted_arr, x)
    return (i < len(sorted_arr) and int(sorted_arr[i]) == x), i


def _same_process(child: Layer, par: Layer) -> None:
    """A chain is one process's history: a parent of another process (or of the same pid before a
    reboot or after pid reuse) would mix two memories into one picture."""
    c, p = child.inventory, par.inventory
    if (c.pid, c.start_time, c.boot_id) != (p.pid, p.start_time, p.boot_id):
        par.close()
        raise ChainError(
            f"{child.path} (pid {c.pid}, {c.comm}, start time {c.start_time}) names as its parent "
            f"{par.path}, a dump of another process (pid {p.pid}, {p.comm}, start time {p.start_time}"
            + (", another boot" if c.boot_id != p.boot_id else "")
            + "): a chain holds one process"
        )


def require_consistent(view: MergedView, what: str) -> None:
    """A chain whose top was copied while the process ran (a pre-dump) is no moment of it."""
    inv = view.top.meta.inventory
    if not inv.consistent:
        raise ChainError(
            f"cannot {what} {view.top.path}: it is a pre-dump layer (consistent: false), copied while "
            "the process ran; dump a final (frozen) incremental layer on top of it first"
        )


class MergedView:
    """The chain under `top`, opened eagerly so that a broken chain fails here, not mid-restore."""

    def __init__(self, top: Layer, below: MergedView | None = None) -> None:
        """`below`: an open view of the chain under `top` (top's parent at its top), whose layers
        this view takes over instead of opening them again: a live migration's destination adds one
        layer per round to a chain whose older metadata it has decoded already."""
        self.top = top
        self.layers: list[Layer] = [top]  # top first
        if below is not None and self._stack(below):
            return
        seen = {top._ident[:2]}
        digests = {top.digest}
        # One memo for the walk down: a layer's sections equal to the one above it (mappings, signal
        # actions, fds, mm...) are taken as checked (image/recmemo.py): ~1/3 of a layer's open.
        memo = RecordMemo()
        try:
            cur = top
            while cur.inventory.parent is not None:
                if len(self.layers) >= MAX_CHAIN:
                    raise ChainError(f"the chain under {top.path} is longer than {MAX_CHAIN} layers")
                par = cur.parent(memo)
                assert par is not None
                if par._ident[:2] in seen or par.digest in digests:
                    par.close()
                    raise ChainError(f"the chain under {top.path} loops: {cur.path} names {par.path} again")
                _same_process(cur, par)
                seen.add(par._ident[:2])
                digests.add(par.digest)
                self.layers.append(par)
                if len(self.layers) > KEEP_OPEN:
                    par.close()
                cur = par
        except BaseException:
            for layer in self.layers[1:]:
                layer.close()
            raise
        self._scopes = [_Scope(layer) for layer in self.layers]
        self._vma_starts = [v.start for v in top.vmas]

    def _stack(self, below: MergedView) -> bool:
        """Take `below`'s layers if `below.top` is the parent this top names; False if it is not."""
        top, ref, pp = self.top, self.top.inventory.parent, self.top.parent_path()
        par = below.top
        if ref is None or pp is None or par.digest != ref.digest:
            return False
        c, p = top.inventory, par.inventory
        if (c.pid, c.start_time, c.boot_id) != (p.pid, p.start_time, p.boot_id):
            return False  # the ordinary walk opens the parent again and says what is wrong
        if len(below.layers) >= MAX_CHAIN or top.digest in {x.digest for x in below.layers}:
            return False
        if pp.resolve() != par.path.resolve():
            return False
        self.layers.extend(below.layers)
        self._scopes = [_Scope(top), *below._scopes]
        self._vma_starts = [v.start for v in top.vmas]
        return True

    def __enter__(self) -> MergedView:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    @property
    def vmas(self) -> list[VmaRecord]:
        return self.top.vmas

    def verify(self) -> None:
        for layer in self.layers:
            layer.verify()

    # -- one page -------------------------------------------------------------------------------
    def vma_at(self, addr: int) -> VmaRecord:
        """The top layer's dumped mapping holding `addr`; NotMapped (saying why) otherwise."""
        i = bisect.bisect_right(self._vma_starts, addr) - 1
        vmas = self.top.vmas
        if i < 0 or addr >= vmas[i].end:
            raise NotMapped(f"address 0x{addr:x} is not mapped in {self.top.path}")
        v = vmas[i]
        if v.status != "dumped":
            why = "was skipped by the dump" if v.status == "skipped" else "could not be read at dump time"
            raise NotMapped(
                f"address 0x{addr:x} is in mapping {v.path or '[anon]'} [0x{v.start:x}-0x{v.end:x}) "
                f"whose pages are not in {self.top.path}: it {why}"
            )
        return v

    def page_state(self, addr: int) -> tuple[str, Layer | None]:
        """("data" | "zero" | "absent", the layer that decided) for the page holding `addr`."""
        self.vma_at(addr)
        page = addr - addr % PAGE_SIZE
        state, k, _ = self._walk(page)
        if k < 0:
            raise AssertionError("the bottom layer has no parent, so the walk ends there")
        return STATE_NAMES[state], self.layers[k]

    def _walk(self, page: int) -> tuple[int, int, int]:
        """(state, deciding layer or -1, data index or -1) of one page of a dumped top mapping."""
        for k, sc in enumerate(self._scopes):
            hit, i = _has(sc.data, page)
            if hit:
                return STATE_DATA, k, i
            if _has(sc.zero, page)[0]:
                return STATE_ZERO, k, -1
            if _has(sc.absent, page)[0] or sc.stops(page):
                return STATE_ABSENT, k, -1
        return STATE_ABSENT, -1, -1

    def _named_entries(self) -> int:
        """An upper bound on a page table's rows: every page some layer names."""
        return sum(len(sc.data) + len(sc.zero) + len(sc.absent) for sc in self._scopes)

    # -- many pages -----------------------------------------------------------------------------
    def _resolve(self, addr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised page_state for page addresses known to lie in dumped top mappings."""
        import numpy as np

        from ckpt.ranges import in_spans as in_ranges
        from ckpt.ranges import member

        n = len(addr)
        state = np.zeros(n, dtype=np.uint8)
        layer = np.full(n, -1, dtype=np.int32)
        index = np.full(n, -1, dtype=np.int64)
        pending = np.arange(n, dtype=np.int64)
        for k, sc in enumerate(self._scopes):
            if not len(pending):
                break
            q = addr[pending]
            data, zero, absent, fresh_starts, fresh_ends, vma_starts, vma_ends = sc.arrays()
            if len(data):
                i = np.searchsorted(data, q)
                ic = np.minimum(i, len(data) - 1)
                hit = data[ic] == q
                sel = pending[hit]
                state[sel] = STATE_DATA
                layer[sel] = k
                index[sel] = i[hit]
                rest = ~hit
            else:
                rest = np.ones(len(q), dtype=bool)
            hz = rest & member(q, zero)
            state[pending[hz]] = STATE_ZERO
            rest &= ~hz
            rest &= ~member(q, absent)  # absent here: state stays STATE_ABSENT
            if sc.has_parent:
                down = rest & ~in_ranges(q, fresh_starts, fresh_ends) & in_ranges(q, vma_starts, vma_ends)
            else:
                down = np.zeros(len(q), dtype=bool)
            layer[pending[~down]] = k
            pending = pending[down]
        return state, layer, index

    def page_table(self, small: bool = False) -> PageTable:
        """The merged page table. `small`: a table of array.array columns (no numpy) when the
        layers name at most pageset.small_max() pages; numpy's kind otherwise, and by default."""
        dumped = [v for v in self.top.vmas if v.dumped]
        if small and self._named_entries() <= pageset.small_max():
            return self._small_table(dumped)
        import numpy as np

        from ckpt.ranges import as_set
        from ckpt.ranges import in_spans as in_ranges

        spans = np.array([(v.start, v.end) for v in dumped], dtype=np.uint64).reshape(-1, 2)
        anon_of = np.array([v.anonymous for v in dumped], dtype=bool)
        # Only pages a layer names can be other than absent; a page no layer names resolves to
        # absent wherever its walk ends, so it needs no row.
        named = [
            arr[in_ranges(arr, spans[:, 0], spans[:, 1])]
            for sc in self._scopes
            for arr in sc.arrays()[:3]
            if len(arr)
        ]
        # as_set, not np.unique: numpy 2's hash-based unique took 77 ms for a GiB of pages here.
        addr = as_set(np.concatenate(named)) if named else np.empty(0, np.uint64)
        total = len(addr)
        si = np.searchsorted(spans[:, 0], addr, side="right") - 1
        anon = anon_of[si] if total else np.zeros(0, bool)
        state, layer, index = self._resolve(addr)
        digest = np.zeros(total, dtype=np.uint64)
        is_data = state == STATE_DATA
        for k, lay in enumerate(self.layers):
            sel = is_data & (layer == k)
            if bool(sel.any()):
                digest[sel] = np.asarray(lay.pages.digests, dtype=np.uint64)[index[sel]]
        digest[(state == STATE_ZERO) | ((state == STATE_ABSENT) & anon)] = ZERO_PAGE_DIGEST
        return PageTable(addr, state, layer, index, digest, spans, anon_of)

    def cached_table(self, small: bool = False) -> PageTable | None:
        """The top layer's table file (ckpt/image/tablecache.py) when it is this chain's: the one
        the top's metadata records, of as many layers as were opened, rooted at the bottom one,
        every data row's index inside its layer's data pages. None otherwise (page_table walks).
        It lists no absent page: for a caller that reads only data and zero rows (a restore)."""
        from ckpt.image import tablecache

        got = tablecache.load(self.top, small=small)
        if got is None or got.ref.layers != len(self.layers):
            return None
        try:
            if got.root.resolve() != self.layers[-1].path.resolve():
                return None
        except (OSError, RuntimeError):
            return None
        t = got.table
        if t.small:
            tops = [len(self.layers[k].pages.data) for k in range(len(self.layers))]
            if any(i >= tops[k] for k, i in zip(t.layer, t.index, strict=True)):
                return None
            return t
        import numpy as np

        sizes = np.array([len(lay.pages.data) for lay in self.layers], dtype=np.int64)
        if len(t) and bool(np.any(t.index >= sizes[t.layer])):
            return None
        return t

    def _small_table(self, dumped: list[VmaRecord]) -> PageTable:
        """page_table's answer in array.array columns, by a walk of each named page (bisect in
        each layer's sorted columns): a few ms at most for the pages small_max() allows."""
        spans = [(v.start, v.end) for v in dumped]
        anon_of = [v.anonymous for v in dumped]
        starts = [s for s, _ in spans]
        named: set[int] = set()
        for sc in self._scopes:
            for arr in (sc.data, sc.zero, sc.absent):
                if not len(arr):
                    continue
                for s, e in spans:
                    part = arr[bisect.bisect_left(arr, s) : bisect.bisect_left(arr, e)]
                    named.update(part.tolist() if is_numpy(part) else part)
        addr = array("Q", sorted(named))
        state, layer, index, digest = array("B"), array("i"), array("q"), array("Q")
        digests = [lay.pages.digests for lay in self.layers]
        for a in addr:
            st, k, i = self._walk(a)
            state.append(st)
            layer.append(k)
            index.append(i)
            if st == STATE_DATA:
                digest.append(int(digests[k][i]))
            elif st == STATE_ZERO or anon_of[bisect.bisect_right(starts, a) - 1]:
                digest.append(ZERO_PAGE_DIGEST)
            else:
                digest.append(0)
        return PageTable(addr, state, layer, index, digest, spans, anon_of)

    def absent_layer(self, addr: int) -> int:
        """The index of the layer that decides an unlisted page of a dumped mapping (where its walk ends)."""
        for k, sc in enumerate(self._scopes):
            if sc.stops(addr):
                return k
        return len(self._scopes) - 1

    # -- bytes ----------------------------------------------------------------------------------
    def read(self, addr: int, size: int) -> bytes:
        """`size` bytes of merged memory at `addr`; NotMapped naming the first unmapped address."""
        if size < 0 or addr < 0:
            raise ValueError("address and size must not be negative")
        if size == 0:
            return b""
        end = addr + size
        cur = addr
        while cur < end:  # every byte must be mapped and dumped before any is read
            cur = self.vma_at(cur).end
        first = addr - addr % PAGE_SIZE
        last = -(-end // PAGE_SIZE) * PAGE_SIZE
        out = bytearray(last - first)
        files: dict[str, int] = {}  # path -> fd, opened and checked once per read()
        try:
            # One walk per page, as the loop below takes one step per page anyway.
            for j, p in enumerate(range(first, last, PAGE_SIZE)):
                s, k, _ = self._walk(p)
                if s == STATE_DATA:
                    out[j * PAGE_SIZE : (j + 1) * PAGE_SIZE] = self.layers[k].read_page(p)
                elif s == STATE_ABSENT:
                    vma = self.vma_at(p)
                    if not vma.anonymous:
                        out[j * PAGE_SIZE : (j + 1) * PAGE_SIZE] = self._file_page(vma, p, files)
        finally:
            for fd in files.values():
                os.close(fd)
        return bytes(out[addr - first : addr - first + size])

    def _file_page(self, vma: VmaRecord, page: int, files: dict[str, int]) -> bytes:
        """A page the dump did not capture, from the file it maps, if that file is unchanged."""
        what = f"page 0x{page:x} of {vma.path} was not captured in {self.top.path}"
        if vma.file is None:
            raise LayerError(f"{what}, and the file's identity was not recorded, so it cannot be read")
        fd = files.get(vma.path)
        if fd is None:
            try:
                # With the rights of the process the layer claims, not ckpt's: a crafted layer must
                # not read through root what its process could not. Non-blocking and no symlinks: a
                # FIFO or device named by a layer must not hang or feed us (only regular files).
                fd = open_as(
                    self.top.task,
                    vma.path,
                    os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW,
                )
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise LayerError(f"{what}, and {vma.path} is not a regular file")
            except OSError as e:
                raise LayerError(
                    f"{what}, and the file cannot be read now with the process's rights "
                    f"(uid {self.top.task.uid[3]}): {e.strerror}"
                ) from None
            except ValueError:  # a NUL in the path: no file can have that name
                raise LayerError(f"{what}, and its path is not a valid file name") from None
            files[vma.path] = fd
            # fstat of what was opened: the identity checked is that of the bytes about to be read
            if FileId.of(st) != vma.file:
                raise LayerError(f"{what}, and the file has changed since the dump")
        pos = vma.offset + (page - vma.start)
        if pos > I64_MAX - PAGE_SIZE:
            raise LayerError(f"{what}, and its file offset 0x{pos:x} is beyond what a file can hold")
        try:
            b = os.pread(fd, PAGE_SIZE, pos)
        except OSError as e:
            raise LayerError(f"{what}, and reading the file failed: {e.strerror}") from None
        # Past the end of the file a mapping reads as zeros (up to the page end).
        return b.ljust(PAGE_SIZE, b"\0")
