"""The layer's records: constants of format version 2 and the metadata map as dataclasses.

images/FORMAT.md describes the bytes. Each record converts to the plain map stored in the layer
(`to_dict`) and back (`from_dict`); `from_dict` trusts nothing and raises MetaError naming the field.
"""

from __future__ import annotations

import itertools
import os
import re
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import xxhash

from ckpt import pageset
from ckpt.image.fdobjects import AnonFdRecord, PipeRecord
from ckpt.image.objects import ObjectRecord, objects_from
from ckpt.image.pidns import PidNsRecord, check_threads
from ckpt.image.recmemo import RecordMemo, section
from ckpt.image.sockets import InetListenRecord, sockets_from
from ckpt.image.tcp import TcpRecord, tcp_from
from ckpt.image.tree import TreeRecord
from ckpt.image.validate import (
    I64_MAX,
    I64_MIN,
    MetaError,
    as_bool,
    as_bytes,
    as_float,
    as_int,
    as_list,
    as_map,
    as_opt_str,
    as_str,
    as_u64_array,
    check_opaque,
    check_pages,
    fail,
    first_common,
    first_outside,
    get,
    is_numpy,
)
from ckpt.sysvmap import is_sysv_path

_T = TypeVar("_T")

if TYPE_CHECKING:
    import numpy as np

FORMAT_NAME = "ckpt-layer"
FORMAT_VERSION = 8
# A path the kernel showed (/proc/PID/maps, fd links, cwd, exe): PATH_MAX bytes and " (deleted)" at
# most; a longer one is a malformed layer, named at read (not a restore failing half-way on it).
PATH_STR = 4096 + 16
# version 2 added raw chunks and each chunk's digest of its pages; version 3 per-thread names and
# differences, which pending signals were the process's, and new records (images/FORMAT.md)
READ_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)  # 4: established TCP connections (tcp_established); 5-8: FORMAT.md
HEADER_MAGIC = b"CKPTLAYR"
FOOTER_MAGIC = b"CKPTFOOT"
HEADER_SIZE = 64
FOOTER_SIZE = 48
PAGE_SIZE = 4096
DEFAULT_CHUNK_PAGES = 256
# A chunk is decompressed whole into memory; 64 MiB bounds what one hostile chunk can ask for.
MAX_CHUNK_PAGES = 16384
# x86_64 user space with 4-level paging ends at 2**47; anything above is the kernel's ([vsyscall]).
ADDR_LIMIT = 1 << 47
MAX_PID = 1 << 22  # PID_MAX_LIMIT on 64-bit kernels
MAX_VMAS = 1 << 22
MAX_THREADS = 1 << 22
MAX_FDS = 1 << 24
MAX_RANGES = 1 << 22
MAX_GROUPS = 1 << 16  # NGROUPS_MAX
MAX_PENDING = 1 << 16  # signals held off a frozen process: a handful in practice
ID_MAX = (1 << 32) - 2  # uid_t/gid_t; (uid_t)-1 means "no change" to the kernel and is never an id
SIGINFO_SIZE = 128
STOP_SIGNALS = (19, 20, 21, 22)  # SIGSTOP SIGTSTP SIGTTIN SIGTTOU: what a group-stop is made by
# Linux's resource numbers (asm-generic/resource.h, the same on x86_64), by their names in the layer.
RLIMIT_NAMES = (
    "cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile", "memlock", "as", "locks",
    "sigpending", "msgqueue", "nice", "rtprio", "rttime",
)  # fmt: skip

VMA_STATUSES = ("dumped", "skipped", "unreadable")
_PERMS_RE = re.compile(r"[r-][w-][x-][ps]\Z")
_DIGEST_RE = re.compile(r"[0-9a-f]{32}\Z")
# Shared anonymous memory shows up with an inode on the shmem mount; its untouched pages read as zeros.
_ANON_PATHS = frozenset({"/dev/zero", "/dev/zero (deleted)"})


def versions_read() -> str:
    """What a refusal says this ckpt reads: "version 1 or 2"."""
    return "version " + " or ".join(str(v) for v in READ_VERSIONS)


ZERO_PAGE_DIGEST: int = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))


def page_digests(buf: bytes | memoryview) -> np.ndarray:
    """xxh3_64 of each page of `buf`, as uint64."""
    from ckpt.image import pagescan

    return pagescan.page_digests(buf)


def _u64_bytes(a: Any) -> bytes:
    """A column (numpy array, array('Q') or any sequence of u64) as packed little-endian u64."""
    if isinstance(a, array) and a.typecode == "Q":
        return pageset.SmallPages(a).to_bytes()
    if not is_numpy(a):
        return pageset.SmallPages(array("Q", a)).to_bytes()
    import numpy as np

    return np.ascontiguousarray(a, dtype="<u8").tobytes()


