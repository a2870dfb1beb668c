"""Shared objects whose bytes live outside the page table: memfds, deleted files still open or mapped
(CRIU's "ghost files") and SysV shared memory segments (format version 3, images/FORMAT.md).

Each layer that has such an object stores its whole contents, as it was inside that dump's freeze:
no dirty tracker sees a write made through another fd or another process, so an incremental layer
cannot know which parts changed. The restore reads the top layer's objects only. Contents are
stored as extents (the allocated parts, found with SEEK_DATA/SEEK_HOLE: holes stay holes), each
compressed on its own and at most EXTENT_MAX bytes before compression, so reading one never
decompresses more than that.

Objects are named by the device and inode the dumped process saw (`dev`, `ino`): fds (FdRecord
dev/ino) and mappings (VmaRecord dev "maj:min" and inode) of one object find the same record, so a
restore creates it once and maps it, or opens it, as often as the process had it.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ckpt.image.validate import (
    I64_MAX,
    MetaError,
    as_bool,
    as_bytes,
    as_int,
    as_list,
    as_map,
    as_str,
    fail,
    get,
)
from ckpt.lightstd import zstandard  # (without its import of platform)

OBJECT_KINDS = ("memfd", "ghost", "sysv")
EXTENT_MAX = 4 << 20  # bytes of one extent before compression
MAX_OBJECTS = 1 << 16
MAX_EXTENTS = 1 << 20
MAX_OBJECT_SIZE = 1 << 44  # the size an object says it has (sparse: holes cost nothing)
DEFAULT_OBJECT_LIMIT = 64 << 20  # --ghost-limit: bytes of data stored per object


@dataclass
class Extent:
    offset: int
    length: int  # bytes once decompressed
    data: bytes  # zstd frame

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.length, "data": self.data}

    @classmethod
    def from_dict(cls, v: Any, where: str) -> Extent:
        d = as_map(v, where)
        return cls(
            offset=as_int(get(d, "offset", where), f"{where}.offset", 0, MAX_OBJECT_SIZE),
            length=as_int(get(d, "length", where), f"{where}.length", 1, EXTENT_MAX),
            data=as_bytes(get(d, "data", where), f"{where}.data", EXTENT_MAX + (1 << 16)),
        )

    def bytes(self, where: str = "object") -> bytes:
        """The extent's bytes; damage is a MetaError naming `where` (the metadata's checksum was
        right, so this means a buggy or hostile writer)."""
        try:
            raw = zstandard.ZstdDecompressor().decompress(self.data, max_output_size=self.length)
        except zstandard.ZstdError as e:
            raise MetaError(f"{where}: extent at {self.offset}: {e}") from None
        if len(raw) != self.length:
            raise MetaError(f"{where}: extent at {self.offset} holds {len(raw)} bytes, not {self.length}")
        return raw


@dataclass
class ObjectRecord:
    kind: str  # memfd | ghost | sysv
    dev: int  # st_dev the process saw (for sysv: the shm mount's)
    ino: int  # st_ino (for sysv: the shmid, which the kernel uses as the inode number)
    name: str  # memfd: its name; ghost: the path it had (no " (deleted)"); sysv: ""
    size: int
    mode: int  # st_mode (sysv: the permission bits and SHM_DEST/SHM_LOCKED as in /proc/sysvipc/shm)
    uid: int
    gid: int
    seals: int = 0  # memfd: F_GET_SEALS
    key: int = 0  # sysv: the IPC key (0: IPC_PRIVATE)
    removed: bool = False  # sysv: IPC_RMID was done; the segment lives while it is attached
    stored: bool = True  # False: the contents were not stored (why says why); the restore refuses it
    why: str = ""
    extents: list[Extent] = field(default_factory=list)
    # xxh3-128 of the contents (offsets, lengths, bytes of every extent); "" in older layers
    digest: str = ""
    # The contents equal those of the same object in an older layer of the chain, which holds them
    # (an incremental dump of an unchanged object): `extents` is empty here; resolve_objects finds them.
    inherited: bool = False
    # Version 5: in a tree dump, the pid of the member whose layer (of the same tree dump) stores the
    # contents; `extents` is empty here and `digest` "" (ckpt/treeshare.py). 0: this layer's own.
    held_by: int = 0

    @property
    def stored_bytes(self) -> int:
        return sum(e.length for e in self.extents)

    def label(self) -> str:
        if self.kind == "memfd":
            return f"memfd {self.name!r}"
        if self.kind == "sysv":
            return f"SysV shared memory segment {self.ino} (key {self.key:#x})"
        return f"deleted file {self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "dev": self.dev, "ino": self.ino, "name": self.name, "size": self.size,
            "mode": self.mode, "uid": self.uid, "gid": self.gid, "seals": self.seals, "key": self.key,
            "removed": self.removed, "stored": self.stored, "why": self.why,
            "extents": [e.to_dict() for e in self.extents], "digest": self.digest,
            "inherited": self.inherited, **({"held_by": self.held_by} if self.held_by else {}),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, v: Any, where: str) -> ObjectRecord:
        d = as_map(v, where)
        kind = as_str(get(d, "kind", where), f"{where}.kind", 16)
        if kind not in OBJECT_KINDS:
            fail(f"{where}.kind", f"{kind!r} is not one of {', '.join(OBJECT_KINDS)}")
        size = as_int(get(d, "size", where), f"{where}.size", 0, MAX_OBJECT_SIZE)
        extents = [
            Extent.from_dict(e, f"{where}.extents[{i}]")
            for i, e in enumerate(as_list(get(d, "extents", where), f"{where}.extents", MAX_EXTENTS))
        ]
        end = 0
        for i, e in enumerate(extents):
            if e.offset < end or e.offset + e.length > size:
                fail(f"{where}.extents[{i}]", "overlaps the one before it or ends past the object's size")
            end = e.offset + e.length
        return cls(
            kind=kind,
            dev=as_int(get(d, "dev", where), f"{where}.dev"),
            ino=as_int(get(d, "ino", where), f"{where}.ino"),
            name=as_str(get(d, "name", where), f"{where}.name", 4096),
            size=size,
            mode=as_int(get(d, "mode", where), f"{where}.mode", 0, (1 << 32) - 1),
            uid=as_int(get(d, "uid", where), f"{where}.uid", 0, (1 << 32) - 1),
            gid=as_int(get(d, "gid", where), f"{where}.gid", 0, (1 << 32) - 1),
            seals=as_int(d.get("seals", 0), f"{where}.seals", 0, (1 << 32) - 1),
            key=as_int(d.get("key", 0), f"{where}.key", 0, (1 << 32) - 1),
            removed=as_bool(d.get("removed", False), f"{where}.removed"),
            stored=as_bool(d.get("stored", True), f"{where}.stored"),
            why=as_str(d.get("why", ""), f"{where}.why", 1024),
            extents=extents,
            digest=as_str(d.get("digest", ""), f"{where}.digest", 32),
            inherited=as_bool(d.get("inherited", False), f"{where}.inherited"),
            held_by=_held_by(d, extents, where),
        )


def _held_by(d: dict[Any, Any], extents: list[Extent], where: str) -> int:
    h = as_int(d.get("held_by", 0), f"{where}.held_by", 0, 1 << 22)
    if h and (extents or d.get("inherited")):
        fail(f"{where}.held_by", "an object another layer holds has no contents here")
    return h


def contents_digest(extents: list[tuple[int, bytes]]) -> str:
    h = xxhash.xxh3_128()
    for off, raw in extents:
        h.update(struct.pack("<QQ", off, len(raw)))
        h.update(raw)
    return h.hexdigest()


def check_contents(o: ObjectRecord) -> None:
    """Every extent decompresses to its length and, when the layer says, to the recorded digest:
    MetaError naming the object otherwise."""
    if o.inherited or not o.stored:
        return
    raws = [(e.offset, e.bytes(o.label())) for e in o.extents]
    if o.digest and contents_digest(raws) != o.digest:
        raise MetaError(f"{o.label()}: its contents do not match their digest")


def same_object(a: ObjectRecord, b: ObjectRecord) -> bool:
    """Same object, same contents (and the same metadata a restore gives back)."""
    return (a.kind, a.dev, a.ino, a.size, a.digest) == (b.kind, b.dev, b.ino, b.size, b.digest) and bool(
        a.digest
    )


def resolve_objects(layers: list[Any]) -> list[ObjectRecord]:
    """The top layer's objects (layers[0]: newest first, as MergedView.layers), with the contents of
    inherited ones taken from the newest older layer that holds them. One whose contents no layer
    holds is marked not stored (the restore then refuses it, naming it). One another member of a
    tree holds (`held_by`) stays as it is: the tree restore takes it from that member."""
    out = []
    for o in layers[0].meta.objects:
        if o.inherited:
            src = next(
                (
                    p
                    for lay in layers[1:]
                    for p in lay.meta.objects
                    if not p.inherited and not p.held_by and same_object(p, o)
                ),
                None,
            )
            if src is None:
                o = dataclasses.replace(o, stored=False, why="its contents are in no layer of the chain")
            else:
                o = dataclasses.replace(o, extents=list(src.extents), inherited=False)
        out.append(o)
    return out


def vma_dev(dev: str) -> int:
    """/proc/PID/maps' "maj:min" (hex) as an st_dev."""
    try:
        ma, _, mi = dev.partition(":")
        return os.makedev(int(ma, 16), int(mi, 16))
    except ValueError:
        return -1


def objects_from(v: Any) -> list[ObjectRecord]:
    """The metadata's `objects` list (absent before version 3)."""
    if v is None:
        return []
    listed = as_list(v, "objects", MAX_OBJECTS)
    recs = [ObjectRecord.from_dict(r, f"objects[{i}]") for i, r in enumerate(listed)]
    if len({(o.kind, o.dev, o.ino) for o in recs}) != len(recs):
        fail("objects", "an object appears twice")
    for i, o in enumerate(recs):
        if o.size > I64_MAX:
            fail(f"objects[{i}].size", "too large")
    return recs


def compress_extent(offset: int, raw: bytes, level: int = 3) -> Extent:
    cz = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return Extent(offset, len(raw), cz.compress(raw))
