"""The streamed layer format of a migration (ckpt/migrate/stream.py): a real layer sent through the
source's tee and received on a real socket pair stores byte for byte the same file; chunks applied
early are checked against the layer's own records; a stream that lies is refused."""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ckpt.dump import dump
from ckpt.image import Layer
from ckpt.migrate import wire
from ckpt.migrate.stream import Arrived, StreamOut, check_arrived, receive_layer
from tests.util import Target


def _send_layer(ch: wire.Channel, path: Path) -> None:
    """Frame an existing layer as the source's tee does: header, each chunk with its PAGES
    frame, metadata and footer."""
    layer = Layer.open(path)
    data = path.read_bytes()
    out = StreamOut(ch, None, path.name, 0, False)
    pos = 64
    out(memoryview(data[:64]), None)
    first = 0
    for c in layer.pages.chunks:
        addrs = layer.pages.data[first : first + c.npages]
        out(memoryview(data[c.offset : c.offset + c.clen]), (addrs, c.raw))
        first += c.npages
        pos = c.offset + c.clen
    out(memoryview(data[pos:-48]), None)  # the metadata
    out(memoryview(data[-48:]), None)  # the footer, written alone: END goes with it
    layer.close()


def test_streamed_layer_arrives_whole(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t: Target = spawn("rounds", "512")
    t.cmd("round")
    dump(t.pid, tmp_path / "src", pre_dump=True)
    src = tmp_path / "src" / "layer-0001.ckpt"
    dst = tmp_path / "dst"
    dst.mkdir(mode=0o700)
    a, b = socket.socketpair()
    b.settimeout(60)  # a stream that never ends fails the test instead of hanging it
    got: list[Arrived] = []
    sender = threading.Thread(target=_send_layer, args=(wire.Channel(a), src))
    sender.start()
    rc = wire.Channel(b)
    assert rc.expect(wire.LAYER).obj()["name"] == src.name
    part, chunks, size = receive_layer(rc, dst, src.name, lambda c: got.append(c) or True)
    sender.join()
    assert part.read_bytes() == src.read_bytes() and size == src.stat().st_size
    assert (part.stat().st_mode & 0o777) == 0o600
    layer = Layer.open(part)
    check_arrived(layer, chunks)  # the same chunks, place, bytes and pages
    assert sum(c.npages for c in got) == len(layer.pages.data) > 0
    # Each chunk's bytes decode to the layer's own pages.
    first = 0
    for i, c in enumerate(chunks):
        assert c.pages_bytes() == layer.read_chunk(i)
        first += c.npages
    # A chunk that claims other pages, or other bytes, than the layer records is refused.
    bad = [dataclasses.replace(c) for c in chunks]
    bad[0].addrs = bad[0].addrs.copy()
    bad[0].addrs[0] += np.uint64(4096 * 100000)
    with pytest.raises(wire.ProtocolError, match="pages differ"):
        check_arrived(layer, bad)
    bad = [dataclasses.replace(c) for c in chunks]
    bad[-1].xxh3 ^= 1
    with pytest.raises(wire.ProtocolError, match="differs from what was streamed"):
        check_arrived(layer, bad)
    with pytest.raises(wire.ProtocolError, match="chunks streamed"):
        check_arrived(layer, chunks[:-1])
    layer.close()


_CHUNK = struct.Struct("<QQIB3x")
ONE = _CHUNK.pack(0, 4096, 1, 1) + struct.pack("<Q", 0x10000)  # a valid header of a raw 1-page chunk


@pytest.mark.parametrize(
    "frames,why",
    [
        ([(wire.PAGES, _CHUNK.pack(5, 4096, 1, 1) + struct.pack("<Q", 0x10000))], "offset"),
        (
            [(wire.PAGES, _CHUNK.pack(0, 4096, 2, 1) + struct.pack("<QQ", 0x20000, 0x10000))],
            "out of bounds|ascend",
        ),
        ([(wire.PAGES, _CHUNK.pack(0, 8192, 2, 1) + struct.pack("<QQ", 0x20000, 0x10000))], "ascend"),
        ([(wire.PAGES, _CHUNK.pack(0, 4096, 1, 1) + struct.pack("<Q", 0x10001))], "not pages"),
        ([(wire.PAGES, _CHUNK.pack(0, 4096, 1, 1) + struct.pack("<Q", 1 << 47))], "not pages"),
        ([(wire.PAGES, _CHUNK.pack(0, 1 << 30, 1, 0) + struct.pack("<Q", 0x10000))], "length"),
        ([(wire.DATA, b"x" * 10), (wire.END, b'{"sha256": "00", "size": 10}')], "damaged"),
        ([(wire.DATA, b"x" * 10), (wire.END, b'{"sha256": "00", "size": 11}')], "ended after"),
        (
            [(wire.PAGES, _CHUNK.pack(0, 4096, 1, 1) + struct.pack("<Q", 0x10000)), (wire.END, b"{}")],
            "inside a chunk",
        ),
    ],
    ids=["offset", "count", "order", "unaligned", "kernel", "length", "digest", "size", "truncated"],
)
def test_lying_stream_is_refused(tmp_path: Path, frames: list[tuple[int, bytes]], why: str) -> None:
    a, b = socket.socketpair()
    b.settimeout(60)
    src = wire.Channel(a)
    for t, body in frames:
        src.send(t, body)
    with pytest.raises(wire.ProtocolError, match=why):
        receive_layer(wire.Channel(b), tmp_path, "layer-0001.ckpt", None)
    assert not list(tmp_path.iterdir())  # nothing half-written is left
