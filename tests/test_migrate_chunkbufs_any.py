"""Chunk buffers reused for chunks of another size (ckpt/migrate/stream.py `ChunkBuffers.get`): a
compressed stream's chunks all differ in size, so a buffer given back carries any later chunk at
least half its length (the chunk holds a view of exactly its own bytes); a small chunk gets a fresh
buffer and leaves the big one for the next big chunk. What arrives is still exactly what was sent."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import xxhash
import zstandard

from ckpt.image.writer import LayerWriter
from ckpt.migrate import wire
from ckpt.migrate.stream import BUFFERS, Arrived, ChunkBuffers, StreamOut, receive_layer

PAGE = 4096


def test_any_big_enough_buffer_is_taken() -> None:
    cb = ChunkBuffers()
    big = bytearray(1 << 20)
    cb.put(big)
    assert cb.get(600_000) is big  # longer, at most twice: taken (the chunk views its part)
    cb.put(big)
    small = cb.get(4096)  # would hold a MiB for a page: a fresh one, the big one stays
    assert small is not big and len(small) == 4096 and list(cb._free) == [big]
    assert cb.get((1 << 20) + 1) is not big and list(cb._free) == [big]  # too short
    mid = bytearray(700_000)
    cb.put(mid)
    assert cb.get(650_000) is mid  # the shortest that fits
    assert cb.get(1 << 20) is big


def test_compressed_chunks_reuse_buffers(tmp_path: Path) -> None:
    """Chunks of 256 pages whose compressed sizes all differ (each page k random bytes then
    zeros, k growing): given back at once, later chunks land in earlier buffers."""
    BUFFERS._free.clear()
    nchunks = 8
    n = 256 * nchunks
    rng = np.random.default_rng(11)
    pages = np.zeros((n, PAGE), dtype=np.uint8)
    for i in range(n):
        k = 2600 - (i // 256) * 40  # shrinking: each chunk fits the buffer of the one before
        pages[i, :k] = rng.integers(0, 255, size=k, dtype=np.uint8)
    addrs = (np.arange(n, dtype=np.uint64) + 0x1000) * PAGE
    a, b = socket.socketpair()
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()

    def send() -> None:
        ch = wire.Channel(a)
        out = StreamOut(ch, None, "layer-0001.ckpt", 0, False)
        with LayerWriter(src, "layer-0001.ckpt", tee=out, keep_chunks=False, compress=True) as w:
            w.add_rows(addrs, pages, np.arange(n), None)
            w.drain()
            out.end()
            w.abort()

    got: list[tuple[int, int, bytes]] = []
    buffers: set[int] = set()

    def take(c: Arrived) -> bool:
        assert not c.raw
        assert isinstance(c.stored, memoryview) and isinstance(c.stored.obj, bytearray)
        assert len(c.stored) == c.clen
        buffers.add(id(c.stored.obj))
        got.append((c.npages, len(c.stored), bytes(c.pages_bytes())))
        c.release()
        return True

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        ch = wire.Channel(b)
        assert ch.expect(wire.LAYER).obj()["name"] == "layer-0001.ckpt"
        part, chunks, _ = receive_layer(ch, dst, "layer-0001.ckpt", take, sync=False)
    finally:
        b.close()
        t.join(60)
        a.close()
    sizes = [g[1] for g in got]
    assert len(set(sizes)) == nchunks, sizes  # every chunk of its own size
    assert len(buffers) < nchunks, (sizes, len(buffers))  # and still buffers were reused
    assert b"".join(g[2] for g in got) == pages.tobytes()
    data = part.read_bytes()
    for c, (_, clen, pg) in zip(chunks, got, strict=True):
        stored = data[c.offset : c.offset + c.clen]
        assert len(stored) == clen
        assert zstandard.ZstdDecompressor().decompress(stored) == pg
        assert xxhash.xxh3_64_intdigest(stored) == c.xxh3
