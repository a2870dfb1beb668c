"""A layer on the wire while it is written: the source's LayerWriter tees every byte into frames,
the destination stores them as they arrive and hands each chunk to the warm restore at once.

    LAYER {name, round, final}
    DATA ...                        header
    PAGES (offset, clen, npages, raw, addresses)  DATA ...   one chunk, as many times as it has
    DATA ...                        metadata and footer
    END {xxh3_128, size}

A chunk's bytes are applied to the stopped restore helper before the layer's metadata has arrived.
That is safe because nothing runs before the whole layer is checked: at END the destination opens
the layer (every record validated) and compares each chunk it applied with the layer's own chunk
records (offset, length, rawness, checksum of the stored bytes and of the pages) and its page
addresses with the layer's index; any difference ends the migration (the helper is killed)."""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from ckpt.errors import CkptError
from ckpt.image import Layer
from ckpt.image.format import ADDR_LIMIT, FOOTER_MAGIC, FOOTER_SIZE, MAX_CHUNK_PAGES, PAGE_SIZE
from ckpt.lightstd import zstandard  # (without its import of platform)
from ckpt.migrate import wire
from ckpt.migrate.throttle import TokenBucket
from ckpt.migrate.timeline import mark

_CHUNK = struct.Struct("<QQIB3x")  # file offset, stored length, pages, raw
MAX_LAYER_BYTES = 1 << 40
FREE_CHECK = 64 << 20  # bytes received between two checks of the free space


class ChunkBuffers:
    """Chunk buffers given back once their pages are in the restore helper (or not wanted), for
    the next chunks: a fresh MiB bytearray is zero-filled first, which faults in its 256 pages
    (~0.4-0.7 ms of the receiving thread per MiB here). Shared by the receiving thread and the warm
    restore's (deque's append and pop are atomic; a race only costs a fresh buffer).

    A compressed stream's chunks all differ in size, so a chunk takes any free buffer at least as
    long as it and at most twice (the smallest such), and holds a view of exactly its own length
    (`Arrived.stored`): nothing is resized (a bytearray still viewed by the receive loop cannot
    be), and a small chunk does not hold a big buffer that the next big chunk would need."""

    KEEP = 8

    def __init__(self) -> None:
        self._free: deque[bytearray] = deque()

    def get(self, n: int) -> bytearray:
        """A buffer of at least n bytes (at most 2n when reused)."""
        fits = [b for b in list(self._free) if n <= len(b) <= 2 * n]
        if fits:
            best = min(fits, key=len)
            with contextlib.suppress(ValueError):  # (taken meanwhile by the other thread)
                self._free.remove(best)
                return best
        return bytearray(n)

    def put(self, b: bytearray) -> None:
        if len(self._free) < self.KEEP:
            self._free.append(b)


BUFFERS = ChunkBuffers()


@dataclass
class Arrived:
    """One chunk as it came off the wire."""

    offset: int
    clen: int
    npages: int
    raw: bool
    addrs: np.ndarray
    stored: bytes | bytearray | memoryview  # a view of exactly clen bytes of a reused buffer
    xxh3: int = 0  # of the stored bytes, taken on arrival
    pxxh3: int | None = None  # of the pages, taken when they were written into the helper
    applied: bool = False
    helper: int = -1  # which restore helper it went into (WarmRestore.gen)

    def release(self) -> None:
        """The stored bytes are no longer needed (the file holds them): their buffer is reused."""
        b, self.stored = self.stored, b""
        base = b.obj if isinstance(b, memoryview) else b  # (a view of the buffer: the buffer)
        if isinstance(base, bytearray):
            BUFFERS.put(base)

    def pages_bytes(self) -> bytes | bytearray | memoryview:
        """The chunk's pages, decompressed into exactly npages pages (never a frame's own say)."""
        want = self.npages * PAGE_SIZE
        if self.raw:
            return self.stored
        try:
            if zstandard.frame_content_size(self.stored) != want:
                raise wire.ProtocolError(f"chunk at offset {self.offset} declares another size")
            data = zstandard.ZstdDecompressor().decompress(
                self.stored, max_output_size=want, allow_extra_data=False
            )
        except zstandard.ZstdError as e:
            raise wire.ProtocolError(f"chunk at offset {self.offset} is not a zstd frame ({e})") from None
        if len(data) != want:
            raise wire.ProtocolError(f"chunk at offset {self.offset} decompressed to {len(data)} bytes")
        return data


