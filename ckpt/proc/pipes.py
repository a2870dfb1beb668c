"""Pipes and FIFOs at dump: each pipe once, by inode, with its size and the bytes buffered in it.

The bytes are read without taking them from the process (CRIU's way): the dumper gets the pipe's
open file description with pidfd_getfd(2), and tee(2) copies the buffers into a pipe of its own of
the same size, which the dumper then reads. tee never consumes, so the target's pipe keeps every
byte whatever happens next; splicing the bytes out and back in would leave a window (and an error
path) in which they are gone from the process. tee needs a read end: a process that holds only the
write end of a pipe is read through a new read-only, non-blocking open of /proc/PID/fd/N.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import termios

from ckpt.errors import TargetError
from ckpt.image.fdobjects import MAX_PIPE_DATA
from ckpt.proc.fds import FdInfo
from ckpt.proc.grab import take_pipe

PIDFD_GETFD = 438
KCMP, KCMP_FILE = 312, 0
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
SPLICE_F_NONBLOCK = 2
PIPE_KINDS = ("pipe", "fifo")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.tee.restype = ctypes.c_ssize_t
_libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
_libc.syscall.restype = ctypes.c_long


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A new fd of ours on the open file description behind `fd` of the process (close-on-exec)."""
    r = int(_libc.syscall(PIDFD_GETFD, pidfd, fd, 0))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def kcmp(pid: int, type_: int, a: int, b: int) -> int:
    """kcmp(2) within one process: 0 when equal, 1 or 2 when ordered, -errno when it cannot say."""
    r = int(_libc.syscall(KCMP, pid, pid, type_, ctypes.c_ulong(a), ctypes.c_ulong(b)))
    return r if r >= 0 else -ctypes.get_errno()


class NoKcmp(Exception):
    """kcmp(2) cannot compare fds here (a kernel without CONFIG_KCMP)."""


def open_files(pid: int, fds: list[int]) -> list[list[int]]:
    """`fds` grouped by open file description, in order; [] when kcmp cannot tell (the restore
    then shares a description between the fds of one end with the same flags)."""
    try:
        return _open_files(pid, fds)
    except NoKcmp:
        return []


class Descriptions:
    """The open file descriptions of a process's fds met so far, each by its first fd, kept in
    kcmp's order (kcmp(2) orders two files as well as telling them equal: 1 less, 2 greater): which
    one a further fd is costs O(log n) kcmp calls, where comparing it with every one met before
    cost O(n), and a table of n fds O(n^2) calls inside the freeze (500 sockets: ~125,000 calls,
    ~0.4 s). CRIU sorts its kcmp ids the same way (kcmp-ids.c)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.firsts: list[int] = []  # ascending in kcmp's order

    def first_of(self, fd: int) -> int:
        """The first fd met of ``fd``'s description, or -1 when it is a new one (then kept)."""
        lo, hi = 0, len(self.firsts)
        while lo < hi:
            mid = (lo + hi) // 2
            r = kcmp(self.pid, KCMP_FILE, self.firsts[mid], fd)
            if r == 0:
                return self.firsts[mid]
            if r == 1:  # firsts[mid] before fd
                lo = mid + 1
            elif r == 2:
                hi = mid
            else:  # (-errno; 3: no order, which KCMP_FILE always has)
                raise NoKcmp(f"kcmp() cannot order fds {self.firsts[mid]} and {fd} of process {self.pid}")
        self.firsts.insert(lo, fd)
        return -1


def _open_files(pid: int, fds: list[int]) -> list[list[int]]:
    out: dict[int, list[int]] = {}  # by first fd, in the order met
    seen = Descriptions(pid)
    for fd in fds:
        first = seen.first_of(fd)
        if first < 0:
            out[fd] = [fd]
        else:
            out[first].append(fd)
    return list(out.values())


def is_reader(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_WRONLY


def peek(fd: int) -> bytes:
    """Every byte buffered in the pipe `fd` (a read end), left where it is."""
    size = fcntl.fcntl(fd, F_GETPIPE_SZ)
    avail = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")
    if not avail:
        return b""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if fcntl.fcntl(w, F_SETPIPE_SZ, size) < avail:
            raise TargetError(f"a pipe of {size} bytes cannot take a copy of {avail} buffered bytes")
        n = _libc.tee(fd, w, avail, SPLICE_F_NONBLOCK)
        if n < 0:
            e = ctypes.get_errno()
            raise TargetError(f"tee() of a pipe's {avail} buffered bytes failed: {os.strerror(e)}")
        if n != avail:
            raise TargetError(f"tee() copied {n} of a pipe's {avail} buffered bytes")
        out = bytearray()
        while len(out) < n:
            out += os.read(r, n - len(out))
        return bytes(out)
    finally:
        os.close(r)
        os.close(w)


def read_pipes(pid: int, fds: list[FdInfo]) -> list[dict[str, object]]:
    """One record (a dict for PipeRecord) per pipe or FIFO inode among `fds` of the frozen process."""
    groups: dict[int, list[FdInfo]] = {}
    for f in fds:
        if f.kind in PIPE_KINDS:
            groups.setdefault(f.ino, []).append(f)
    if not groups:
        return []
    out: list[dict[str, object]] = []
    pidfd = -1
    try:
        for ino, group in sorted(groups.items()):
            first = group[0]
            # Read beside the batch in this freeze (ckpt/proc/grab.py, procgrab.c one_pipe), by the
            # same calls as _peek_group: through one of its read ends, or an anonymous pipe's write end.
            got = take_pipe(pid, [f.fd for f in group])
            if got is None:
                if pidfd < 0:
                    try:
                        pidfd = os.pidfd_open(pid)
                    except OSError as e:
                        raise TargetError(
                            f"cannot read the pipes of process {pid}: pidfd_open: {e.strerror}"
                        ) from None
                got = _peek_group(pid, pidfd, group)
            size, data = got
            out.append({
                "ino": ino, "fifo": first.kind == "fifo", "path": first.path, "size": size, "data": data,
                "files": open_files(pid, [f.fd for f in group]),
            })  # fmt: skip
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return out


def _peek_group(pid: int, pidfd: int, group: list[FdInfo]) -> tuple[int, bytes]:
    """The size and buffered bytes of the pipe behind the fds ``group`` of the process."""
    first = group[0]
    readers = [f for f in group if is_reader(f.flags)]
    try:
        if readers:
            local = pidfd_getfd(pidfd, readers[0].fd)
        else:
            # Only write ends here: a new read end on the same pipe. Nobody can be waiting in
            # open() for a reader of an anonymous pipe; for a FIFO that has no reader now, a
            # writer blocked in open() elsewhere would be let through (and see EPIPE).
            local = os.open(f"/proc/{pid}/fd/{first.fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        why = f"cannot read fd {first.fd} ({first.path}) of process {pid}: {e.strerror}"
        raise TargetError(why) from None
    try:
        size = fcntl.fcntl(local, F_GETPIPE_SZ)
        data = peek(local)
    except OSError as e:
        raise TargetError(f"cannot read pipe fd {first.fd} ({first.path}): {e.strerror}") from None
    finally:
        os.close(local)
    if len(data) > MAX_PIPE_DATA:
        raise TargetError(f"fd {first.fd} ({first.path}) holds {len(data)} bytes, more than a layer keeps")
    return size, data