@dataclass
class FileId:
    """What a file looked like at dump time, to tell whether it is still the same file."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def to_dict(self) -> dict[str, Any]:
        return {"dev": self.dev, "ino": self.ino, "size": self.size, "mtime_ns": self.mtime_ns}

    @classmethod
    def from_dict(cls, v: Any, where: str) -> FileId:
        d = as_map(v, where)
        return cls(
            dev=as_int(get(d, "dev", where), f"{where}.dev"),
            ino=as_int(get(d, "ino", where), f"{where}.ino"),
            size=as_int(get(d, "size", where), f"{where}.size", 0, I64_MAX),
            mtime_ns=as_int(get(d, "mtime_ns", where), f"{where}.mtime_ns", I64_MIN, I64_MAX),
        )

    @classmethod
    def opt_from_dict(cls, v: Any, where: str) -> FileId | None:
        return None if v is None else cls.from_dict(v, where)


@dataclass
class ParentRef:
    path: str  # relative to the child layer's directory, or absolute
    digest: str  # the parent's digest: hex of the xxh3_128 of its compressed metadata

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "digest": self.digest}

    @classmethod
    def from_dict(cls, v: Any, where: str) -> ParentRef:
        d = as_map(v, where)
        path = as_str(get(d, "path", where), f"{where}.path")
        if not path or "\0" in path:
            fail(f"{where}.path", "empty or holds a NUL byte")
        digest = as_str(get(d, "digest", where), f"{where}.digest")
        if not _DIGEST_RE.match(digest):
            fail(f"{where}.digest", f"{digest!r} is not 32 lowercase hex digits")
        return cls(path, digest)


@dataclass
class Inventory:
    pid: int
    start_time: int = 0  # clock ticks after boot (/proc/PID/stat field 22)
    boot_id: str = ""
    comm: str = ""
    exe: str = ""
    kernel: str = ""  # uname release
    arch: str = "x86_64"
    created: float = 0.0  # time.time() of the dump
    ckpt_version: str = ""
    tracker: str | None = None
    tracker_state: dict[Any, Any] | None = None  # the tracker's own; opaque here, msgpack-able
    incremental: bool = False
    parent: ParentRef | None = None
    # False for a layer copied while the process ran (a pre-dump, a migration round): its pages are
    # not one moment of the process, so it may be built on but never restored or merged as a top.
    consistent: bool = True
    stats: dict[str, int | float] = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "pid": self.pid,
            "start_time": self.start_time,
            "boot_id": self.boot_id,
            "comm": self.comm,
            "exe": self.exe,
            "kernel": self.kernel,
            "arch": self.arch,
            "created": float(self.created),
            "ckpt_version": self.ckpt_version,
            "tracker": self.tracker,
            "tracker_state": self.tracker_state,
            "incremental": self.incremental,
            "parent": None if self.parent is None else self.parent.to_dict(),
            "consistent": self.consistent,
            "stats": dict(self.stats),
        }

    @classmethod
    def from_dict(cls, v: Any, where: str = "inventory") -> Inventory:
        d = as_map(v, where)

        def w(k: str) -> str:
            return f"{where}.{k}"

        fmt = as_str(get(d, "format", where), w("format"))
        if fmt != FORMAT_NAME:
            fail(w("format"), f"{fmt!r} is not {FORMAT_NAME!r}")
        version = as_int(get(d, "version", where), w("version"))
        if version not in READ_VERSIONS:
            fail(w("version"), f"format version {version}; this ckpt reads {versions_read()}")
        tstate = get(d, "tracker_state", where)
        if tstate is not None:
            check_opaque(tstate, w("tracker_state"))
        stats_raw = as_map(get(d, "stats", where), w("stats"))
        if len(stats_raw) > 4096:
            fail(w("stats"), f"{len(stats_raw)} entries, more than the 4096 allowed")
        stats: dict[str, int | float] = {}
        for k, sv in stats_raw.items():
            key = as_str(k, w("stats") + " key", 256)
            stats[key] = (
                as_int(sv, w(f"stats.{key}"), I64_MIN, I64_MAX)
                if isinstance(sv, int)
                else as_float(sv, w(f"stats.{key}"))
            )
        parent_raw = get(d, "parent", where)
        parent = None if parent_raw is None else ParentRef.from_dict(parent_raw, w("parent"))
        incremental = as_bool(get(d, "incremental", where), w("incremental"))
        if incremental and parent is None:
            fail(w("incremental"), "an incremental layer must name its parent")
        # Version 1 has no "consistent": every layer of it was taken frozen.
        consistent = as_bool(d.get("consistent", True), w("consistent")) if version >= 2 else True
        return cls(
            format=fmt,
            version=version,
            pid=as_int(get(d, "pid", where), w("pid"), 1, MAX_PID),
            start_time=as_int(get(d, "start_time", where), w("start_time")),
            boot_id=as_str(get(d, "boot_id", where), w("boot_id"), 256),
            comm=as_str(get(d, "comm", where), w("comm"), 256),
            exe=as_str(get(d, "exe", where), w("exe"), PATH_STR),
            kernel=as_str(get(d, "kernel", where), w("kernel"), 256),
            arch=as_str(get(d, "arch", where), w("arch"), 64),
            created=as_float(get(d, "created", where), w("created")),
            ckpt_version=as_str(get(d, "ckpt_version", where), w("ckpt_version"), 256),
            tracker=as_opt_str(get(d, "tracker", where), w("tracker")),
            tracker_state=tstate,
            incremental=incremental,
            parent=parent,
            consistent=consistent,
            stats=stats,
        )


@dataclass
class VmaRecord:
    start: int
    end: int
    perms: str  # "rw-p" as in /proc/PID/maps
    offset: int
    dev: str  # "fd:01"
    inode: int
    path: str
    status: str = "dumped"  # dumped | skipped | unreadable
    file: FileId | None = None  # the backing file at dump time, for file-backed mappings
    # smaps' VmFlags ("rd wr mr mw me ac lo"); None in a version-1 layer, which did not record them
    flags: str | None = None

    @property
    def flag_set(self) -> frozenset[str]:
        return frozenset((self.flags or "").split())

    @property
    def npages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    @property
    def dumped(self) -> bool:
        return self.status == "dumped"

    @property
    def anonymous(self) -> bool:
        """Whether pages this layer does not hold read as zeros (else they come from the file). So
        for a SysV segment, whatever its id (its inode column: 0 for a namespace's first, which had
        made only that one anonymous): a dump copies every page the segment holds (SEEK_DATA), and
        those it does not hold are holes; nothing else could give them (it has no file to read)."""
        return self.inode == 0 or self.path in _ANON_PATHS or is_sysv_path(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "perms": self.perms,
            "offset": self.offset,
            "dev": self.dev,
            "inode": self.inode,
            "path": self.path,
            "status": self.status,
            "file": None if self.file is None else self.file.to_dict(),
            "flags": self.flags,
        }

    @classmethod
    def from_dict(cls, v: Any, where: str) -> VmaRecord:
        d = as_map(v, where)
        start = as_int(get(d, "start", where), f"{where}.start")
        end = as_int(get(d, "end", where), f"{where}.end")
        if start % PAGE_SIZE or end % PAGE_SIZE:
            fail(where, f"[0x{start:x}, 0x{end:x}) is not page-aligned")
        if start >= end:
            fail(where, f"start 0x{start:x} is not below end 0x{end:x}")
        perms = as_str(get(d, "perms", where), f"{where}.perms", 4)
        if not _PERMS_RE.match(perms):
            fail(f"{where}.perms", f"{perms!r} is not like 'rw-p'")
        status = as_str(get(d, "status", where), f"{where}.status", 16)
        if status not in VMA_STATUSES:
            fail(f"{where}.status", f"{status!r} is not one of {', '.join(VMA_STATUSES)}")
        # Skipped mappings may be kernel ones above user space ([vsyscall]); dumped ones may not.
        if status == "dumped" and end > ADDR_LIMIT:
            fail(where, f"dumped mapping ends at 0x{end:x}, above user space (0x{ADDR_LIMIT:x})")
        return cls(
            start=start,
            end=end,
            perms=perms,
            offset=as_int(get(d, "offset", where), f"{where}.offset", 0, I64_MAX),
            dev=as_str(get(d, "dev", where), f"{where}.dev", 64),
            inode=as_int(get(d, "inode", where), f"{where}.inode"),
            path=as_str(get(d, "path", where), f"{where}.path", PATH_STR),
            status=status,
            file=FileId.opt_from_dict(get(d, "file", where), f"{where}.file"),
            flags=as_opt_str(d.get("flags"), f"{where}.flags", 256),
        )


@dataclass
class ThreadProps:
    """A thread's own settings beyond its registers (format version 2)."""

    sigaltstack: tuple[int, int, int] | None = None  # (ss_sp, ss_flags, ss_size); None: none set
    robust_list: tuple[int, int] = (0, 0)  # (head, len) of set_robust_list
    tid_address: int = 0  # clear_child_tid (set_tid_address)
    policy: int = 0  # sched_getscheduler, SCHED_RESET_ON_FORK included
    rt_priority: int = 0
    nice: int = 0
    affinity: list[int] = field(default_factory=list)  # CPUs
    timerslack_ns: int = 50_000
    ioprio: int = 0
    comm: str | None = None  # version 3: the thread's name (/proc/PID/task/TID/comm); None before
    # version 3: per-thread state the kernel keeps that differs from the main thread's and that a
    # restore (which clones every thread from the main one) cannot give back, by name
    own: list[str] = field(default_factory=list)
    pdeathsig: int = 0  # version 3: a thread's own parent-death signal (the main thread's: props)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sigaltstack"] = None if self.sigaltstack is None else list(self.sigaltstack)
        d["robust_list"] = list(self.robust_list)
        return d

    @classmethod
    def from_dict(cls, v: Any, where: str) -> ThreadProps:
        d = as_map(v, where)

        def w(k: str) -> str:
            return f"{where}.{k}"

        ss_raw = get(d, "sigaltstack", where)
        ss = None
        if ss_raw is not None:
            parts = as_list(ss_raw, w("sigaltstack"), 3)
            if len(parts) != 3:
                fail(w("sigaltstack"), "expected [sp, flags, size]")
            ss = (
                as_int(parts[0], w("sigaltstack"), 0, ADDR_LIMIT),
                as_int(parts[1], w("sigaltstack"), 0, (1 << 32) - 1),
                as_int(parts[2], w("sigaltstack"), 0, ADDR_LIMIT),
            )
        rl = as_list(get(d, "robust_list", where), w("robust_list"), 2)
        if len(rl) != 2:
            fail(w("robust_list"), "expected [head, len]")
        return cls(
            sigaltstack=ss,
            robust_list=(
                as_int(rl[0], w("robust_list"), 0, ADDR_LIMIT),
                as_int(rl[1], w("robust_list"), 0, 1 << 20),
            ),
            tid_address=as_int(get(d, "tid_address", where), w("tid_address"), 0, ADDR_LIMIT),
            policy=as_int(get(d, "policy", where), w("policy"), 0, (1 << 31) - 1),
            rt_priority=as_int(get(d, "rt_priority", where), w("rt_priority"), 0, 99),
            nice=as_int(get(d, "nice", where), w("nice"), -20, 19),
            affinity=[
                as_int(c, w("affinity"), 0, 1 << 16)
                for c in as_list(get(d, "affinity", where), w("affinity"), 1 << 16)
            ],
            timerslack_ns=as_int(get(d, "timerslack_ns", where), w("timerslack_ns"), 0, I64_MAX),
            ioprio=as_int(get(d, "ioprio", where), w("ioprio"), 0, (1 << 16) - 1),
            comm=as_opt_str(d.get("comm"), w("comm"), 64),
            own=[as_str(x, w("own"), 64) for x in as_list(d.get("own", []), w("own"), 64)],
            pdeathsig=as_int(d.get("pdeathsig", 0), w("pdeathsig"), 0, 64),
        )


