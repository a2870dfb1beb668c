"""Records of the kernel objects behind fds other than files (format version 3): pipes and FIFOs.

A pipe is recorded once per pipe inode, whatever number of fds (and, in a process tree, of processes)
hold its ends: a restore creates one pipe per record and hands its ends to every fd that named that
inode (FdRecord.ino; which end an fd holds is in its flags' access mode). A FIFO is a pipe reached
through a path: the same record, with `fifo` set and the path to open again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckpt.image.validate import as_bool, as_bytes, as_int, as_map, as_str, fail, get

# The kernel caps a pipe at 2**31 bytes (round_pipe_size); pipe-max-size is 1 MiB by default, and
# only CAP_SYS_RESOURCE goes above it. A hostile layer must not make a restore hold more.
MAX_PIPE_SIZE = 1 << 31
MAX_PIPE_DATA = 1 << 26


@dataclass
class PipeRecord:
    ino: int  # the pipe's inode (pipefs, or the FIFO's on its filesystem): what fds refer to
    fifo: bool  # a named pipe, opened again by `path`
    path: str  # "pipe:[INO]" or the FIFO's path
    size: int  # F_GETPIPE_SZ, bytes
    data: bytes  # the bytes buffered in it at dump, read without taking them (tee)

    def to_dict(self) -> dict[str, Any]:
        return {"ino": self.ino, "fifo": self.fifo, "path": self.path, "size": self.size, "data": self.data}

    @classmethod
    def from_dict(cls, v: Any, where: str) -> PipeRecord:
        d = as_map(v, where)
        size = as_int(get(d, "size", where), f"{where}.size", 1, MAX_PIPE_SIZE)
        data = as_bytes(get(d, "data", where), f"{where}.data", MAX_PIPE_DATA)
        if len(data) > size:
            fail(f"{where}.data", f"{len(data)} bytes do not fit a pipe of {size}")
        return cls(
            ino=as_int(get(d, "ino", where), f"{where}.ino"),
            fifo=as_bool(get(d, "fifo", where), f"{where}.fifo"),
            path=as_str(get(d, "path", where), f"{where}.path"),
            size=size,
            data=data,
        )
