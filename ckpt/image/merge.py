"""merge(): a chain's merged view written out as one standalone layer (`ckpt merge`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec

from ckpt.image.chain import STATE_ABSENT, STATE_DATA, STATE_ZERO, MergedView, require_consistent
from ckpt.image.format import FORMAT_VERSION, PAGE_SIZE, LayerMeta, PageIndex
from ckpt.image.objects import resolve_objects
from ckpt.image.tree import TreeRecord

if TYPE_CHECKING:  # numpy: imported by merge's work, not by `ckpt.image` (a small restore has none)
    import numpy as np

P = ParamSpec("P")


def _gather(view: MergedView, layer: np.ndarray, index: np.ndarray) -> memoryview:
    """The pages (layer[j], index[j]) side by side; one verified chunk read per distinct chunk."""
    import numpy as np

    from ckpt import ranges

    out = np.empty((len(index), PAGE_SIZE), dtype=np.uint8)
    for k in ranges.unique(layer):
        src = view.layers[int(k)]
        pos = np.flatnonzero(layer == k)
        idx = index[pos]
        chunk = src.chunk_of(idx)
        for c in ranges.unique(chunk):
            m = chunk == c
            pages = np.frombuffer(src.read_chunk(int(c)), dtype=np.uint8).reshape(-1, PAGE_SIZE)
            out[pos[m]] = pages[idx[m] - src.chunk_starts[c]]
    # Read-only hand-over: the writer may then compress it without taking a copy.
    out.flags.writeable = False
    return out.data.cast("B")


def merge_layer(
    view: MergedView,
    out: Path,
    *,
    level: int | None = None,
    threads: int = 2,
    chunk_pages: int | None = None,
    replace: bool = False,
    tree: TreeRecord | None = None,
) -> tuple[Path, str]:
    """Write `view` as one layer with no parent at `out`; returns its path and its digest (what a
    tree record names a member's layer by, known from the write without reading the layer back).

    Every page resolves to its data, zero or absent; the top layer's records and tracker state
    are kept (so dumps can continue on top of the merged layer), the stats describe the result.
    `tree`: the tree record of a merged tree's root (ckpt/mergetree.py names its merged members).
    `level`: zstd's, ckpt.image.writer.DEFAULT_LEVEL by default.
    """
    # Here, not at the top: `import ckpt.image` (every restore, show, diff) then needs no writer.
    from ckpt.image.writer import DEFAULT_LEVEL, LayerWriter

    if level is None:
        level = DEFAULT_LEVEL
    require_consistent(view, "merge")
    t0 = time.monotonic()
    out = Path(out)
    top = view.top
    table = view.page_table()
    is_data = table.state == STATE_DATA
    addr, layer, index, digest = (a[is_data] for a in (table.addr, table.layer, table.index, table.digest))
    cp = chunk_pages or top.pages.chunk_pages
    with LayerWriter(
        out.parent, out.name, level=level, threads=threads, chunk_pages=cp, replace=replace
    ) as w:
        # One output chunk per batch keeps every read chunk's pages in memory just once.
        for s in range(0, len(addr), cp):
            e = min(len(addr), s + cp)
            w.add_pages(addr[s:e], _gather(view, layer[s:e], index[s:e]), digest[s:e])
        counts = table.counts()
        stats: dict[str, int | float] = {
            "pages_total": table.total,
            "pages_dumped": counts["data"],
            "pages_zero": counts["zero"],
            "pages_absent": counts["absent"],
            "pages_dirty": 0,
            "pages_dirty_unchanged": 0,
            "bytes_raw": counts["data"] * PAGE_SIZE,
            "freeze_ms": 0.0,
            "layers_merged": len(view.layers),
            "elapsed_ms": (time.monotonic() - t0) * 1000.0,
        }
        meta = LayerMeta(
            # Written as this ckpt's version (its header says so): what an older top did not record
            # stays absent, which every reader takes as "not recorded".
            inventory=dataclasses.replace(
                top.inventory, version=FORMAT_VERSION, parent=None, incremental=False, stats=stats
            ),
            vmas=list(top.vmas),
            threads=list(top.threads),
            sigactions=list(top.sigactions),
            fds=list(top.fds),
            mm=top.mm,
            task=top.task,
            props=top.meta.props,
            pipes=list(top.meta.pipes),
            anonfds=list(top.meta.anonfds),
            objects=resolve_objects(view.layers),
            inet_listen=list(top.meta.inet_listen),
            tcp_established=list(top.meta.tcp_established),
            pidns=top.meta.pidns,
            tree=tree,
            pages=PageIndex(
                zero=table.addr[table.state == STATE_ZERO],
                absent=table.addr[table.state == STATE_ABSENT],
            ),
        )
        path = w.finish(meta)
        assert w.digest is not None  # set by finish
        return path, w.digest


def _path_only(fn: Callable[P, tuple[Path, str]]) -> Callable[P, Path]:
    def merge(*args: P.args, **kw: P.kwargs) -> Path:
        """Write `view` as one layer with no parent at `out`; returns its path (merge_layer, whose
        options it takes, without the digest)."""
        return fn(*args, **kw)[0]

    return merge


merge = _path_only(merge_layer)  # (one signature: merge_layer's)
