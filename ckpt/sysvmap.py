"""Which mappings are of a SysV shared memory segment: told by the path maps shows, never by inode.

The kernel shows an attached segment as `/SYSV<key, 8 hex digits> (deleted)` on the shmem device
and sets its inode column to the segment's id (ipc/shm.c newseg: i_ino = shmid). The first segment
of an IPC namespace (in a container: the common case) has id 0, which elsewhere in maps means
anonymous memory; and an id may equal the inode of a memfd or of shared anonymous memory on that
same device. So a mapping is a segment by its path, and an object of a mapping is keyed with that
(`object_key`), not by (device, inode) alone.
"""

from __future__ import annotations

import re

SYSV_RE = re.compile(r"/SYSV[0-9a-f]{8} \(deleted\)\Z")
ObjectKey = tuple[str, int, bool]  # (maps' device, its inode or a segment's id, is_sysv_path)


def is_sysv_path(path: str) -> bool:
    return SYSV_RE.match(path) is not None


def object_key(dev: str, inode: int, path: str) -> ObjectKey:
    """What names the object a mapping shows, across its mappings and processes: its device and
    inode, and whether that "inode" is a SysV segment's id."""
    return (dev, inode, is_sysv_path(path))