@dataclass
class ThreadRecord:
    tid: int
    regs: dict[str, int]  # user_regs_struct by name, including fs_base, gs_base, orig_rax
    xsave: bytes
    sigmask: int
    state: str
    # The rseq registration (PTRACE_GET_RSEQ_CONFIGURATION): (area address, length, signature);
    # None when the thread had none, or in a version-1 layer.
    rseq: tuple[int, int, int] | None = None
    props: ThreadProps | None = None  # None in a version-1 layer

    def to_dict(self) -> dict[str, Any]:
        return {
            "tid": self.tid,
            "regs": dict(self.regs),
            "xsave": self.xsave,
            "sigmask": self.sigmask,
            "state": self.state,
            "rseq": None if self.rseq is None else list(self.rseq),
            "props": None if self.props is None else self.props.to_dict(),
        }

    @classmethod
    def from_dict(cls, v: Any, where: str) -> ThreadRecord:
        d = as_map(v, where)
        regs_raw = as_map(get(d, "regs", where), f"{where}.regs")
        if len(regs_raw) > 256:
            fail(f"{where}.regs", f"{len(regs_raw)} registers, more than the 256 allowed")
        regs = {
            as_str(k, f"{where}.regs key", 32): as_int(r, f"{where}.regs.{k}") for k, r in regs_raw.items()
        }
        return cls(
            tid=as_int(get(d, "tid", where), f"{where}.tid", 1, MAX_PID),
            regs=regs,
            xsave=as_bytes(get(d, "xsave", where), f"{where}.xsave", 1 << 20),
            sigmask=as_int(get(d, "sigmask", where), f"{where}.sigmask"),
            state=as_str(get(d, "state", where), f"{where}.state", 64),
            rseq=_rseq(d.get("rseq"), f"{where}.rseq"),
            props=None if d.get("props") is None else ThreadProps.from_dict(d["props"], f"{where}.props"),
        )


RSEQ_MAX_LEN = 1 << 12  # the area is 32 bytes today; the kernel takes larger ones as it grows


def _rseq(v: Any, where: str) -> tuple[int, int, int] | None:
    if v is None:
        return None
    parts = as_list(v, where, 3)
    if len(parts) != 3:
        fail(where, "expected [address, length, signature]")
    addr = as_int(parts[0], f"{where}[0]", 1, ADDR_LIMIT - 1)
    length = as_int(parts[1], f"{where}[1]", 20, RSEQ_MAX_LEN)
    if addr % 32 or addr + length > ADDR_LIMIT:
        fail(where, f"area [0x{addr:x}, +{length}) is not 32-byte aligned in user space")
    return addr, length, as_int(parts[2], f"{where}[2]", 0, (1 << 32) - 1)


@dataclass
class SigactionRecord:
    sig: int
    handler: int
    flags: int
    restorer: int
    mask: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "sig": self.sig,
            "handler": self.handler,
            "flags": self.flags,
            "restorer": self.restorer,
            "mask": self.mask,
        }

    @classmethod
    def from_dict(cls, v: Any, where: str) -> SigactionRecord:
        d = as_map(v, where)
        return cls(
            sig=as_int(get(d, "sig", where), f"{where}.sig", 1, 64),
            handler=as_int(get(d, "handler", where), f"{where}.handler"),
            flags=as_int(get(d, "flags", where), f"{where}.flags"),
            restorer=as_int(get(d, "restorer", where), f"{where}.restorer"),
            mask=as_int(get(d, "mask", where), f"{where}.mask"),
        )


@dataclass
class FdRecord:
    fd: int
    kind: str  # file | dir | pipe | fifo | socket | tty | chr | blk | anon | memfd | unknown
    path: str
    flags: int
    pos: int
    mnt_id: int
    dev: int = 0
    ino: int = 0
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0
    dup_of: int = -1  # version 7: a lower fd of the same open file description (a dup), or -1

    def to_dict(self) -> dict[str, Any]:
        out = {
            "fd": self.fd, "kind": self.kind, "path": self.path, "flags": self.flags, "pos": self.pos,
            "mnt_id": self.mnt_id, "dev": self.dev, "ino": self.ino, "mode": self.mode, "size": self.size,
            "mtime_ns": self.mtime_ns,
        }  # fmt: skip
        if self.dup_of >= 0:
            out["dup_of"] = self.dup_of
        return out

    @classmethod
    def from_dict(cls, v: Any, where: str) -> FdRecord:
        d = as_map(v, where)
        return cls(
            fd=as_int(get(d, "fd", where), f"{where}.fd", 0, (1 << 31) - 1),
            kind=as_str(get(d, "kind", where), f"{where}.kind", 32),
            path=as_str(get(d, "path", where), f"{where}.path", PATH_STR),
            flags=as_int(get(d, "flags", where), f"{where}.flags", 0, (1 << 32) - 1),
            pos=as_int(get(d, "pos", where), f"{where}.pos", 0, I64_MAX),
            mnt_id=as_int(get(d, "mnt_id", where), f"{where}.mnt_id", 0, (1 << 32) - 1),
            dev=as_int(get(d, "dev", where), f"{where}.dev"),
            ino=as_int(get(d, "ino", where), f"{where}.ino"),
            mode=as_int(get(d, "mode", where), f"{where}.mode", 0, (1 << 32) - 1),
            size=as_int(get(d, "size", where), f"{where}.size", 0, I64_MAX),
            mtime_ns=as_int(get(d, "mtime_ns", where), f"{where}.mtime_ns", I64_MIN, I64_MAX),
            dup_of=as_int(d.get("dup_of", -1), f"{where}.dup_of", -1, (1 << 31) - 1),
        )


_MM_INTS = (
    "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
    "arg_start", "arg_end", "env_start", "env_end",
)  # fmt: skip


