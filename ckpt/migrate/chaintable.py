"""The merged page table of a chain that grows by one layer at a time, kept up to date in
O(new layer) instead of rebuilt from every layer (MergedView.page_table: ~75 ms per round for a
GiB of pages, which a migration's source and destination would pay every round).

Used by both sides of a migration: the source hands it to the next round's dump as its parent's
table (the digests that find dirty-but-unchanged pages, the present set that finds lost ones), the
destination's warm restore to the final restore plan."""

from __future__ import annotations

from typing import Any

import numpy as np

from ckpt import ranges
from ckpt.image import STATE_ABSENT, STATE_DATA, STATE_ZERO, MergedView
from ckpt.image.chain import PageTable
from ckpt.image.format import ZERO_PAGE_DIGEST


def vma_key(view: MergedView) -> tuple[Any, ...]:
    """The top layer's mappings: equal keys, the same dumped mappings (and page-table spans)."""
    return tuple((v.start, v.end, v.perms, v.offset, v.path, v.inode, v.status) for v in view.vmas)


def top_table(view: MergedView) -> PageTable:
    """The rows of the merged page table that the top layer decides (its data, zero and absent
    pages), built from its own index: the top is layer 0, data page i is index i."""
    pg = view.top.pages
    nz = len(pg.zero) + len(pg.absent)
    addr = np.concatenate([pg.data, pg.zero, pg.absent])
    state = np.concatenate(
        [
            np.full(len(pg.data), STATE_DATA, dtype=np.uint8),
            np.full(len(pg.zero), STATE_ZERO, dtype=np.uint8),
            np.full(len(pg.absent), STATE_ABSENT, dtype=np.uint8),
        ]
    )
    index = np.concatenate([np.arange(len(pg.data), dtype=np.int64), np.full(nz, -1, dtype=np.int64)])
    digest = np.concatenate([pg.digests, np.full(nz, ZERO_PAGE_DIGEST, dtype=np.uint64)])
    order = np.argsort(addr, kind="stable")
    layer = np.zeros(len(addr), dtype=np.int32)
    return PageTable(addr[order], state[order], layer, index[order], digest[order])


def advance(prev: PageTable | None, view: MergedView) -> PageTable | None:
    """The merged page table once `view.top` (one new layer, no fresh ranges, the same dumped
    mappings) is laid over the chain `prev` described: every row moves one layer down, and the rows
    the top decides are replaced. None when the rows do not match (then the plan builds its own)."""
    if prev is None:
        return None
    top = top_table(view)
    pos = np.searchsorted(prev.addr, top.addr)
    named_before = len(top.addr) == 0 or (
        int(pos[-1]) < len(prev.addr) and bool(np.all(prev.addr[pos] == top.addr))
    )
    if named_before:
        # The usual round: every page it names was named before. Copies of the arrays, no union.
        addr = prev.addr
        state, index, digest = prev.state.copy(), prev.index.copy(), prev.digest.copy()
        layer = prev.layer.astype(np.int64) + 1
    else:
        # The table lists only the pages some layer names (ckpt/image/chain.py): the top may name
        # pages no earlier layer did, so the rows are the union; every earlier row moves down.
        addr = ranges.union(prev.addr, top.addr).astype(np.uint64)  # not np.union1d: 77 ms for a GiB
        n = len(addr)
        state = np.full(n, STATE_ABSENT, dtype=prev.state.dtype)
        layer = np.zeros(n, dtype=np.int64)
        index = np.full(n, -1, dtype=np.int64)
        digest = np.zeros(n, dtype=np.uint64)
        old = np.searchsorted(addr, prev.addr)
        state[old], layer[old], index[old], digest[old] = prev.state, prev.layer + 1, prev.index, prev.digest
        pos = np.searchsorted(addr, top.addr)
    state[pos], layer[pos], index[pos], digest[pos] = top.state, 0, top.index, top.digest
    # An absent page of a file mapping reads from the file: no zero digest for it.
    absent_top = pos[top.state == STATE_ABSENT]
    if len(absent_top):
        file_rows = np.zeros(len(addr), dtype=bool)
        for v in view.vmas:
            if v.dumped and not v.anonymous:
                lo, hi = np.searchsorted(addr, np.array([v.start, v.end], dtype=np.uint64))
                file_rows[lo:hi] = True
        digest[absent_top[file_rows[absent_top]]] = 0
    return PageTable(
        addr, state, layer.astype(prev.layer.dtype), index, digest, spans=prev.spans, anon=prev.anon
    )


class ChainTable:
    """The page table of a chain built one layer at a time (a migration's rounds)."""

    def __init__(self) -> None:
        self.table: PageTable | None = None
        self.key: tuple[Any, ...] | None = None
        self.layers = 0

    def add(self, view: MergedView) -> PageTable:
        """The table of `view`, whose top is the one layer added since the last call when the
        chain was followed layer by layer; otherwise built from the whole chain."""
        key = vma_key(view)
        t = None
        if len(view.layers) == self.layers + 1 and not view.top.pages.fresh and key == self.key:
            t = advance(self.table, view)
        if t is None:
            t = view.page_table()
        self.table, self.key, self.layers = t, key, len(view.layers)
        return t