class StreamOut:
    """The source's side: a LayerWriter tee that frames the layer as it is written."""

    def __init__(self, ch: wire.Channel, bucket: TokenBucket | None, name: str, index: int, final: bool):
        self.ch, self.bucket, self.name = ch, bucket, name
        self.index, self.final = index, final
        # The stream's own check (accidents on the way; the peer is authenticated, and the chunks
        # are compared with the layer's records): xxh3, ~20x cheaper than the SHA-256 it replaced.
        self.h = xxhash.xxh3_128()
        self.size = 0
        self.started = False
        self.ended = False
        # Called once END is out: from then on this thread sends nothing, so another may use the
        # connection (a TLS connection must not be read and written by two threads at once).
        self.on_end: Callable[[], None] | None = None
        self.t_first = 0.0  # the first chunk: the header goes out before the freeze
        self.sent_before = ch.sent

    def __call__(self, b: memoryview, chunk: tuple[np.ndarray, bool] | None) -> None:
        if not self.started:
            mark(f"src layer-start {self.name}")
            self.ch.send_obj(wire.LAYER, {"name": self.name, "round": self.index, "final": self.final})
            self.started = True
        if chunk is not None:
            if not self.t_first:
                self.t_first = time.perf_counter()
            addrs, raw = chunk
            a = np.ascontiguousarray(addrs, dtype="<u8")
            self.ch.send(wire.PAGES, _CHUNK.pack(self.size, len(b), len(a), raw) + a.tobytes())
        self.h.update(b)
        # Whole chunks in one frame (1 MiB) unless a token bucket paces the link: each frame costs
        # both sides a header, a Python step and a few syscalls; the bucket wants small takes.
        step = wire.DATA_CHUNK if self.bucket is not None else wire.MAX_DATA
        for i in range(0, len(b), step):
            part = b[i : i + step]
            if self.bucket is not None:
                self.bucket.take(len(part) + 8)
            self.ch.send(wire.DATA, part)
        self.size += len(b)
        if chunk is None and len(b) == FOOTER_SIZE and bytes(b[:8]) == FOOTER_MAGIC:
            # The footer is the layer's last write: END goes now, before the writer's fsync and
            # publish of the staging copy (the destination need not wait for those).
            self.end()

    def end(self) -> int:
        """END (once); the bytes this layer put on the wire."""
        if not self.t_first:
            self.t_first = time.perf_counter()
        if not self.ended:
            self.ch.send_obj(wire.END, {"xxh3_128": self.h.hexdigest(), "size": self.size})
            mark(f"src end-sent {self.name}")
            self.ended = True
            if self.on_end is not None:
                self.on_end()
        return self.ch.sent - self.sent_before


