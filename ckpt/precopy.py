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

import numpy as np

from ckpt import ranges
from ckpt.memory import PageBuffer, read_pages
from ckpt.proc.maps import PAGE_SIZE, Vma
from ckpt.track.base import tracked_vmas

# Pages the estimate (a scan that consumes nothing) must reach before `precopy=None` (auto) copies
# live: below it, the frozen copy of a few hundred pages costs well under a millisecond.
AUTO_MIN_PAGES = 256
MERGE_SLACK = 256  # pages

Filled = list[tuple[PageBuffer, int, np.ndarray]]  # (buffer, first page, page addresses)


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
    # Where merged() gathers, faulted in with the live copy, out of the freeze: a fresh buffer
    # after the thaw faulted ~9000 pages (20-50 ms at 1 GiB writing 1% per 100 ms) in the final
    # round of a migration, before its first chunk went out (the downtime).
    out: PageBuffer | None = None

    def keep(
        self,
        frozen_read: np.ndarray,
        followed: Sequence[tuple[int, int]],
        whole: Sequence[tuple[int, int]],
        holes: np.ndarray | None,
    ) -> None:
        """Keep only the pages whose live copy is their content at the freeze (module docstring):
        not read again in the freeze, inside the ranges the frozen scan followed, outside the ranges
        read whole and outside the holes it found."""
        a = self.addrs
        ok = ranges.contains(a, list(followed)) & ~ranges.contains(a, list(whole))
        ok &= ~ranges.member(a, frozen_read) & ~in_holes(a, holes)
        self.addrs = a[ok]
        self.rows = self.rows[ok]

    def merged(self, filled: Filled, upto: int | None) -> Filled:
        """The frozen copy's ``filled`` parts and the kept live pages below ``upto`` (all: None) not
        handed out yet, as one part in ascending order (the writer takes pages strictly ascending)."""
        hi = len(self.addrs) if upto is None else int(np.searchsorted(self.addrs, np.uint64(upto)))
        live_a, live_r = self.addrs[self.done : hi], self.rows[self.done : hi]
        self.done = hi
        if not len(live_a):
            return filled
        parts = [(b, first, a) for b, first, a in filled if len(a)]
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

    def close(self) -> None:
        for b in [self.buf, *self.buffers, *([self.out] if self.out is not None else [])]:
            b.close()
        self.buffers = []
        self.out = None


def in_holes(a: np.ndarray, holes: np.ndarray | None) -> np.ndarray:
    """Which of pages ``a`` lie in the frozen scan's holes ([start, end) rows, any order)."""
    if holes is None or not len(holes):
        return np.zeros(len(a), bool)
    h = holes[np.argsort(holes[:, 0], kind="stable")]
    return ranges.in_spans(a, h[:, 0], h[:, 1])


def copy_live(pid: int, scanned: np.ndarray, huge: int = 0) -> PreCopied:
    """Copy ``scanned`` (pages a live scan reported and re-armed) while the process runs."""
    pages = ranges.as_set(scanned)
    buf = PageBuffer(len(pages))
    rr = read_pages(pid, pages, buf, 0)
    rows = np.arange(len(rr.addrs), dtype=np.int64)
    # The merge holds the kept live pages and those the freeze reads again (written since the live
    # scan): room for half as many again as were scanned; a larger merge takes a buffer of its own.
    out = PageBuffer(len(pages) + len(pages) // 2 + MERGE_SLACK)
    return PreCopied(rr.addrs, buf, rows, rr.failed, pages, rr.nbytes, huge, out=out)


def followed_spans(vmas: Sequence[Vma]) -> list[tuple[int, int]]:
    """The mappings a tracker follows (tracked_vmas), as merged ranges."""
    return ranges.merge([(v.start, v.end) for v in tracked_vmas(vmas)])
