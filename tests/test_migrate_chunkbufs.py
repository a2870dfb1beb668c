"""A streamed layer received into reused chunk buffers (ckpt/migrate/stream.py `ChunkBuffers`): every
frame of a chunk goes straight into its buffer, a buffer given back (as the warm restore does once a
chunk is in the helper) carries the next chunk, and what arrives is exactly what was sent, with and
without a token bucket's smaller frames."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import xxhash

from ckpt.image.writer import LayerWriter
from ckpt.migrate import wire
from ckpt.migrate.stream import BUFFERS, Arrived, StreamOut, receive_layer
from ckpt.migrate.throttle import TokenBucket

PAGE = 4096


@pytest.mark.parametrize("bucket", [False, True])
def test_chunks_arrive_whole_through_reused_buffers(tmp_path: Path, bucket: bool) -> None:
    n = 256 * 6 + 17  # six whole chunks and a short one
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 255, size=(n, PAGE), dtype=np.uint8)
    addrs = (np.arange(n, dtype=np.uint64) * 3 + 0x1000) * PAGE
    a, b = socket.socketpair()
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    sent: list[int] = []

    def send() -> None:
        ch = wire.Channel(a)
        out = StreamOut(ch, TokenBucket(1e9) if bucket else None, "layer-0001.ckpt", 0, False)
        with LayerWriter(src, "layer-0001.ckpt", tee=out, keep_chunks=False, compress=False) as w:
            w.add_rows(addrs, pages, np.arange(n), None)
            w.drain()
            out.end()
            w.abort()
        sent.append(out.size)

    got: list[tuple[int, np.ndarray, int]] = []
    buffers: set[int] = set()

    def take(c: Arrived) -> bool:
        buffers.add(id(getattr(c.stored, "obj", c.stored)))  # (a view of the reused buffer)
        got.append((c.npages, c.addrs, xxhash.xxh3_64_intdigest(c.stored)))
        c.release()  # given back at once: the next chunk of the same size may land in it
        return True

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        ch = wire.Channel(b)
        assert ch.expect(wire.LAYER).obj()["name"] == "layer-0001.ckpt"
        part, chunks, size = receive_layer(ch, dst, "layer-0001.ckpt", take, sync=False)
    finally:
        b.close()  # (a sender blocked on a full socket gets an error, never a hang)
        t.join(60)
        a.close()
    assert size == sent[0] and part.stat().st_size == size
    assert [g[0] for g in got] == [256] * 6 + [17]
    assert np.array_equal(np.concatenate([g[1] for g in got]), addrs)
    at = 0
    for npages, _, h in got:
        assert h == xxhash.xxh3_64_intdigest(pages[at : at + npages].tobytes())
        at += npages
    # Each stored chunk is in the file where its record says.
    data = part.read_bytes()
    at = 0
    for c in chunks:
        assert data[c.offset : c.offset + c.clen] == pages[at : at + c.npages].tobytes()
        at += c.npages
    assert len(buffers) < 6  # whole chunks reused a buffer given back
    assert len(BUFFERS._free) <= BUFFERS.KEEP