class Aborted(CkptError):
    """The source gave up."""


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def receive_layer(
    ch: wire.Channel,
    directory: Path,
    name: str,
    on_chunk: Callable[[Arrived], bool] | None,
    sync: bool = True,
) -> tuple[Path, list[Arrived], int]:
    """Store a streamed layer under a temporary name in DIR (0600, O_EXCL), each chunk handed to
    `on_chunk` as it completes (which says whether it took the bytes); (the temporary path, the
    chunks, the size). `sync`: fsync it (the final layer is synced after the restore: the
    downtime need not wait for the disk)."""
    mark(f"dst layer-start {name}")
    part = directory / f".{name}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    ok = False
    chunks: list[Arrived] = []
    try:
        h = xxhash.xxh3_128()
        got = 0
        next_check = 0
        cur: Arrived | None = None
        buf = bytearray()
        filled = 0
        while True:
            # A chunk's frames are received straight into its buffer (no copy from a frame's own).
            into = memoryview(buf)[filled : cur.clen] if cur is not None else None
            msg = ch.expect(wire.DATA, wire.PAGES, wire.END, wire.ABORT, into=into)
            if msg.type == wire.ABORT:
                raise Aborted(f"the source aborted the migration: {str(msg.obj().get('reason', ''))[:200]}")
            if msg.type == wire.END:
                if cur is not None:
                    raise wire.ProtocolError(f"layer {name} ended inside a chunk")
                break
            if msg.type == wire.PAGES:
                if cur is not None:
                    raise wire.ProtocolError(f"layer {name}: a chunk began inside another")
                cur = _chunk_header(msg.body, got, name)
                buf = BUFFERS.get(cur.clen)  # (bounded by _chunk_header) filled as the frames come
                filled = 0
                continue
            body = msg.body
            if got + len(body) > MAX_LAYER_BYTES:
                raise wire.ProtocolError(f"layer {name} is longer than {MAX_LAYER_BYTES} bytes")
            if got + len(body) >= next_check:
                if got + len(body) + FREE_CHECK > _free_bytes(directory):
                    raise CkptError(f"layer {name} does not fit into {directory}")
                next_check = got + len(body) + FREE_CHECK
            h.update(body)
            view = rest = memoryview(body)
            while rest:
                rest = rest[os.write(fd, rest) :]
            got += len(body)
            if cur is not None:
                n = min(len(body), cur.clen - filled)  # what follows the chunk is the file's, not its
                if not isinstance(body, memoryview):  # (else it was received in place)
                    buf[filled : filled + n] = view[:n]
                filled += n
                if filled == cur.clen:
                    cur.stored = memoryview(buf)[: cur.clen]
                    cur.xxh3 = xxhash.xxh3_64_intdigest(cur.stored)
                    chunks.append(cur)
                    if on_chunk is None or not on_chunk(cur):
                        cur.release()  # not taken: the file has it (keep no layer in memory)
                    cur = None
        mark(f"dst end-received {name}")
        end = msg.obj()
        if end.get("size") != got:
            raise wire.ProtocolError(f"layer {name} ended after {got} bytes, not {end.get('size')!r}")
        if end.get("xxh3_128") != h.hexdigest():
            raise wire.ProtocolError(f"layer {name} arrived damaged (its checksum differs)")
        if sync:
            os.fsync(fd)
        ok = True
    finally:
        os.close(fd)
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
    return part, chunks, got


def _chunk_header(body: bytes | bytearray | memoryview, at: int, name: str) -> Arrived:
    if len(body) < _CHUNK.size:
        raise wire.ProtocolError(f"layer {name}: short chunk header")
    offset, clen, npages, raw = _CHUNK.unpack_from(body)
    if offset != at:
        raise wire.ProtocolError(f"layer {name}: a chunk said offset {offset}, the stream is at {at}")
    if not 1 <= npages <= MAX_CHUNK_PAGES or raw not in (0, 1):
        raise wire.ProtocolError(f"layer {name}: chunk of {npages} pages is out of bounds")
    if not 0 < clen <= npages * PAGE_SIZE + 4096 or (raw and clen != npages * PAGE_SIZE):
        raise wire.ProtocolError(f"layer {name}: chunk length {clen} is out of bounds")
    if len(body) != _CHUNK.size + 8 * npages:
        raise wire.ProtocolError(f"layer {name}: chunk header of {len(body)} bytes for {npages} pages")
    a = np.frombuffer(body, dtype="<u8", offset=_CHUNK.size).astype(np.uint64)
    if bool((a & np.uint64(PAGE_SIZE - 1)).any()) or int(a[-1]) >= ADDR_LIMIT:
        raise wire.ProtocolError(f"layer {name}: chunk addresses are not pages of user space")
    if len(a) > 1 and not bool((a[1:] > a[:-1]).all()):
        raise wire.ProtocolError(f"layer {name}: chunk addresses do not ascend")
    return Arrived(offset, clen, npages, bool(raw), a, b"")


def check_arrived(layer: Layer, chunks: list[Arrived]) -> None:
    """The chunks that were applied early are the layer's own: same place, bytes and pages."""
    recs = layer.pages.chunks
    if len(recs) != len(chunks):
        raise wire.ProtocolError(f"{layer.path.name}: {len(chunks)} chunks streamed, {len(recs)} recorded")
    first = 0
    data = layer.pages.data
    for i, (r, c) in enumerate(zip(recs, chunks, strict=True)):
        same = (r.offset, r.clen, r.npages, r.raw, r.xxh3) == (c.offset, c.clen, c.npages, c.raw, c.xxh3)
        if not same or (c.applied and r.pxxh3 is not None and r.pxxh3 != c.pxxh3):
            raise wire.ProtocolError(f"{layer.path.name}: chunk {i} differs from what was streamed")
        if not np.array_equal(data[first : first + r.npages], c.addrs):
            raise wire.ProtocolError(f"{layer.path.name}: chunk {i}'s pages differ from what was streamed")
        first += r.npages
