"""LayerWriter.add_batch: a full dump's copy buffer handed over whole, zero detection, gathering,
compression and digests done on the pool. The layer must hold exactly the non-zero pages, in
address order, with right digests and checksums, raw chunks included, whatever the mix of calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckpt.image.writer as writer_mod
from ckpt.image import Layer
from ckpt.image.format import Inventory, LayerMeta, VmaRecord, page_digests
from ckpt.image.writer import LayerWriter

P = 4096
BASE = 0x10000000


def pg(i: int) -> int:
    return BASE + i * P


def anon(n: int) -> VmaRecord:
    return VmaRecord(start=BASE, end=BASE + n * P, perms="rw-p", offset=0, dev="00:00", inode=0, path="")


def _pages(n: int, seed: int) -> np.ndarray:
    """n pages: zero, random (incompressible: raw chunks), text-like, in runs of 1 to 300 pages."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, P), np.uint8)
    kind = np.repeat(rng.integers(0, 3, n), rng.integers(1, 300, n))[:n]
    for i in range(n):
        if kind[i] == 1:
            out[i] = rng.integers(0, 256, P, dtype=np.uint8)
        elif kind[i] == 2:
            out[i] = np.frombuffer((b"page %08d " % i) * (P // 14) + b"\0" * (P % 14), np.uint8)
    return out


@pytest.mark.parametrize("chunk_pages", [1, 4, 256])
def test_add_batch_stores_the_nonzero_pages_exactly(tmp_path: Path, chunk_pages: int) -> None:
    n = 700
    pages = _pages(n, chunk_pages)
    zero = ~pages.any(axis=1)
    seen_zero: list[np.ndarray] = []
    stored = [0]

    def done(z: np.ndarray, k: int) -> None:
        seen_zero.append(z)
        stored[0] += k

    with LayerWriter(tmp_path, "l.ckpt", chunk_pages=chunk_pages, threads=2) as w:
        # add_pages before, batches of uneven sizes (partial chunks at their ends), add_rows after.
        first = 3
        w.add_pages(np.array([pg(i) for i in range(first) if not zero[i]], np.uint64),
                    pages[:first][~zero[:first]].tobytes())  # fmt: skip
        pos = first
        for size in (1, 37, 200, 5, 300):
            addrs = np.array([pg(i) for i in range(pos, pos + size)], np.uint64)
            w.add_batch(addrs, pages[pos : pos + size], done)
            pos += size
        rows = np.flatnonzero(~zero[pos:])
        w.add_rows(np.array([pg(pos + int(r)) for r in rows], np.uint64), pages[pos:], rows)
        w.drain()
        pages_before = pages.copy()
        pages[:] = 0xEE  # the caller may reuse its buffer once drain() returned
        path = w.finish(LayerMeta(Inventory(pid=1), vmas=[anon(n)]))
    want = [i for i in range(n) if not zero[i]]
    batch_zero = [i for i in range(first, pos) if zero[i]]
    assert np.array_equal(np.concatenate(seen_zero), np.array([pg(i) for i in batch_zero], np.uint64))
    assert stored[0] == sum(1 for i in range(first, pos) if not zero[i])
    with Layer.open(path) as layer:
        assert np.array_equal(layer.pages.data, np.array([pg(i) for i in want], np.uint64))
        assert np.array_equal(layer.pages.digests, page_digests(pages_before[want].tobytes()))
        assert any(c.raw for c in layer.pages.chunks) and not all(c.raw for c in layer.pages.chunks)
        layer.verify()
        for i in want:
            assert layer.read_page(pg(i)) == pages_before[i].tobytes()


def test_add_batch_bounds_what_is_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many batches are handed over, at most BATCHES_PER_THREAD per thread wait unwritten."""
    n = 64
    pages = _pages(n, 7)
    with LayerWriter(tmp_path, "l.ckpt", chunk_pages=4, threads=2) as w:
        for i in range(n):
            w.add_batch(np.array([pg(i)], np.uint64), pages[i : i + 1], lambda z, k: None)
            batches = sum(1 for e in w._inflight if e[1] is None)
            assert batches <= writer_mod.BATCHES_PER_THREAD * 2
        path = w.finish(LayerMeta(Inventory(pid=1), vmas=[anon(n)]))
    with Layer.open(path) as layer:
        layer.verify()
        assert len(layer.pages.data) == int(pages.any(axis=1).sum())


def test_add_batch_checks_its_input(tmp_path: Path) -> None:
    pages = _pages(4, 1)
    with LayerWriter(tmp_path, "l.ckpt") as w:
        with pytest.raises(ValueError, match="uint8"):
            w.add_batch(np.array([pg(i) for i in range(4)], np.uint64), pages[:3], lambda z, k: None)
        w.add_batch(np.array([pg(i) for i in range(2, 6)], np.uint64), pages, lambda z, k: None)
        with pytest.raises(ValueError, match="does not come after"):
            w.add_batch(np.array([pg(1)], np.uint64), pages[:1], lambda z, k: None)
