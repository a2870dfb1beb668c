"""The fixed-size header and footer, and the metadata blob between the chunks and the footer.

Parsing raises CorruptLayer/VersionError naming the layer and the part; the caller passes the path
only for the messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import xxhash

from ckpt.errors import CorruptLayer, LayerError, VersionError
from ckpt.image.format import (
    DEFAULT_CHUNK_PAGES,
    FOOTER_MAGIC,
    FOOTER_SIZE,
    FORMAT_VERSION,
    HEADER_MAGIC,
    HEADER_SIZE,
    MAX_CHUNK_PAGES,
    PAGE_SIZE,
    READ_VERSIONS,
    versions_read,
)
from ckpt.lightstd import zstandard  # (without its import of platform)

# magic, version, header_size, page_size, chunk_pages, 24 reserved bytes; then xxh3_64 of all that.
_HEADER = struct.Struct("<8sIIQQ24s")
_FOOTER = struct.Struct("<8sQQ16s")
_U64 = struct.Struct("<Q")
# Any version's header starts with magic, version and header_size, and ends with the xxh3_64 of
# the bytes before it; so a damaged header is told apart from one of a newer version.
STABLE_PREFIX = 16
MAX_HEADER_SIZE = 4096
# Untrusted sizes: metadata is read whole and decompressed whole, so both are capped. The ratio
# cap stops a small hostile frame from expanding into gigabytes; real metadata (mostly u64 arrays
# and digests) compresses far less than 256:1.
MAX_META_BYTES = 1 << 31
META_RATIO = 256
META_FLOOR = 64 << 20
# What the decoded metadata may build. Bytes alone do not bound it: 64 MiB of one-byte empty maps
# is 64 M dicts (4.8 GB). Real metadata holds few objects per compressed byte (page lists are bin
# blobs; a 200k-fd layer is ~1.3 objects per byte); a hostile layer gets at most
# META_OBJECTS_PER_BYTE x its compressed size, and never more than the floor on a small layer.
META_OBJECTS_FLOOR = 1 << 20
META_OBJECTS_PER_BYTE = 16
# One container is built whole before its hook runs, so its length is capped on its own: 2 M
# entries is twice the most fds a process can have (fs.nr_open's default, 2^20).
META_MAX_CONTAINER = 1 << 21
META_MAX_STR = 1 << 16  # validate.MAX_STR

assert _HEADER.size + 8 == HEADER_SIZE and _FOOTER.size + 8 == FOOTER_SIZE


@dataclass(frozen=True)
class Header:
    version: int = FORMAT_VERSION
    header_size: int = HEADER_SIZE
    page_size: int = PAGE_SIZE
    chunk_pages: int = DEFAULT_CHUNK_PAGES

    def pack(self) -> bytes:
        body = _HEADER.pack(
            HEADER_MAGIC, self.version, self.header_size, self.page_size, self.chunk_pages, bytes(24)
        )
        return body + _U64.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def unpack(cls, raw: bytes, path: Path) -> Header:
        """`raw` is the start of the file (up to MAX_HEADER_SIZE bytes)."""
        if len(raw) < len(HEADER_MAGIC) or raw[: len(HEADER_MAGIC)] != HEADER_MAGIC:
            what = "the file is empty" if not raw else "its header has no CKPTLAYR magic"
            raise CorruptLayer(f"{path} is not a ckpt layer: {what}")
        if len(raw) < STABLE_PREFIX:
            raise CorruptLayer(f"layer {path}: header is truncated ({len(raw)} bytes)")
        version, header_size = struct.unpack_from("<II", raw, 8)
        if header_size < STABLE_PREFIX + 8 or header_size > MAX_HEADER_SIZE or header_size % 8:
            raise CorruptLayer(f"layer {path}: header is corrupt (header size {header_size} is implausible)")
        if len(raw) < header_size:
            raise CorruptLayer(f"layer {path}: header is truncated ({len(raw)} of {header_size} bytes)")
        (want,) = _U64.unpack_from(raw, header_size - 8)
        if xxhash.xxh3_64_intdigest(raw[: header_size - 8]) != want:
            raise CorruptLayer(f"layer {path}: header is corrupt (checksum mismatch)")
        if version not in READ_VERSIONS:
            raise VersionError(
                f"layer {path} has format version {version}; this ckpt reads {versions_read()}"
            )
        if header_size != HEADER_SIZE:
            raise CorruptLayer(
                f"layer {path}: header is corrupt (size {header_size}, version {version} has {HEADER_SIZE})"
            )
        _, _, _, page_size, chunk_pages, reserved = _HEADER.unpack_from(raw)
        if page_size != PAGE_SIZE:
            raise LayerError(
                f"layer {path} has {page_size}-byte pages; this ckpt reads {PAGE_SIZE}-byte pages"
            )
        if not 1 <= chunk_pages <= MAX_CHUNK_PAGES:
            raise CorruptLayer(f"layer {path}: header is corrupt (chunk_pages {chunk_pages})")
        if reserved != bytes(24):
            raise CorruptLayer(f"layer {path}: header is corrupt (reserved bytes are not zero)")
        return cls(version, header_size, page_size, chunk_pages)


@dataclass(frozen=True)
class Footer:
    meta_offset: int
    meta_length: int
    meta_digest: bytes  # xxh3_128 of the compressed metadata, canonical (big-endian) bytes

    @property
    def digest(self) -> str:
        """The layer's digest: what a child records for its parent."""
        return self.meta_digest.hex()

    def pack(self) -> bytes:
        body = _FOOTER.pack(FOOTER_MAGIC, self.meta_offset, self.meta_length, self.meta_digest)
        return body + _U64.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def unpack(cls, raw: bytes, file_size: int, header_size: int, path: Path) -> Footer:
        if len(raw) != FOOTER_SIZE or raw[:8] != FOOTER_MAGIC:
            raise CorruptLayer(
                f"layer {path}: footer is missing or corrupt "
                "(no CKPTFOOT magic at the end: truncated or damaged)"
            )
        (want,) = _U64.unpack_from(raw, FOOTER_SIZE - 8)
        if xxhash.xxh3_64_intdigest(raw[: FOOTER_SIZE - 8]) != want:
            raise CorruptLayer(f"layer {path}: footer is corrupt (checksum mismatch)")
        _, meta_offset, meta_length, digest = _FOOTER.unpack_from(raw)
        if (
            meta_offset < header_size
            or not 1 <= meta_length <= MAX_META_BYTES
            or meta_offset + meta_length + FOOTER_SIZE != file_size
        ):
            raise CorruptLayer(
                f"layer {path}: footer is corrupt (metadata at {meta_offset}+{meta_length} "
                f"does not end where the footer starts in a {file_size}-byte file)"
            )
        return cls(meta_offset, meta_length, digest)


