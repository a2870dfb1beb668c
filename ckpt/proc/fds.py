"""The fd table: /proc/PID/fd and fdinfo."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat as st_mod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ckpt.cbuf import char_buffer, warm
from ckpt.errors import TargetExited
from ckpt.proc.procfs import as_text, slurp

if TYPE_CHECKING:
    from ckpt.proc.grab import FdEntry


class StatLike(Protocol):
    """What a record takes of a stat: os.stat_result, or a grabbed entry's same fields."""

    @property
    def st_dev(self) -> int: ...
    @property
    def st_ino(self) -> int: ...
    @property
    def st_mode(self) -> int: ...
    @property
    def st_size(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_rdev(self) -> int: ...


@dataclass  # not frozen: made for every fd inside every freeze, and a frozen one cost ~2.5x as much
class FdInfo:
    fd: int
    # file | dir | pipe | fifo | socket | tty | chr | blk | anon | memfd | nsfs | symlink | mqueue | unknown
    kind: str
    path: str  # readlink of /proc/PID/fd/N: "/etc/passwd", "pipe:[123]", "anon_inode:[userfaultfd]"
    flags: int  # open flags (octal in fdinfo), O_CLOEXEC included
    pos: int
    mnt_id: int
    dev: int = 0
    ino: int = 0
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0


_NS_RE = re.compile(r"[a-z_]+:\[\d+\]\Z")


def _kind(path: str, mode: int, rdev: int) -> str:
    if path.startswith("pipe:"):
        return "pipe"
    if path.startswith("socket:"):
        return "socket"
    if path.startswith("anon_inode:"):
        return "anon"
    if path.startswith("/memfd:"):
        return "memfd"
    if _NS_RE.match(path):
        return "nsfs"  # a /proc/PID/ns/* handle: its link reads TYPE:[INODE], not a path
    if st_mod.S_ISLNK(mode):
        return "symlink"  # opened O_PATH|O_NOFOLLOW
    if st_mod.S_ISREG(mode):
        return "file"
    if st_mod.S_ISDIR(mode):
        return "dir"
    if st_mod.S_ISFIFO(mode):
        return "fifo"
    if st_mod.S_ISCHR(mode):
        # The open file's own device (the fd's stat), not that of a path looked up again in ckpt's
        # mount namespace, which may name another device or none (a container's /dev/pts/N).
        return "tty" if os.major(rdev) in (4, 5, 136) else "chr"
    if st_mod.S_ISBLK(mode):
        return "blk"
    return "unknown"


MQUEUE_MAGIC = 0x19800202
STATFS_SIZE = 120  # struct statfs on x86_64; f_type is its first field
warm(ctypes.c_char, STATFS_SIZE)  # (made at import, not in a freeze: ckpt/cbuf.py; objects.py's too)
_libc = ctypes.CDLL(None, use_errno=True)
_statfs = _libc.statfs  # (looked up at import, not in a freeze)


def _is_mqueue_dev(dev: int, probe: str, known: dict[int, bool]) -> bool:
    """Whether the filesystem of device `dev` (its file `probe`) is mqueue: a POSIX message queue's
    fd reads as a regular file named "/NAME". Asked once per device in one listing (`known`; not
    across listings: a device number is reused once its filesystem is gone)."""
    if dev not in known:
        buf = char_buffer(STATFS_SIZE)
        ok = _statfs(probe.encode(), buf) == 0
        known[dev] = ok and int.from_bytes(buf.raw[:8], "little") == MQUEUE_MAGIC
    return known[dev]


def fields_of(text: str) -> dict[str, str]:
    """An fdinfo text's fields by name (of repeated ones, the last)."""
    out: dict[str, str] = {}
    for ln in text.splitlines():
        k, _, v = ln.partition(":")
        out[k.strip()] = v.strip()
    return out


def read_fdinfo(pid: int, fd: int, texts: dict[int, str] | None = None) -> dict[str, str]:
    """fdinfo's fields by name (of repeated ones such as "lock:", the last). ``texts``: also keep
    the whole text there, by fd (read_locks reads its "lock:" lines from it, no second read)."""
    text = as_text(slurp(f"/proc/{pid}/fdinfo/{fd}"), "surrogateescape")
    if texts is not None:
        texts[fd] = text
    return fields_of(text)


def _record(
    fd: int, path: str, info: dict[str, str], s: StatLike, base: str, devs: dict[int, bool]
) -> FdInfo:
    kind = _kind(path, s.st_mode, s.st_rdev)
    if kind == "file" and _is_mqueue_dev(s.st_dev, f"{base}/{fd}", devs):
        kind = "mqueue"
    return FdInfo(
        fd=fd,
        kind=kind,
        path=path,
        flags=int(info.get("flags", "0"), 8),
        pos=int(info.get("pos", "0")),
        mnt_id=int(info.get("mnt_id", "0")),
        dev=s.st_dev,
        ino=s.st_ino,
        mode=s.st_mode,
        size=s.st_size,
        mtime_ns=s.st_mtime_ns,
    )


def list_fds(
    pid: int, texts: dict[int, str] | None = None, table: list[FdEntry] | None = None
) -> list[FdInfo]:
    """The open fds, ascending. ``texts``: filled with each listed fd's fdinfo text. ``table``: the
    same table as ckpt/proc/grab.py read it in this freeze (the same calls' answers), not read again."""
    base = f"/proc/{pid}/fd"
    if table is not None:
        return _from_table(table, base, texts)
    try:
        names = os.listdir(base)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetExited(f"process {pid} exited") from None
    out = []
    devs: dict[int, bool] = {}
    for name in sorted(names, key=int):
        fd = int(name)
        try:
            path = os.readlink(f"{base}/{fd}")
            info = read_fdinfo(pid, fd, texts)
            s = os.stat(f"{base}/{fd}")  # follows the magic link to the open file itself
        except FileNotFoundError:
            continue  # closed while we listed (only possible before the freeze)
        out.append(_record(fd, path, info, s, base, devs))
    return out


def _from_table(table: list[FdEntry], base: str, texts: dict[int, str] | None) -> list[FdInfo]:
    """list_fds from a grabbed table: an entry whose call failed fails here as that call would
    have (the fd skipped where it was closed, an OSError naming the path otherwise)."""
    out = []
    devs: dict[int, bool] = {}
    for e in sorted(table, key=lambda e: e.fd):
        if e.err == errno.ENOENT:
            continue
        if e.err:
            where = f"{base[:-2]}fdinfo/{e.fd}" if e.which == 1 else f"{base}/{e.fd}"
            raise OSError(e.err, os.strerror(e.err), where)
        text = as_text(e.info, "surrogateescape")
        if texts is not None:
            texts[e.fd] = text
        out.append(_record(e.fd, e.link, fields_of(text), e, base, devs))
    return out