@dataclass
class MmRecord:
    start_code: int = 0
    end_code: int = 0
    start_data: int = 0
    end_data: int = 0
    start_brk: int = 0
    brk: int = 0
    start_stack: int = 0
    arg_start: int = 0
    arg_end: int = 0
    env_start: int = 0
    env_end: int = 0
    auxv: bytes = b""
    cmdline: bytes = b""
    environ: bytes = b""
    cwd: str = ""
    root: str = "/"
    exe: str = ""
    exe_file: FileId | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in _MM_INTS}
        d.update(
            auxv=self.auxv,
            cmdline=self.cmdline,
            environ=self.environ,
            cwd=self.cwd,
            root=self.root,
            exe=self.exe,
            exe_file=None if self.exe_file is None else self.exe_file.to_dict(),
        )
        return d

    @classmethod
    def from_dict(cls, v: Any, where: str = "mm") -> MmRecord:
        d = as_map(v, where)
        ints = {k: as_int(get(d, k, where), f"{where}.{k}") for k in _MM_INTS}
        return cls(
            **ints,
            auxv=as_bytes(get(d, "auxv", where), f"{where}.auxv", 1 << 16),
            cmdline=as_bytes(get(d, "cmdline", where), f"{where}.cmdline"),
            environ=as_bytes(get(d, "environ", where), f"{where}.environ"),
            cwd=as_str(get(d, "cwd", where), f"{where}.cwd", PATH_STR),
            root=as_str(get(d, "root", where), f"{where}.root", PATH_STR),
            exe=as_str(get(d, "exe", where), f"{where}.exe", PATH_STR),
            exe_file=FileId.opt_from_dict(get(d, "exe_file", where), f"{where}.exe_file"),
        )


def _ids(v: Any, where: str) -> tuple[int, int, int, int]:
    ids = as_list(v, where, 4)
    if len(ids) != 4:
        fail(where, f"{len(ids)} ids; expected real, effective, saved and filesystem")
    r, e, s, f = (as_int(x, f"{where}[{i}]", 0, ID_MAX) for i, x in enumerate(ids))
    return r, e, s, f


@dataclass
class PendingSignal:
    """A signal the process had been sent but not yet handled when it was dumped."""

    tid: int  # the thread it was taken from (its private queue)
    sig: int
    info: bytes | None = None  # its siginfo_t (128 bytes), when the dumper had it
    shared: bool = False  # version 3: it was in the process's shared queue (any thread may take it)

    def to_dict(self) -> dict[str, Any]:
        return {"tid": self.tid, "sig": self.sig, "info": self.info, "shared": self.shared}

    @classmethod
    def from_dict(cls, v: Any, where: str) -> PendingSignal:
        d = as_map(v, where)
        info = get(d, "info", where)
        if info is not None:
            info = as_bytes(info, f"{where}.info", SIGINFO_SIZE)
            if len(info) != SIGINFO_SIZE:
                fail(f"{where}.info", f"{len(info)} bytes; a siginfo_t is {SIGINFO_SIZE}")
        return cls(
            tid=as_int(get(d, "tid", where), f"{where}.tid", 1, MAX_PID),
            sig=as_int(get(d, "sig", where), f"{where}.sig", 1, 64),
            info=info,
            shared=as_bool(d.get("shared", False), f"{where}.shared"),
        )


SECCOMP_MODES = (0, 1, 2)  # disabled, strict, filter (/proc/PID/status "Seccomp:")
MAX_FILTERS = 512  # the kernel's own bound is MAX_INSNS_PER_PATH (32768 insns over all filters)
BPF_MAXINSNS = 4096
CAP_MASK = (1 << 64) - 1


@dataclass
class SeccompFilter:
    """One classic-BPF seccomp filter as PTRACE_SECCOMP_GET_FILTER gives it: struct sock_filter
    instructions (8 bytes each), and the flags PTRACE_SECCOMP_GET_METADATA reports (FLAG_LOG...)."""

    prog: bytes
    flags: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"prog": self.prog, "flags": self.flags}

    @classmethod
    def from_dict(cls, v: Any, where: str) -> SeccompFilter:
        d = as_map(v, where)
        prog = as_bytes(get(d, "prog", where), f"{where}.prog", BPF_MAXINSNS * 8)
        if not prog or len(prog) % 8:
            fail(f"{where}.prog", f"{len(prog)} bytes; a filter is 1..{BPF_MAXINSNS} 8-byte instructions")
        return cls(prog=prog, flags=as_int(get(d, "flags", where), f"{where}.flags", 0, (1 << 32) - 1))


@dataclass
class SecurityRecord:
    """What limits the process beyond its ids: capability sets (/proc/PID/status Cap*), securebits
    (prctl PR_GET_SECUREBITS), no_new_privs and seccomp. `filters` is oldest first (the order to
    install them again); None when the dumper could not read them (needs CAP_SYS_ADMIN)."""

    cap_inh: int = 0
    cap_prm: int = 0
    cap_eff: int = 0
    cap_bnd: int = 0
    cap_amb: int = 0
    securebits: int = 0
    no_new_privs: bool = False
    seccomp_mode: int = 0
    filters: list[SeccompFilter] | None = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cap_inh": self.cap_inh,
            "cap_prm": self.cap_prm,
            "cap_eff": self.cap_eff,
            "cap_bnd": self.cap_bnd,
            "cap_amb": self.cap_amb,
            "securebits": self.securebits,
            "no_new_privs": self.no_new_privs,
            "seccomp_mode": self.seccomp_mode,
            "filters": None if self.filters is None else [f.to_dict() for f in self.filters],
        }

    @classmethod
    def from_dict(cls, v: Any, where: str) -> SecurityRecord:
        d = as_map(v, where)

        def cap(k: str) -> int:
            return as_int(get(d, k, where), f"{where}.{k}", 0, CAP_MASK)

        mode = as_int(get(d, "seccomp_mode", where), f"{where}.seccomp_mode", 0, 2)
        raw = get(d, "filters", where)
        filters = None
        if raw is not None:
            filters = [
                SeccompFilter.from_dict(f, f"{where}.filters[{i}]")
                for i, f in enumerate(as_list(raw, f"{where}.filters", MAX_FILTERS))
            ]
        if filters and mode != 2:
            fail(f"{where}.filters", f"{len(filters)} filters in seccomp mode {mode}")
        return cls(
            cap_inh=cap("cap_inh"),
            cap_prm=cap("cap_prm"),
            cap_eff=cap("cap_eff"),
            cap_bnd=cap("cap_bnd"),
            cap_amb=cap("cap_amb"),
            securebits=as_int(get(d, "securebits", where), f"{where}.securebits", 0, (1 << 32) - 1),
            no_new_privs=as_bool(get(d, "no_new_privs", where), f"{where}.no_new_privs"),
            seccomp_mode=mode,
            filters=filters,
        )


