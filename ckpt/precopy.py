"""Live pre-copy inside one incremental dump (uffd-wp): most of the copy leaves the freeze.

Before the freeze, one PAGEMAP_SCAN finds the pages written since the parent and write-protects them
again in the same call (as migration's rounds and `--pre-dump` do), and they are copied while the
process runs. The freeze's own scan then reports only what was written since that scan, and copies
that. Why the layer is still one moment (the freeze's):
- a page written after its live scan, even during its live copy, is reported by the frozen scan and
  copied frozen: the frozen copy wins;
- a page not reported by the frozen scan was not written since its live scan (its write-protect bit
  is still set; a page dropped and faulted in again carries none and is reported too): its live copy
  is its content at the freeze;
- what the frozen scan cannot vouch for is not taken from the live copy: pages now in a hole (dropped
  since), outside the followed mappings (unmapped, replaced, moved: such ranges are read whole in the
  freeze), or that the live copy could not read (those are read in the freeze).
The live scan consumes the dirty bits as the frozen one does: a dump that fails after it takes the
tracking out (ckpt/dump.py), as after a frozen scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np

from ckpt import ranges
from ckpt.memory import PageBuffer, page_digests, read_pages, zero_mask
from ckpt.proc.maps import PAGE_SIZE, Vma
from ckpt.track.base import tracked_vmas

# Pages the estimate (a scan that consumes nothing) must reach before `precopy=None` (auto) copies
# live: below it, the frozen copy of a few hundred pages costs well under a millisecond.
AUTO_MIN_PAGES = 256
MERGE_SLACK = 256  # pages

Filled = list["tuple[PageBuffer, int, np.ndarray]"]  # (buffer, first page, page addresses)


class Rows(PageBuffer):
    """Rows [start, start + npages) of another PageBuffer, as one of its own: the freeze copies into
    the free rows behind the live copy, so that both copies lie in one buffer and the merge is an
    order of rows, not a copy. Borrowed: closing it unmaps nothing, and no pool keeps it."""

    borrowed = True

    def __init__(self, whole: PageBuffer, start: int) -> None:  # (no super().__init__: no mapping)
        self.npages = whole.npages - start
        self.start = start
        self.addr = whole.addr + start * PAGE_SIZE
        self.view = whole.view[start * PAGE_SIZE :]

    def close(self) -> None:
        self.view.release()


@dataclass
class Gathered:
    """Pages in address order that lie at `rows` of one buffer (`pages`, (n, PAGE_SIZE) uint8), with
    their xxh3_64 digests and zero flags: the writer gathers them from there, once."""

    pages: np.ndarray
    rows: np.ndarray  # int64, one per address
    addrs: np.ndarray  # ascending
    digests: np.ndarray  # uint64, of each page as copied
    zero: np.ndarray  # bool


@dataclass
class PreCopied:
    """Pages copied while the process ran: row ``rows[i]`` of ``buf`` holds page ``addrs[i]``."""

    addrs: np.ndarray  # ascending
    buf: PageBuffer
    rows: np.ndarray  # int64
    failed: np.ndarray  # pages the live copy could not read: the freeze reads them instead
    scanned: np.ndarray  # pages the live scan reported (ascending)
    nbytes: int
    huge: int = 0  # of ``scanned``, pages the live scan reported as whole huge pages
    done: int = 0  # how many of ``addrs`` merged() has handed out
    buffers: list[PageBuffer] = field(default_factory=list)  # the merged buffers, closed with ours
    # Where merged() gathers when the freeze's copy did not all land in `tail` (it outgrew it, or
    # was streamed out of other buffers): taken then (rare: a fresh buffer faults in every page).
    out: PageBuffer | None = None
    # The live copy's digests and zero flags (per row of `buf`), computed while the process ran.
    digests: np.ndarray | None = None
    zero: np.ndarray | None = None
    # The free rows of `buf` behind the live copy, where the freeze copies (dump.py gives them to
    # its page reader first): in the final round of a migration the kept live pages and the
    # frozen ones then go to the writer as one order of rows, with no merge copy in the downtime.
    tail: Rows | None = None
    # keep()'s arguments until merged() applies them (keep(later=True): after the thaw).
    _keep: tuple[Any, ...] | None = None

    def keep(
        self,
        frozen_read: ranges.Pages,
        followed: Sequence[tuple[int, int]],
        whole: Sequence[tuple[int, int]],
        holes: np.ndarray | list[tuple[int, int]] | None,
        later: bool = False,
    ) -> None:
        """Keep only the pages whose live copy is their content at the freeze (module docstring):
        not read again in the freeze, inside the ranges the frozen scan followed, outside the ranges
        read whole and outside the holes it found. ``later``: only noted here, and done by the first
        merged() (a freeze that streams none of its copy out merges after the thaw: ~0.15 ms of
        numpy's first calls that the target need not wait for). The arguments are the freeze's and
        stay as they are."""
        if later:
            self._keep = (frozen_read, followed, whole, holes)
            return
        self._keep = None
        a = self.addrs
        ok = ranges.contains(a, list(followed)) & ~ranges.contains(a, list(whole))
        ok &= ~ranges.member(a, ranges.as_numpy(frozen_read)) & ~in_holes(a, holes)
        self.addrs = a[ok]
        self.rows = self.rows[ok]

    def _kept_now(self) -> None:
        """keep(later=True)'s work, if it waits."""
        if self._keep is not None:
            self.keep(*self._keep)

    def kept(self) -> int:
        """How many live pages the layer takes."""
        self._kept_now()
        return len(self.addrs)

    def merged(self, filled: Filled, upto: int | None) -> Filled | list[Gathered]:
        """The frozen copy's ``filled`` parts and the kept live pages below ``upto`` (all: None) not
        handed out yet, as one part in ascending order (the writer takes pages strictly ascending)."""
        self._kept_now()
        hi = len(self.addrs) if upto is None else int(np.searchsorted(self.addrs, np.uint64(upto)))
        live_a, live_r = self.addrs[self.done : hi], self.rows[self.done : hi]
        self.done = hi
        if not len(live_a):
            return filled
        parts = [(b, first, a) for b, first, a in filled if len(a)]
        if self.tail is not None and self.digests is not None and all(b is self.tail for b, _, _ in parts):
            return [self._ordered(live_a, live_r, parts)]
        if not parts and int(live_r[-1]) - int(live_r[0]) == len(live_r) - 1:
            return [(self.buf, int(live_r[0]), live_a)]  # one run of the live buffer: no copy
        addrs = np.concatenate([live_a, *(a for _, _, a in parts)])
        order = np.argsort(addrs, kind="stable")
        # Reused by each call: the caller processes (and drains) one merge before asking the next.
        if self.out is not None and self.out.npages >= len(addrs):
            out = self.out
        else:
            out = PageBuffer(len(addrs))
            self.buffers.append(out)
        dst = np.frombuffer(out.view, dtype=np.uint8).reshape(out.npages, PAGE_SIZE)
        pos = np.empty(len(addrs), np.int64)
        pos[order] = np.arange(len(addrs))
        src = np.frombuffer(self.buf.view, dtype=np.uint8).reshape(self.buf.npages, PAGE_SIZE)
        dst[pos[: len(live_a)]] = src[live_r]
        at = len(live_a)
        for b, first, a in parts:
            rows = np.frombuffer(b.view, dtype=np.uint8).reshape(b.npages, PAGE_SIZE)
            dst[pos[at : at + len(a)]] = rows[first : first + len(a)]
            at += len(a)
        return [(out, 0, addrs[order])]

    def _ordered(self, live_a: np.ndarray, live_r: np.ndarray, parts: Filled) -> Gathered:
        """The live pages and the frozen ones (all in `tail`) in address order, as rows of `buf`.
        Only the frozen pages are digested here (after the thaw); the live ones were, before."""
        assert self.tail is not None and self.digests is not None and self.zero is not None
        n = self.buf.npages
        whole = np.frombuffer(self.buf.view, dtype=np.uint8).reshape(n, PAGE_SIZE)
        rows = [live_r] + [
            np.arange(first, first + len(a), dtype=np.int64) + self.tail.start for _, first, a in parts
        ]
        digs = [self.digests[live_r]]
        zero = [self.zero[live_r]]
        for _, first, a in parts:
            view = self.tail.view[first * PAGE_SIZE : (first + len(a)) * PAGE_SIZE]
            digs.append(page_digests(view, len(a)))
            zero.append(zero_mask(view, len(a)))
        addrs = np.concatenate([live_a, *(a for _, _, a in parts)])
        order = np.argsort(addrs, kind="stable")
        return Gathered(
            whole,
            np.concatenate(rows)[order],
            addrs[order],
            np.concatenate(digs)[order],
            np.concatenate(zero)[order],
        )

    def close(self) -> None:
        if self.tail is not None:
            self.tail.close()
            self.tail = None
        for b in [self.buf, *self.buffers, *([self.out] if self.out is not None else [])]:
            b.close()
        self.buffers = []
        self.out = None


def in_holes(a: np.ndarray, holes: np.ndarray | list[tuple[int, int]] | None) -> np.ndarray:
    """Which of pages ``a`` lie in the frozen scan's holes ([start, end) rows, any order; a small
    dump's are a list)."""
    if holes is None or not len(holes):
        return np.zeros(len(a), bool)
    if isinstance(holes, list):
        holes = np.array(holes, dtype=np.uint64).reshape(-1, 2)
    h = holes[np.argsort(holes[:, 0], kind="stable")]
    return ranges.in_spans(a, h[:, 0], h[:, 1])


def copy_live(pid: int, scanned: np.ndarray, huge: int = 0) -> PreCopied:
    """Copy ``scanned`` (pages a live scan reported and re-armed) while the process runs."""
    pages = ranges.as_set(scanned)
    # Room behind the live copy for what the freeze reads (written since the live scan): as many
    # again as were scanned (a loaded machine stretches the time from the live scan to the freeze:
    # half as many overflowed at 1 GiB, load 13); more goes to the dump's own buffers and is merged
    # by a copy. (The merge buffer this replaces took 1.5x.)
    buf = PageBuffer(2 * len(pages) + MERGE_SLACK)
    rr = read_pages(pid, pages, buf, 0)
    n = len(rr.addrs)
    rows = np.arange(n, dtype=np.int64)
    # Digested while the process runs: the downtime digests only what the freeze copies.
    live = buf.view[: n * PAGE_SIZE]
    digests, zero = page_digests(live, n), zero_mask(live, n)
    pre = PreCopied(rr.addrs, buf, rows, rr.failed, pages, rr.nbytes, huge, digests=digests, zero=zero)
    pre.tail = Rows(buf, n)
    return pre


def followed_spans(vmas: Sequence[Vma]) -> list[tuple[int, int]]:
    """The mappings a tracker follows (tracked_vmas), as merged ranges."""
    return ranges.merge([(v.start, v.end) for v in tracked_vmas(vmas)])
