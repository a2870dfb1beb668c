"""Records of the kernel objects behind fds other than files (format version 3): pipes and FIFOs,
anonymous-inode fds (eventfd, timerfd, signalfd, epoll, inotify) and unix socketpairs.

A pipe is recorded once per pipe inode, whatever number of fds (and, in a process tree, of processes)
hold its ends: a restore creates one pipe per record and hands its ends to every fd that named that
inode (FdRecord.ino; which end an fd holds is in its flags' access mode). A FIFO is a pipe reached
through a path: the same record, with `fifo` set and the path to open again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckpt.image.validate import (
    I64_MIN,
    U64_MAX,
    as_bool,
    as_bytes,
    as_int,
    as_list,
    as_map,
    as_str,
    fail,
    get,
)

# The kernel caps a pipe at 2**31 bytes (round_pipe_size); pipe-max-size is 1 MiB by default, and
# only CAP_SYS_RESOURCE goes above it. A hostile layer must not make a restore hold more.
MAX_PIPE_SIZE = 1 << 31
MAX_PIPE_DATA = 1 << 26
MAX_FILES = 1 << 20


@dataclass
class PipeRecord:
    ino: int  # the pipe's inode (pipefs, or the FIFO's on its filesystem): what fds refer to
    fifo: bool  # a named pipe, opened again by `path`
    path: str  # "pipe:[INO]" or the FIFO's path
    size: int  # F_GETPIPE_SZ, bytes
    data: bytes  # the bytes buffered in it at dump, read without taking them (tee)
    # The process's fds of it, grouped by open file description (kcmp): fds of one group are dups.
    files: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ino": self.ino, "fifo": self.fifo, "path": self.path, "size": self.size, "data": self.data,
            "files": [list(g) for g in self.files],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, v: Any, where: str) -> PipeRecord:
        d = as_map(v, where)
        size = as_int(get(d, "size", where), f"{where}.size", 1, MAX_PIPE_SIZE)
        data = as_bytes(get(d, "data", where), f"{where}.data", MAX_PIPE_DATA)
        if len(data) > size:
            fail(f"{where}.data", f"{len(data)} bytes do not fit a pipe of {size}")
        files = []
        for i, g in enumerate(as_list(d.get("files", []), f"{where}.files", MAX_FILES)):
            w = f"{where}.files[{i}]"
            files.append([as_int(x, w, 0, (1 << 31) - 1) for x in as_list(g, w, MAX_FILES)])
        return cls(
            files=files,
            ino=as_int(get(d, "ino", where), f"{where}.ino"),
            fifo=as_bool(get(d, "fifo", where), f"{where}.fifo"),
            path=as_str(get(d, "path", where), f"{where}.path"),
            size=size,
            data=data,
        )


ANON_KINDS = ("eventfd", "timerfd", "signalfd", "epoll", "inotify", "unix")
MAX_ITEMS = 1 << 20  # epoll's watches, inotify's (max_user_watches is 8192..1M), queued datagrams
INT_KEYS = 64


@dataclass
class AnonFdRecord:
    """An fd whose object has no path (an anonymous inode, a unix socketpair), with what a restore
    needs to make it again, by kind (images/FORMAT.md, version 3):
      eventfd   ints count, semaphore
      timerfd   ints clockid, flags (settime flags), value_ns (time left), interval_ns, ticks,
                now_ns (the clock at dump: an absolute timer's deadline is now_ns + value_ns)
      signalfd  ints sigmask
      epoll     items [tfd, events, data]: its watches, each of the process's fd tfd
      inotify   items [wd, mask, ignored_mask, dev, ino, handle_type], blobs the file handles
      unix      ints type, peer (the fd of the other end), shutdown; blobs the messages queued to it
    `dup_of`: an fd before it that is the same open file (kcmp), or -1."""

    fd: int
    kind: str
    dup_of: int = -1
    ints: dict[str, int] = field(default_factory=dict)
    items: list[list[int]] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fd": self.fd, "kind": self.kind, "dup_of": self.dup_of, "ints": dict(self.ints),
            "items": [list(i) for i in self.items], "blobs": list(self.blobs),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, v: Any, where: str) -> AnonFdRecord:
        d = as_map(v, where)
        kind = as_str(get(d, "kind", where), f"{where}.kind", 32)
        if kind not in ANON_KINDS:
            fail(f"{where}.kind", f"{kind!r} is not one of {', '.join(ANON_KINDS)}")
        ints = as_map(get(d, "ints", where), f"{where}.ints")
        if len(ints) > INT_KEYS:
            fail(f"{where}.ints", "too many keys")
        items = []
        for i, it in enumerate(as_list(get(d, "items", where), f"{where}.items", MAX_ITEMS)):
            row = as_list(it, f"{where}.items[{i}]", 8)
            items.append([as_int(x, f"{where}.items[{i}]", I64_MIN, U64_MAX) for x in row])
        blobs = [
            as_bytes(b, f"{where}.blobs[{i}]", MAX_PIPE_DATA)
            for i, b in enumerate(as_list(get(d, "blobs", where), f"{where}.blobs", MAX_ITEMS))
        ]
        if sum(len(b) for b in blobs) > MAX_PIPE_DATA:
            fail(f"{where}.blobs", "more bytes than a layer keeps for one fd")
        return cls(
            fd=as_int(get(d, "fd", where), f"{where}.fd", 0, (1 << 31) - 1),
            kind=kind,
            dup_of=as_int(get(d, "dup_of", where), f"{where}.dup_of", -1, (1 << 31) - 1),
            ints={
                as_str(k, f"{where}.ints key", 32): as_int(x, f"{where}.ints.{k}", I64_MIN, U64_MAX)
                for k, x in ints.items()
            },
            items=items,
            blobs=blobs,
        )
