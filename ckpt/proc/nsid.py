"""A namespace's 64-bit id (nsfs ioctl NS_GET_ID, Linux 6.18+), which the kernel never reuses.

A namespace's inode is no identity over time: a new namespace takes the lowest free inode number,
so the next `unshare --uts` after one ended gets the same one at once. A restore accepts a
namespace of the process's own only when it runs in that very namespace, which the id tells."""

from __future__ import annotations

import fcntl
import os
import struct

NS_GET_ID = (2 << 30) | (8 << 16) | (0xB7 << 8) | 13  # _IOR(NSIO, 13, __u64)


def ns_id(path: str) -> int | None:
    """The id of the namespace at `path` (/proc/PID/ns/TYPE), or None: not there, or a kernel
    without NS_GET_ID."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return int(struct.unpack("<Q", fcntl.ioctl(fd, NS_GET_ID, b"\0" * 8))[0])
    except OSError:
        return None
    finally:
        os.close(fd)


def ids_of(pid: int, types: list[str]) -> list[list[object]]:
    """[type, id] of each of the process's namespaces of those types whose id can be read."""
    out: list[list[object]] = []
    for t in types:
        i = ns_id(f"/proc/{pid}/ns/{t}")
        if i is not None:
            out.append([t, i])
    return out