@dataclass
class TaskRecord:
    """The process as the kernel's task sees it: credentials, limits, umask, personality, children,
    and the signals pending for it. The defaults are those of a root process with nothing special."""

    uid: tuple[int, int, int, int] = (0, 0, 0, 0)  # real, effective, saved, filesystem
    gid: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: list[int] = field(default_factory=list)  # supplementary groups
    umask: int = 0o022
    personality: int = 0
    # Whether /proc/PID belongs to the process's user (PR_GET_DUMPABLE == 1). A change of
    # credentials resets it, so a restore sets it again after its setresuid.
    dumpable: bool = True
    # name (RLIMIT_NAMES) -> (soft, hard); 2**64-1 is RLIM_INFINITY
    rlimits: dict[str, tuple[int, int]] = field(default_factory=dict)
    children: list[int] = field(default_factory=list)  # pids of its child processes
    pending: list[PendingSignal] = field(default_factory=list)
    # Capabilities, securebits, no_new_privs, seccomp (format 2). None: a version 1 layer, which
    # did not record them.
    security: SecurityRecord | None = None
    # The stop signal of the job-control stop (group-stop) the process was in (version 8,
    # ckpt/jobstop.py); 0: it was running (and every older layer).
    stop: int = 0
    # The dump left it stopped with a SIGSTOP of ckpt's own (--leave-stopped; version 8): the next
    # dump of the chain that finds it stopped by SIGSTOP takes that stop for ckpt's, not the process's.
    ckpt_stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"stop": self.stop} if self.stop else {}),
            **({"ckpt_stopped": True} if self.ckpt_stopped else {}),
            "security": None if self.security is None else self.security.to_dict(),
            "uid": list(self.uid),
            "gid": list(self.gid),
            "groups": list(self.groups),
            "umask": self.umask,
            "personality": self.personality,
            "dumpable": self.dumpable,
            "rlimits": {k: [s, h] for k, (s, h) in self.rlimits.items()},
            "children": list(self.children),
            "pending": [p.to_dict() for p in self.pending],
        }

    @classmethod
    def from_dict(cls, v: Any, where: str = "task") -> TaskRecord:
        d = as_map(v, where)

        def w(k: str) -> str:
            return f"{where}.{k}"

        groups = [
            as_int(g, f"{where}.groups[{i}]", 0, ID_MAX)
            for i, g in enumerate(as_list(get(d, "groups", where), w("groups"), MAX_GROUPS))
        ]
        rl_raw = as_map(get(d, "rlimits", where), w("rlimits"))
        rlimits: dict[str, tuple[int, int]] = {}
        for k, pair_raw in rl_raw.items():
            name = as_str(k, w("rlimits") + " key", 16)
            if name not in RLIMIT_NAMES:
                fail(w("rlimits"), f"{name!r} is not one of {', '.join(RLIMIT_NAMES)}")
            rw = w(f"rlimits.{name}")
            pair = as_list(pair_raw, rw, 2)
            if len(pair) != 2:
                fail(rw, "expected a [soft, hard] pair")
            soft, hard = (as_int(x, rw) for x in pair)
            if soft > hard:
                fail(rw, f"soft limit {soft} is above the hard limit {hard}")
            rlimits[name] = (soft, hard)
        children = [
            as_int(c, f"{where}.children[{i}]", 1, MAX_PID)
            for i, c in enumerate(as_list(get(d, "children", where), w("children"), MAX_PID))
        ]
        if len(set(children)) != len(children):
            fail(w("children"), "a pid appears twice")
        pending = [
            PendingSignal.from_dict(p, f"{where}.pending[{i}]")
            for i, p in enumerate(as_list(get(d, "pending", where), w("pending"), MAX_PENDING))
        ]
        sec = d.get("security")
        stop = as_int(d.get("stop", 0), w("stop"), 0, 64)
        if stop and stop not in STOP_SIGNALS:
            fail(w("stop"), f"{stop} is not a stop signal ({', '.join(map(str, STOP_SIGNALS))})")
        return cls(
            security=None if sec is None else SecurityRecord.from_dict(sec, w("security")),
            uid=_ids(get(d, "uid", where), w("uid")),
            gid=_ids(get(d, "gid", where), w("gid")),
            groups=groups,
            umask=as_int(get(d, "umask", where), w("umask"), 0, 0o777),
            personality=as_int(get(d, "personality", where), w("personality"), 0, (1 << 32) - 1),
            dumpable=as_bool(get(d, "dumpable", where), w("dumpable")),
            rlimits=rlimits,
            children=children,
            pending=pending,
            stop=stop,
            ckpt_stopped=as_bool(d.get("ckpt_stopped", False), w("ckpt_stopped")),
        )


MAX_TIMERS = 1 << 16
MAX_LOCKS = 1 << 16
TIMER_NOTIFY = ("signal", "thread", "none")
LOCK_KINDS = ("FLOCK", "POSIX", "OFDLCK", "LEASE", "DELEG")  # the last two are refused at restore


@dataclass
class PosixTimer:
    """One POSIX timer (/proc/PID/timers, with timer_gettime injected for its time)."""

    id: int
    clock: int  # clockid_t, as the kernel shows it (negative: a CPU-time clock)
    signo: int
    sigval: int  # sigev_value as the kernel shows it (64 bits)
    notify: str  # signal | thread | none
    tid: int  # the thread of SIGEV_THREAD_ID, or the process
    value_ns: int  # time left; 0 disarmed
    interval_ns: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, v: Any, where: str) -> PosixTimer:
        d = as_map(v, where)
        notify = as_str(get(d, "notify", where), f"{where}.notify", 16)
        if notify not in TIMER_NOTIFY:
            fail(f"{where}.notify", f"{notify!r} is not one of {', '.join(TIMER_NOTIFY)}")
        return cls(
            id=as_int(get(d, "id", where), f"{where}.id", 0, (1 << 31) - 1),
            clock=as_int(get(d, "clock", where), f"{where}.clock", -(1 << 31), (1 << 31) - 1),
            signo=as_int(get(d, "signo", where), f"{where}.signo", 0, 64),
            sigval=as_int(get(d, "sigval", where), f"{where}.sigval"),
            notify=notify,
            tid=as_int(get(d, "tid", where), f"{where}.tid", 0, MAX_PID),
            value_ns=as_int(get(d, "value_ns", where), f"{where}.value_ns", 0, I64_MAX),
            interval_ns=as_int(get(d, "interval_ns", where), f"{where}.interval_ns", 0, I64_MAX),
        )


@dataclass
class FileLock:
    """A lock the process held (/proc/PID/fdinfo lock lines), to be taken again through fd."""

    fd: int
    kind: str  # one of LOCK_KINDS
    write: bool
    start: int
    end: int  # last byte, -1 for "to the end of the file"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, v: Any, where: str) -> FileLock:
        d = as_map(v, where)
        kind = as_str(get(d, "kind", where), f"{where}.kind", 16)
        if kind not in LOCK_KINDS:
            fail(f"{where}.kind", f"{kind!r} is not one of {', '.join(LOCK_KINDS)}")
        start = as_int(get(d, "start", where), f"{where}.start", 0, I64_MAX)
        end = as_int(get(d, "end", where), f"{where}.end", -1, I64_MAX)
        if end != -1 and end < start:
            fail(where, f"ends ({end}) before it starts ({start})")
        return cls(
            fd=as_int(get(d, "fd", where), f"{where}.fd", 0, (1 << 31) - 1),
            kind=kind,
            write=as_bool(get(d, "write", where), f"{where}.write"),
            start=start,
            end=end,
        )


def _namespace(n: Any, where: str) -> tuple[str, int]:
    """A namespaces entry: exactly [type, inode]."""
    pair = as_list(n, where, 2)
    if len(pair) != 2:
        fail(where, "expected [type, inode]")
    return as_str(pair[0], where, 32), as_int(pair[1], where)


def _namespace_id(n: Any, where: str) -> tuple[str, int]:
    """A namespace_ids entry: exactly [type, id] (NS_GET_ID's 64-bit id)."""
    pair = as_list(n, where, 2)
    if len(pair) != 2:
        fail(where, "expected [type, id]")
    return as_str(pair[0], where, 32), as_int(pair[1], where)


def _one_line(r: Any, where: str) -> str:
    """A refused entry: printed in a refusal's one line, so printable and of one line."""
    text = as_str(r, where, 512)
    if not text.isprintable():
        fail(where, "not a printable line")
    return text


