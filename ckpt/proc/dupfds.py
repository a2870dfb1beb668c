"""Which fds of a process are dups of a lower one (one open file description: one offset, one set
of status flags), for the kinds a restore reopens by path. Reopened separately, two dups would
come back with offsets of their own (tests/zdtm/fdshare00). Only fds of the same inode are compared
(kcmp KCMP_FILE), so a process without such fds costs no syscall."""

from __future__ import annotations

from collections.abc import Sequence

from ckpt.proc.fds import FdInfo
from ckpt.proc.pipes import open_files

REOPENED = ("file", "dir", "memfd")


def dup_sources(pid: int, fds: Sequence[FdInfo]) -> dict[int, int]:
    """fd -> the lowest fd of its open file description, for every fd that is a dup of a lower one."""
    by_inode: dict[tuple[int, int], list[int]] = {}
    for f in fds:
        if f.kind in REOPENED:
            by_inode.setdefault((f.dev, f.ino), []).append(f.fd)
    out: dict[int, int] = {}
    for group in by_inode.values():
        # open_files: [] when kcmp cannot tell (then every group can't: the restore reopens each fd,
        # as before this module).
        for desc in open_files(pid, sorted(group)):
            out.update((fd, desc[0]) for fd in desc[1:])
    return out
