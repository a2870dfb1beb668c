"""What a process tree needs beyond each process's own plan: sessions and process groups that can be
rebuilt, zombies, and the resources two processes share (refused until they are restored shared).
Pure: run by `dump` on the records it is about to write, and by the restore before it starts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from ckpt.image.format import FdRecord, VmaRecord
from ckpt.image.tree import TreeRecord

_SHARED_ANON = ("/dev/zero (deleted)", "/dev/zero")


class _Records(Protocol):
    @property
    def fds(self) -> list[FdRecord]: ...
    @property
    def vmas(self) -> list[VmaRecord]: ...


def group_refusals(tree: TreeRecord) -> list[str]:
    """Each process is forked from its restored parent and so starts in its parent's session and
    group; it then makes its own (setsid, setpgid(0, 0)) or joins another group of its session led
    by a process of the tree. The root keeps `ckpt restore`'s session and group, which stand for
    the ones it had (its processes in them stay together). What cannot be built that way is refused."""
    out: list[str] = []
    by = {p.pid: p for p in tree.processes}
    root = tree.root
    for p in tree.processes[1:]:
        q = by[p.ppid]
        if p.sid == p.pid:
            continue  # setsid(): its own session and group
        if p.sid != q.sid:
            out.append(
                f"pid {p.pid} is in session {p.sid}, not in its parent's ({q.sid}): "
                "a restored process cannot join another session"
            )
            continue
        g = p.pgid
        if g == p.pid or (g == root.pgid and p.sid == root.sid):
            continue
        leader = by.get(g)
        if leader is None or leader.pgid != g:
            out.append(
                f"pid {p.pid} is in process group {g}, whose leader is not a process of the tree "
                "(it exited): no restored process can have that group id"
            )
        elif leader.sid != p.sid:
            out.append(f"pid {p.pid} is in process group {g} of another session ({leader.sid})")
    return out


def zombie_refusals(tree: TreeRecord) -> list[str]:
    out = []
    for p in tree.processes:
        if p.exit_status is not None and p.exit_status & 0x80:
            out.append(
                f"zombie {p.pid} was killed by signal {p.exit_status & 0x7F} with a core dump "
                "(its status cannot be made again without writing a core file)"
            )
    return out


def _is_pipe_read_end(f: FdRecord) -> bool:
    return f.flags & os.O_ACCMODE == os.O_RDONLY


def shared_refusals(tree: TreeRecord, records: Mapping[int, _Records]) -> list[str]:
    """Open files, pipes and shared anonymous memory held by two processes of the tree."""
    out = [
        f"fd {f1} of pid {p1} and fd {f2} of pid {p2} are one open file (one offset), "
        "which ckpt does not restore shared yet"
        for p1, f1, p2, f2 in tree.shared_files
    ]
    pipes: dict[int, dict[bool, set[int]]] = {}
    shm: dict[tuple[str, int], set[int]] = {}
    for pid, r in records.items():
        for f in r.fds:
            if f.kind == "pipe":
                pipes.setdefault(f.ino, {True: set(), False: set()})[_is_pipe_read_end(f)].add(pid)
        for v in r.vmas:
            if v.perms[3] == "s" and v.path in _SHARED_ANON:
                shm.setdefault((v.dev, v.inode), set()).add(pid)
    for ino, ends in sorted(pipes.items()):
        holders = ends[True] | ends[False]
        # Both ends inside the tree, held by more than one process: a pipe between them. One end
        # alone (a shell's or the test's pipe on fds 0-2) is outside, as for a single process.
        if ends[True] and ends[False] and len(holders) > 1:
            pids = ", ".join(str(p) for p in sorted(holders))
            out.append(f"a pipe between processes of the tree (pipe:[{ino}], pids {pids})")
    for (_, ino), users in sorted(shm.items()):
        if len(users) > 1:
            who = ", ".join(str(p) for p in sorted(users))
            out.append(
                f"shared anonymous memory (inode {ino}) mapped by several processes ({who}): "
                "it would come back as separate copies"
            )
    return out


def tree_refusals(tree: TreeRecord, records: Mapping[int, _Records]) -> list[str]:
    return [*group_refusals(tree), *zombie_refusals(tree), *shared_refusals(tree, records)]


__all__ = ["group_refusals", "shared_refusals", "tree_refusals", "zombie_refusals"]
