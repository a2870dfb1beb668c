"""Shared objects a dump stores whole (ckpt/image/objects.py): memfds, deleted files still open or
mapped, and SysV shared memory segments, read from outside while the process is frozen.

The bytes are read through a new open of the object (/proc/PID/fd/N or /proc/PID/map_files/S-E,
which name the object itself, deleted or not), never through the process's own fd (its offset
must not move). SysV segments have no read(): their bytes are read through the process's mappings
in /proc/PID/mem, and only where SEEK_DATA (which the segment's file does have) finds data.
Reading never allocates: holes are found first and skipped.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ckpt.cbuf import char_buffer
from ckpt.image.objects import EXTENT_MAX, ObjectRecord, compress_extent, contents_digest, vma_dev
from ckpt.proc.fds import STATFS_SIZE, FdInfo
from ckpt.proc.maps import Vma
from ckpt.sysvmap import SYSV_RE

F_GET_SEALS = 1034
HUGETLBFS_MAGIC = 0x958458F6
DELETED = " (deleted)"
MEMFD_PREFIX = "/memfd:"
SHARED_ANON = "/dev/zero (deleted)"


def is_memfd_path(path: str) -> bool:
    return path.startswith(MEMFD_PREFIX) and path.endswith(DELETED)


def is_shmem_object(path: str) -> bool:
    """A memfd or SysV segment: shmem, whose pages SEEK_DATA finds and no page table holds whole."""
    return is_memfd_path(path) or bool(SYSV_RE.match(path))


def is_ghost_path(path: str) -> bool:
    """A file that was deleted while open or mapped (not a memfd, SysV segment or shared anonymous
    memory, which the kernel also shows as deleted)."""
    return (
        path.startswith("/")
        and path.endswith(DELETED)
        and not is_memfd_path(path)
        and not SYSV_RE.match(path)
        and path != SHARED_ANON
    )


def memfd_name(path: str) -> str:
    return path[len(MEMFD_PREFIX) : -len(DELETED)]


@dataclass(frozen=True)
class SysvSeg:
    key: int
    shmid: int
    perms: int
    size: int
    nattch: int
    uid: int
    gid: int


def read_sysv(path: str = "/proc/sysvipc/shm") -> dict[int, SysvSeg]:
    """The SysV segments of this IPC namespace, by shmid."""
    out: dict[int, SysvSeg] = {}
    try:
        with open(path) as f:
            next(f, None)
            for ln in f:
                w = ln.split()
                if len(w) < 9:
                    continue
                key, shmid = int(w[0]) & 0xFFFFFFFF, int(w[1])
                out[shmid] = SysvSeg(key, shmid, int(w[2], 8), int(w[3]), int(w[6]), int(w[7]), int(w[8]))
    except OSError:
        pass
    return out


def _extents(
    seek_fd: int, size: int, read: Callable[[int, int], bytes], limit: int
) -> tuple[list[dict[str, Any]], str]:
    """The allocated parts of [0, size), compressed; or ([], why) once more than `limit` bytes."""
    out: list[dict[str, Any]] = []
    total = 0
    pos = 0
    while pos < size:
        try:
            data = os.lseek(seek_fd, pos, os.SEEK_DATA)
            hole = min(os.lseek(seek_fd, data, os.SEEK_HOLE), size) if data < size else size
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            if e.errno != errno.EINVAL:
                raise
            data, hole = pos, size  # no SEEK_DATA here: all of it is data
        if data >= size:
            break
        total += hole - data
        if total > limit:
            return [], f"more than the limit of {limit} bytes of data (--ghost-limit)"
        for off in range(data, hole, EXTENT_MAX):
            n = min(EXTENT_MAX, hole - off)
            raw = read(off, n)
            if len(raw) != n:
                return [], f"only {len(raw)} of {n} bytes could be read at offset {off}"
            out.append({"offset": off, "raw": raw})  # compressed after the thaw (compress_objects)
        pos = hole
    return out, ""


def compress_objects(
    objects: list[dict[str, Any]], level: int, parent: Sequence[ObjectRecord] = ()
) -> list[dict[str, Any]]:
    """The records with their extents compressed: done after the thaw, off the freeze. An object
    whose contents equal the parent layer's (same digest) stores none: `inherited`."""
    out = []
    for o in objects:
        # An object another member of the tree stores (held_by) has no contents here, nor digest.
        stored = o["stored"] and not o.get("held_by")
        digest = contents_digest([(e["offset"], e["raw"]) for e in o["extents"]]) if stored else ""
        rec = {**o, "digest": digest}
        key = (o["kind"], o["dev"], o["ino"], o["size"], digest)
        if digest and any(
            (p.kind, p.dev, p.ino, p.size, p.digest) == key and p.stored and not p.held_by for p in parent
        ):
            out.append({**rec, "extents": [], "inherited": True})
            continue
        exts = [compress_extent(e["offset"], e["raw"], level).to_dict() for e in o["extents"]]
        out.append({**rec, "extents": exts})
    return out