@dataclass
class PropsRecord:
    """Process state outside memory, threads and fds that a restore must give back (format version 2):
    from /proc (oom_score_adj, loginuid, THP, timers, locks, guard regions) and from syscalls
    injected at dump (itimers, POSIX timers' time left, membarrier registrations)."""

    oom_score_adj: int = 0
    loginuid: int = (1 << 32) - 1  # (uid_t)-1: never set
    thp_disabled: bool = False
    membarrier: int = 0  # MEMBARRIER_CMD_REGISTER_* bits of the private commands it had registered
    itimers: list[tuple[int, int]] = field(default_factory=list)  # REAL, VIRTUAL, PROF: (value, interval) us
    timers: list[PosixTimer] = field(default_factory=list)
    locks: list[FileLock] = field(default_factory=list)
    guards: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of guard regions
    pdeathsig: int = 0
    subreaper: bool = False
    coredump_filter: int = 0x33  # the kernel's default
    prctl: dict[str, int] = field(default_factory=dict)  # ckpt.proc.props.PRCTL_STATE, as answered
    # version 7: namespaces the process had that were not the dumping ckpt's: (type, inode)
    namespaces: list[tuple[str, int]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # version 7: what the dump found no restore gives back
    # version 8: the ids (nsfs NS_GET_ID, never reused) of those namespaces, when the kernel gives them
    namespace_ids: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "oom_score_adj": self.oom_score_adj,
            "loginuid": self.loginuid,
            "thp_disabled": self.thp_disabled,
            "membarrier": self.membarrier,
            "itimers": [list(t) for t in self.itimers],
            "timers": [t.to_dict() for t in self.timers],
            "locks": [lk.to_dict() for lk in self.locks],
            "guards": [list(g) for g in self.guards],
            "pdeathsig": self.pdeathsig,
            "subreaper": self.subreaper,
            "coredump_filter": self.coredump_filter,
            "prctl": dict(self.prctl),
            **({"namespaces": [list(n) for n in self.namespaces]} if self.namespaces else {}),
            **({"refused": list(self.refused)} if self.refused else {}),
            **({"namespace_ids": [list(n) for n in self.namespace_ids]} if self.namespace_ids else {}),
        }

    @classmethod
    def from_dict(cls, v: Any, where: str = "props") -> PropsRecord:
        d = as_map(v, where)

        def w(k: str) -> str:
            return f"{where}.{k}"

        itimers = []
        for i, t in enumerate(as_list(get(d, "itimers", where), w("itimers"), 3)):
            pair = as_list(t, f"{where}.itimers[{i}]", 2)
            if len(pair) != 2:
                fail(f"{where}.itimers[{i}]", "expected [value, interval]")
            a, b = (as_int(x, f"{where}.itimers[{i}]", 0, I64_MAX) for x in pair)
            itimers.append((a, b))
        guards = []
        for i, g in enumerate(as_list(get(d, "guards", where), w("guards"), MAX_RANGES)):
            pair = as_list(g, f"{where}.guards[{i}]", 2)
            if len(pair) != 2:
                fail(f"{where}.guards[{i}]", "expected [start, end)")
            a, b = (as_int(x, f"{where}.guards[{i}]", 0, ADDR_LIMIT) for x in pair)
            if a % PAGE_SIZE or b % PAGE_SIZE or a >= b:
                fail(f"{where}.guards[{i}]", f"[0x{a:x}, 0x{b:x}) is not a page-aligned range")
            guards.append((a, b))
        timers = [
            PosixTimer.from_dict(t, f"{where}.timers[{i}]")
            for i, t in enumerate(as_list(get(d, "timers", where), w("timers"), MAX_TIMERS))
        ]
        if len({t.id for t in timers}) != len(timers):
            fail(w("timers"), "a timer id appears twice")
        return cls(
            oom_score_adj=as_int(get(d, "oom_score_adj", where), w("oom_score_adj"), -1000, 1000),
            loginuid=as_int(get(d, "loginuid", where), w("loginuid"), 0, (1 << 32) - 1),
            thp_disabled=as_bool(get(d, "thp_disabled", where), w("thp_disabled")),
            membarrier=as_int(get(d, "membarrier", where), w("membarrier"), 0, (1 << 31) - 1),
            itimers=itimers,
            timers=timers,
            locks=[
                FileLock.from_dict(lk, f"{where}.locks[{i}]")
                for i, lk in enumerate(as_list(get(d, "locks", where), w("locks"), MAX_LOCKS))
            ],
            guards=guards,
            pdeathsig=as_int(get(d, "pdeathsig", where), w("pdeathsig"), 0, 64),
            subreaper=as_bool(get(d, "subreaper", where), w("subreaper")),
            coredump_filter=as_int(get(d, "coredump_filter", where), w("coredump_filter"), 0, (1 << 32) - 1),
            prctl={
                as_str(k, w("prctl") + " key", 64): as_int(x, w(f"prctl.{k}"), -(1 << 31), (1 << 31) - 1)
                for k, x in as_map(get(d, "prctl", where), w("prctl")).items()
            },
            namespaces=[
                _namespace(n, w(f"namespaces[{i}]"))
                for i, n in enumerate(as_list(d.get("namespaces", []), w("namespaces"), 16))
            ],
            refused=[
                _one_line(r, w(f"refused[{i}]"))
                for i, r in enumerate(as_list(d.get("refused", []), w("refused"), 64))
            ],
            namespace_ids=[
                _namespace_id(n, w(f"namespace_ids[{i}]"))
                for i, n in enumerate(as_list(d.get("namespace_ids", []), w("namespace_ids"), 16))
            ],
        )


@dataclass
class ChunkRecord:
    offset: int  # file offset of the stored bytes (a zstd frame, or the pages themselves if raw)
    clen: int  # their length
    npages: int  # pages it holds once decompressed
    xxh3: int  # xxh3_64 of the stored bytes
    raw: bool = False  # version 2: the pages stored as they are (they did not shrink)
    pxxh3: int | None = None  # version 2: xxh3_64 of the npages * 4096 bytes of pages; None in version 1

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "offset": self.offset,
            "clen": self.clen,
            "npages": self.npages,
            "xxh3": self.xxh3,
        }
        if self.pxxh3 is not None:
            d["raw"] = self.raw
            d["pxxh3"] = self.pxxh3
        return d

    @classmethod
    def from_dict(cls, v: Any, where: str, chunk_pages: int, version: int = FORMAT_VERSION) -> ChunkRecord:
        d = as_map(v, where)
        rec = cls(
            offset=as_int(get(d, "offset", where), f"{where}.offset", 0, I64_MAX),
            clen=as_int(get(d, "clen", where), f"{where}.clen", 1, I64_MAX),
            npages=as_int(get(d, "npages", where), f"{where}.npages", 1, chunk_pages),
            xxh3=as_int(get(d, "xxh3", where), f"{where}.xxh3"),
        )
        if version >= 2:
            rec.raw = as_bool(get(d, "raw", where), f"{where}.raw")
            rec.pxxh3 = as_int(get(d, "pxxh3", where), f"{where}.pxxh3")
            if rec.raw and rec.clen != rec.npages * PAGE_SIZE:
                fail(f"{where}.clen", f"{rec.clen} for a raw chunk of {rec.npages} pages")
            if rec.raw and rec.pxxh3 != rec.xxh3:
                fail(f"{where}.pxxh3", "differs from xxh3 in a raw chunk (the same bytes)")
        return rec


_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
# Rows of a merged page table: one per present page of a process; 2**36 pages is 256 TiB.
MAX_TABLE_ROWS = 1 << 36
MAX_CHAIN_LAYERS = 10000  # chain.MAX_CHAIN: a longer chain is refused when opened


@dataclass
class TableRef:
    """The merged page table of the chain this layer tops, as its writer computed it: the sha256 of
    the body of the table file beside the layer (ckpt/image/tablecache.py), its rows, the chain's
    length and its root layer. Optional (version 8 writers from this one on): a layer is complete
    without it, and only the table file is checked against it. The table file is derived and
    untrusted; this record, inside the layer's checksummed metadata, is what makes it usable."""

    sha256: str  # 64 lowercase hex digits
    rows: int  # present pages of the merged view (data and zero)
    layers: int  # layers of the chain, this one included (1: it has no parent)
    root: str  # the chain's bottom layer: relative to this layer's directory, or absolute

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "rows": self.rows, "layers": self.layers, "root": self.root}

    @classmethod
    def from_dict(cls, v: Any, where: str = "table") -> TableRef:
        d = as_map(v, where)
        sha = as_str(get(d, "sha256", where), f"{where}.sha256", 64)
        if not _SHA256_RE.match(sha):
            fail(f"{where}.sha256", "not 64 lowercase hex digits")
        root = as_str(get(d, "root", where), f"{where}.root", PATH_STR)
        if not root or "\0" in root:
            fail(f"{where}.root", "empty or holds a NUL byte")
        return cls(
            sha256=sha,
            rows=as_int(get(d, "rows", where), f"{where}.rows", 0, MAX_TABLE_ROWS),
            layers=as_int(get(d, "layers", where), f"{where}.layers", 1, MAX_CHAIN_LAYERS),
            root=root,
        )