class _TooBig(ValueError):
    pass


class _Budget:
    """Counts decoded objects as msgpack builds them, and stops the build once over budget.

    msgpack calls the hooks when a container is complete, innermost first; every object is an
    element of exactly one container, so the sum of container sizes is the object count, and a
    bomb (64 MiB of empty maps: 4.8 GB of dicts) stops after `limit` objects, not after all of
    them. Depth needs no hook: msgpack's own stack stops at 1024 levels (StackError), and the one
    free-form map (tracker_state) is checked for depth by the validation.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def seen(self, obj: Any) -> Any:
        # The container itself counts too: an array of a million empty maps is a million objects.
        self.count += 1 + (len(obj) * 2 if isinstance(obj, dict) else len(obj))
        if self.count > self.limit:
            raise _TooBig(f"more than {self.limit} objects")
        return obj


def meta_digest(comp: bytes) -> bytes:
    return xxhash.xxh3_128(comp).digest()


def encode_meta(d: dict[str, Any], level: int) -> bytes:
    raw = msgpack.packb(d, use_bin_type=True, unicode_errors="surrogateescape")
    # Frames always declare their size: the reader refuses frames that do not.
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)


def declared_size(frame: bytes | memoryview, what: str) -> int:
    """A zstd frame's declared content size, read before anything is allocated for it; `what` is
    corrupt if the frame is none or declares no size."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise CorruptLayer(f"{what} is corrupt (not a zstd frame)") from None
    if size < 0:
        raise CorruptLayer(f"{what} is corrupt (its zstd frame does not declare its size)")
    return int(size)


def decode_meta(comp: bytes, path: Path) -> dict[str, Any]:
    """Decompress and unpack metadata whose checksum the caller has already checked."""
    limit = min(MAX_META_BYTES, max(META_FLOOR, META_RATIO * len(comp)))
    size = declared_size(comp, f"layer {path}: metadata")
    if size > limit:
        raise CorruptLayer(
            f"layer {path}: metadata is corrupt (declares {size} bytes, more than the {limit} allowed)"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(comp, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CorruptLayer(f"layer {path}: metadata is corrupt (zstd: {e})") from None
    if len(raw) != size:
        raise CorruptLayer(
            f"layer {path}: metadata is corrupt (decompressed to {len(raw)} bytes, not {size})"
        )
    budget = _Budget(max(META_OBJECTS_FLOOR, META_OBJECTS_PER_BYTE * len(comp)))
    # Every msgpack object takes at least one byte, and the budget counts each container and each of
    # its elements (a map's as two): at most twice the objects, so at most 2 x len(raw). Below the
    # limit no bomb can get past it, and the hooks (a Python call per container, ~0.3 ms of a small
    # layer's open) are left out.
    hook = budget.seen if 2 * len(raw) > budget.limit else None
    try:
        d = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=False,
            unicode_errors="surrogateescape",
            list_hook=hook,
            object_hook=hook,
            max_str_len=META_MAX_STR,
            max_bin_len=MAX_META_BYTES,
            max_array_len=META_MAX_CONTAINER,
            max_map_len=META_MAX_CONTAINER,
            max_ext_len=0,
        )
    except _TooBig as e:
        raise CorruptLayer(f"layer {path}: metadata is invalid ({e})") from None
    except Exception as e:  # msgpack raises several unrelated types on malformed input; all mean the same
        msg = str(e) or type(e).__name__
        if isinstance(e, msgpack.StackError):
            msg = "nested too deeply"
        raise CorruptLayer(f"layer {path}: metadata is corrupt (msgpack: {msg})") from None
    if not isinstance(d, dict):
        raise CorruptLayer(f"layer {path}: metadata is corrupt (not a map)")
    return d