def _pread_all(fd: int) -> Callable[[int, int], bytes]:
    def read(off: int, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            b = os.pread(fd, n - len(buf), off + len(buf))
            if not b:
                break
            buf += b
        return bytes(buf)

    return read


_fstatfs = ctypes.CDLL(None, use_errno=True).fstatfs  # (looked up at import, not in a freeze)


def _hugetlb(fd: int) -> bool:
    buf = char_buffer(STATFS_SIZE)  # struct statfs; f_type first
    return _fstatfs(fd, buf) == 0 and int.from_bytes(buf.raw[:8], "little") == HUGETLBFS_MAGIC


Holder = Callable[[str, int, int], int]  # (kind, dev, ino) -> pid whose layer stores it, or 0


def _linked_why(name: str, st: os.stat_result) -> str:
    try:
        same = os.stat(name + DELETED)
        if (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino):
            return "its name ends in ' (deleted)', which ckpt cannot tell from a removed file's"
    except OSError:
        pass
    return f"its name was removed, but it has {st.st_nlink} other link(s), which ckpt does not look for"


def _file_object(
    kind: str, name: str, opener: str, limit: int, held: Holder | None = None
) -> dict[str, Any] | None:
    try:
        fd = os.open(opener, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return {"error": f"cannot open {opener}: {e.strerror}"}
    try:
        st = os.fstat(fd)
        if _hugetlb(fd):
            # MFD_HUGETLB: a memfd_create without it would give back a different object
            return {"kind": kind, "dev": st.st_dev, "ino": st.st_ino, "name": name, "size": st.st_size,
                    "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "stored": False, "extents": [],
                    "why": "on hugetlbfs (MFD_HUGETLB), which ckpt does not recreate"}  # fmt: skip
        seals = 0
        if kind == "memfd":
            try:
                seals = fcntl.fcntl(fd, F_GET_SEALS)
            except OSError:
                seals = 0
        if kind == "ghost" and st.st_nlink > 0:
            # Not a removed file: a copy of it would not be the file its other names reach.
            return {"kind": kind, "dev": st.st_dev, "ino": st.st_ino, "name": name, "size": st.st_size,
                    "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "stored": False, "extents": [],
                    "why": _linked_why(name, st)}  # fmt: skip
        holder = held(kind, st.st_dev, st.st_ino) if held is not None else 0
        try:
            extents, why = ([], "") if holder else _extents(fd, st.st_size, _pread_all(fd), limit)
        except OSError as e:
            extents, why = [], f"reading it failed: {e.strerror}"
        return {
            "kind": kind, "dev": st.st_dev, "ino": st.st_ino, "name": name, "size": st.st_size,
            "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "seals": seals,
            "stored": not why, "why": why, "extents": extents, "held_by": holder,
        }  # fmt: skip
    finally:
        os.close(fd)


def _sysv_object(
    pid: int, parts: list[Vma], segs: dict[int, SysvSeg], limit: int, held: Holder | None = None
) -> dict[str, Any]:
    shmid = parts[0].inode
    seg = segs.get(shmid)
    base = {"kind": "sysv", "dev": vma_dev(parts[0].dev), "ino": shmid, "name": ""}
    if seg is None:
        # Not listed: removed (IPC_RMID) and still attached; its key is gone with it.
        return {**base, "size": 0, "mode": 0, "uid": 0, "gid": 0, "stored": False, "extents": [],
                "why": "it is not in /proc/sysvipc/shm (another IPC namespace?)"}  # fmt: skip
    rec = {**base, "size": seg.size, "mode": seg.perms, "uid": seg.uid, "gid": seg.gid, "key": seg.key,
           "removed": bool(seg.perms & 0o1000)}  # fmt: skip
    holder = held("sysv", vma_dev(parts[0].dev), shmid) if held is not None else 0
    if holder:
        return {**rec, "stored": True, "why": "", "extents": [], "held_by": holder}
    # The segment is read through the process's mappings of it: they must cover it from offset 0.
    parts = sorted(parts, key=lambda v: v.offset)
    covered = 0
    for v in parts:
        if v.offset != covered or (v is not parts[0] and v.start != parts[parts.index(v) - 1].end):
            break
        covered = v.offset + v.size
    if covered < seg.size:
        return {**rec, "stored": False, "extents": [],
                "why": "the process maps only part of it"}  # fmt: skip
    addr0 = parts[0].start
    try:
        seek = os.open(f"/proc/{pid}/map_files/{addr0:x}-{parts[0].end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return {**rec, "stored": False, "extents": [], "why": f"map_files: {e.strerror}"}
    try:
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os.close(seek)
        return {**rec, "stored": False, "extents": [], "why": f"/proc/{pid}/mem: {e.strerror}"}
    try:
        extents, why = _extents(seek, seg.size, lambda off, n: _pread_all(mem)(addr0 + off, n), limit)
    except OSError as e:
        extents, why = [], f"reading it failed: {e.strerror}"
    finally:
        os.close(seek)
        os.close(mem)
    return {**rec, "stored": not why, "why": why, "extents": extents}


def _same_ipc_ns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/ipc").st_ino == os.stat("/proc/self/ns/ipc").st_ino
    except OSError:
        return False


def collect_objects(
    pid: int, vmas: Sequence[Vma], fds: Sequence[FdInfo], limit: int, held: Holder | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of every memfd, deleted file and SysV segment the process has open or mapped, each
    once (by device and inode); and warnings for those that could not be read at all. `held`: in a
    tree dump, which object another member's layer stores (ckpt/treeshare.py): not read here."""
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    warnings: list[str] = []

    def add(kind: str, dev: int, ino: int, name: str, opener: str) -> None:
        if (kind, dev, ino) in out:
            return
        rec = _file_object(kind, name, opener, limit, held)
        if rec is None or "error" in rec:
            warnings.append(f"{kind} {name}: {rec['error'] if rec else 'unreadable'}")
            return
        out[(kind, rec["dev"], rec["ino"])] = rec

    for f in fds:
        if f.kind == "memfd":
            add("memfd", f.dev, f.ino, memfd_name(f.path), f"/proc/{pid}/fd/{f.fd}")
        elif f.kind == "file" and is_ghost_path(f.path) and not f.flags & os.O_PATH:
            add("ghost", f.dev, f.ino, f.path[: -len(DELETED)], f"/proc/{pid}/fd/{f.fd}")
    sysv: dict[int, list[Vma]] = {}
    for v in vmas:
        if not v.is_file or not v.path.endswith(DELETED):  # (memfds, ghosts and SysV segments all are)
            continue
        opener = f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}"
        if is_memfd_path(v.path):
            add("memfd", vma_dev(v.dev), v.inode, memfd_name(v.path), opener)
        elif is_ghost_path(v.path):
            add("ghost", vma_dev(v.dev), v.inode, v.path[: -len(DELETED)], opener)
        elif SYSV_RE.match(v.path):
            sysv.setdefault(v.inode, []).append(v)
    if sysv:
        same_ns = _same_ipc_ns(pid)
        segs = read_sysv() if same_ns else {}
        for parts in sysv.values():
            rec = _sysv_object(pid, parts, segs, limit, held if same_ns else None)
            if not same_ns:
                rec["why"] = "the process is in another IPC namespace than ckpt"
            out[("sysv", rec["dev"], rec["ino"])] = rec
    return list(out.values()), warnings