# A PageIndex column: a numpy uint64 array or an array('Q').
Column = Any


def _empty() -> Column:
    return array("Q")


@dataclass(eq=False)
class PageIndex:
    """Which pages this layer stores, which it declares zero or absent, and where its chunks are.

    The arrays are uint64 (sorted ascending, page addresses, except `digests`). `data` and `digests`
    are in chunk order: data page i is in the chunk whose cumulative page range covers i. Each is a
    numpy array or an `array('Q')` (both index, iterate, slice and give their buffer); a layer read
    from a file has array('Q')s when it is small (validate.as_u64_array), so that a small restore
    never imports numpy.
    """

    page_size: int = PAGE_SIZE
    chunk_pages: int = DEFAULT_CHUNK_PAGES
    data: Column = field(default_factory=_empty)
    digests: Column = field(default_factory=_empty)
    zero: Column = field(default_factory=_empty)
    absent: Column = field(default_factory=_empty)
    fresh: list[tuple[int, int]] = field(default_factory=list)  # [start, end): nothing below shows through
    unchanged: Column = field(default_factory=_empty)
    chunks: list[ChunkRecord] = field(default_factory=list)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageIndex):
            return NotImplemented
        return (
            self.page_size == other.page_size
            and self.chunk_pages == other.chunk_pages
            and all(
                len(getattr(self, k)) == len(getattr(other, k))
                and _u64_bytes(getattr(self, k)) == _u64_bytes(getattr(other, k))
                for k in ("data", "digests", "zero", "absent", "unchanged")
            )
            and [tuple(r) for r in self.fresh] == [tuple(r) for r in other.fresh]
            and self.chunks == other.chunks
        )

    __hash__ = None  # type: ignore[assignment]

    def chunk_first(self) -> Column:
        """Index of each chunk's first data page, plus the total at the end (len(chunks) + 1 values):
        int64, a numpy array if `data` is one, else an array('q')."""
        first = array("q", itertools.accumulate((c.npages for c in self.chunks), initial=0))
        if not is_numpy(self.data):
            return first
        import numpy as np

        return np.frombuffer(first, dtype=np.int64).copy()

    def to_dict(self) -> dict[str, Any]:
        return {
            "page_size": self.page_size,
            "chunk_pages": self.chunk_pages,
            "data": _u64_bytes(self.data),
            "digests": _u64_bytes(self.digests),
            "zero": _u64_bytes(self.zero),
            "absent": _u64_bytes(self.absent),
            "fresh": [[int(s), int(e)] for s, e in self.fresh],
            "unchanged": _u64_bytes(self.unchanged),
            "chunks": [c.to_dict() for c in self.chunks],
        }

    @classmethod
    def from_dict(
        cls,
        v: Any,
        where: str = "pages",
        *,
        chunk_area: tuple[int, int] | None = None,
        version: int = FORMAT_VERSION,
    ) -> PageIndex:
        """`chunk_area` is [first byte after the header, meta_offset): the chunks must tile it exactly.
        `version` is the layer's format version (chunk records differ)."""
        d = as_map(v, where)

        def w(k: str) -> str:
            return f"{where}.{k}"

        page_size = as_int(get(d, "page_size", where), w("page_size"))
        if page_size != PAGE_SIZE:
            fail(w("page_size"), f"{page_size}; ckpt layers have {PAGE_SIZE}-byte pages")
        chunk_pages = as_int(get(d, "chunk_pages", where), w("chunk_pages"), 1, MAX_CHUNK_PAGES)
        # One kind for the whole layer, by its page entries (what a restore's table is built from).
        raw = {k: get(d, k, where) for k in ("data", "digests", "zero", "absent", "unchanged")}
        dg, dt = raw["digests"], raw["data"]
        if isinstance(dg, bytes) and isinstance(dt, bytes) and len(dg) != len(dt):  # before any copy
            fail(w("digests"), f"{len(dg) // 8} digests for {len(dt) // 8} data pages")
        entries = sum(len(v) // 8 for k, v in raw.items() if k != "digests" and isinstance(v, bytes))
        small = entries <= pageset.small_max()
        arrays = {k: as_u64_array(v, w(k), small) for k, v in raw.items()}
        for k in ("data", "zero", "absent", "unchanged"):
            check_pages(arrays[k], w(k), page_size, ADDR_LIMIT)
        data = arrays["data"]
        # A page has one meaning in a layer: stored, zero, absent, or (unchanged) left to the parent.
        for a, b in (("data", "zero"), ("data", "absent"), ("zero", "absent"), ("data", "unchanged")):
            i = first_common(arrays[b], arrays[a])
            if i >= 0:
                fail(where, f"page 0x{int(arrays[b][i]):x} is in both {a!r} and {b!r}")

        fresh_raw = as_list(get(d, "fresh", where), w("fresh"), MAX_RANGES)
        fresh: list[tuple[int, int]] = []
        for i, r in enumerate(fresh_raw):
            rw = f"{where}.fresh[{i}]"
            pair = as_list(r, rw, 2)
            if len(pair) != 2:
                fail(rw, "expected a [start, end) pair")
            s, e = (as_int(x, rw, 0, ADDR_LIMIT) for x in pair)
            if s % page_size or e % page_size or s >= e:
                fail(rw, f"[0x{s:x}, 0x{e:x}) is not a non-empty page-aligned range")
            if fresh and s < fresh[-1][1]:
                fail(rw, "ranges are not sorted and disjoint")
            fresh.append((s, e))

        chunks_raw = as_list(get(d, "chunks", where), w("chunks"), max(len(data), 0))
        chunks = [
            ChunkRecord.from_dict(c, f"{where}.chunks[{i}]", chunk_pages, version)
            for i, c in enumerate(chunks_raw)
        ]
        total = sum(c.npages for c in chunks)
        if total != len(data):
            fail(w("chunks"), f"chunks hold {total} pages but {len(data)} data pages are listed")
        # Chunks tile the chunk area back to back; no gaps means no unchecked bytes in the file.
        pos = chunk_area[0] if chunk_area else (chunks[0].offset if chunks else 0)
        for i, c in enumerate(chunks):
            if c.offset != pos:
                fail(f"{where}.chunks[{i}]", f"offset {c.offset}, expected {pos} (chunks are back to back)")
            pos += c.clen
        if chunk_area and pos != chunk_area[1]:
            fail(w("chunks"), f"chunks end at {pos}, but the chunk area ends at {chunk_area[1]}")
        return cls(
            page_size=page_size,
            chunk_pages=chunk_pages,
            data=data,
            digests=arrays["digests"],
            zero=arrays["zero"],
            absent=arrays["absent"],
            fresh=fresh,
            unchanged=arrays["unchanged"],
            chunks=chunks,
        )


def _records(d: dict[Any, Any], key: str, limit: int) -> list[tuple[str, Any]]:
    return [(f"{key}[{i}]", r) for i, r in enumerate(as_list(get(d, key, "metadata"), key, limit))]


def _optional_records(d: dict[Any, Any], key: str, limit: int) -> list[tuple[str, Any]]:
    """A list added in a later version: absent from older layers, which had none."""
    return _records(d, key, limit) if key in d else []


@dataclass
class LayerMeta:
    inventory: Inventory
    vmas: list[VmaRecord] = field(default_factory=list)
    threads: list[ThreadRecord] = field(default_factory=list)
    sigactions: list[SigactionRecord] = field(default_factory=list)
    fds: list[FdRecord] = field(default_factory=list)
    mm: MmRecord = field(default_factory=MmRecord)
    pages: PageIndex = field(default_factory=PageIndex)
    task: TaskRecord = field(default_factory=TaskRecord)
    props: PropsRecord | None = None  # None in a version-1 layer
    pipes: list[PipeRecord] = field(default_factory=list)  # version 3; absent before: []
    tree: TreeRecord | None = None  # the root of a tree dump: every process of it (format 3)
    anonfds: list[AnonFdRecord] = field(default_factory=list)  # version 3; absent before: []
    # memfds, deleted files, SysV segments with their contents (version 3; ckpt/image/objects.py)
    objects: list[ObjectRecord] = field(default_factory=list)
    inet_listen: list[InetListenRecord] = field(default_factory=list)  # listening TCP sockets (v3)
    tcp_established: list[TcpRecord] = field(default_factory=list)  # version 4; absent before: []
    pidns: PidNsRecord | None = None  # version 6: ids inside a pid namespace not ckpt's (image/pidns.py)
    # optional: the digest of the chain's merged page table kept beside the layer (TableRef)
    table: TableRef | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **({} if self.tree is None else {"tree": self.tree.to_dict()}),
            "pipes": [p.to_dict() for p in self.pipes],
            "anonfds": [a.to_dict() for a in self.anonfds],
            **({"objects": [o.to_dict() for o in self.objects]} if self.objects else {}),
            **({"inet_listen": [s.to_dict() for s in self.inet_listen]} if self.inet_listen else {}),
            **(
                {"tcp_established": [t.to_dict() for t in self.tcp_established]}
                if self.tcp_established
                else {}
            ),
            **({} if self.pidns is None else {"pidns": self.pidns.to_dict()}),
            **({} if self.table is None else {"table": self.table.to_dict()}),
            "inventory": self.inventory.to_dict(),
            "vmas": [v.to_dict() for v in self.vmas],
            "threads": [t.to_dict() for t in self.threads],
            "sigactions": [s.to_dict() for s in self.sigactions],
            "fds": [f.to_dict() for f in self.fds],
            "mm": self.mm.to_dict(),
            "task": self.task.to_dict(),
            "props": None if self.props is None else self.props.to_dict(),
            "pages": self.pages.to_dict(),
        }

    @classmethod
    def from_dict(
        cls, v: Any, *, chunk_area: tuple[int, int] | None = None, memo: RecordMemo | None = None
    ) -> LayerMeta:
        """`memo`: sections whose bytes were checked before give the same records (recmemo.py)."""
        d = as_map(v, "metadata")

        def sect(key: str, build: Callable[[], _T]) -> _T:
            return section(memo, d, key, build)

        vmas = sect("vmas", lambda: [VmaRecord.from_dict(r, w) for w, r in _records(d, "vmas", MAX_VMAS)])
        for i in range(1, len(vmas)):
            if vmas[i].start < vmas[i - 1].end:
                fail(f"vmas[{i}]", f"0x{vmas[i].start:x} overlaps or precedes the mapping before it")
        threads = sect(
            "threads", lambda: [ThreadRecord.from_dict(r, w) for w, r in _records(d, "threads", MAX_THREADS)]
        )
        if len({t.tid for t in threads}) != len(threads):
            fail("threads", "a thread id appears twice")
        sigactions = sect(
            "sigactions", lambda: [SigactionRecord.from_dict(r, w) for w, r in _records(d, "sigactions", 64)]
        )
        if len({s.sig for s in sigactions}) != len(sigactions):
            fail("sigactions", "a signal appears twice")
        fds = sect("fds", lambda: [FdRecord.from_dict(r, w) for w, r in _records(d, "fds", MAX_FDS)])
        if len({f.fd for f in fds}) != len(fds):
            fail("fds", "an fd number appears twice")
        inventory = Inventory.from_dict(get(d, "inventory", "metadata"))
        meta = cls(
            inventory=inventory,
            vmas=vmas,
            threads=threads,
            sigactions=sigactions,
            fds=fds,
            mm=sect("mm", lambda: MmRecord.from_dict(get(d, "mm", "metadata"))),
            pages=PageIndex.from_dict(
                get(d, "pages", "metadata"), chunk_area=chunk_area, version=inventory.version
            ),
            task=sect("task", lambda: TaskRecord.from_dict(get(d, "task", "metadata"))),
            props=sect(
                "props", lambda: None if d.get("props") is None else PropsRecord.from_dict(d["props"])
            ),
            tree=None if d.get("tree") is None else TreeRecord.from_dict(d["tree"]),
            pipes=sect(
                "pipes",
                lambda: [PipeRecord.from_dict(r, w) for w, r in _optional_records(d, "pipes", MAX_FDS)],
            ),
            anonfds=sect(
                "anonfds",
                lambda: [AnonFdRecord.from_dict(r, w) for w, r in _optional_records(d, "anonfds", MAX_FDS)],
            ),
            objects=objects_from(d.get("objects")),
            inet_listen=sockets_from(d.get("inet_listen")),
            tcp_established=tcp_from(d.get("tcp_established")),
            pidns=None if d.get("pidns") is None else PidNsRecord.from_dict(d["pidns"]),
            table=None if d.get("table") is None else TableRef.from_dict(d["table"]),
        )
        if meta.pidns is not None:
            check_threads(meta.pidns, inventory.pid, {t.tid for t in threads})
        if len({p.ino for p in meta.pipes}) != len(meta.pipes):
            fail("pipes", "a pipe inode appears twice")
        if len({a.fd for a in meta.anonfds}) != len(meta.anonfds):
            fail("anonfds", "an fd appears twice")
        tids = {t.tid for t in threads}
        for i, p in enumerate(meta.task.pending):
            if p.tid not in tids:
                fail(f"task.pending[{i}].tid", f"{p.tid} is not one of the layer's threads")
        # Every page the layer speaks of must lie in one of its mappings. (Data pages must lie in a
        # dumped one: nothing else is ever read. Zero/absent entries in a mapping that turned out
        # unreadable are harmless, and refusing them would fail a dump over a race.)
        pg = meta.pages
        dumped = [(v.start, v.end) for v in vmas if v.dumped]
        mapped = [(v.start, v.end) for v in vmas]
        for k, spans in (("data", dumped), ("zero", mapped), ("absent", mapped), ("unchanged", mapped)):
            a = getattr(pg, k)
            i = first_outside(a, spans)
            if i >= 0:
                addr = int(a[i])
                what = "a dumped mapping" if k == "data" else "a mapping"
                fail(f"pages.{k}", f"page 0x{addr:x} is not inside {what}")
        return meta


__all__ = [
    "ADDR_LIMIT",
    "DEFAULT_CHUNK_PAGES",
    "FOOTER_MAGIC",
    "FOOTER_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HEADER_MAGIC",
    "HEADER_SIZE",
    "MAX_CHUNK_PAGES",
    "MAX_TABLE_ROWS",
    "PAGE_SIZE",
    "READ_VERSIONS",
    "RLIMIT_NAMES",
    "ZERO_PAGE_DIGEST",
    "AnonFdRecord",
    "ChunkRecord",
    "FdRecord",
    "FileId",
    "FileLock",
    "Inventory",
    "LayerMeta",
    "MetaError",
    "MmRecord",
    "PageIndex",
    "ParentRef",
    "PendingSignal",
    "PipeRecord",
    "PosixTimer",
    "PropsRecord",
    "SeccompFilter",
    "SecurityRecord",
    "SigactionRecord",
    "TableRef",
    "TaskRecord",
    "ThreadProps",
    "ThreadRecord",
    "VmaRecord",
    "page_digests",
    "versions_read",
]
