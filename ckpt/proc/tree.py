"""A process tree as /proc shows it: each process's ids (parent, group, session), zombies' exit
statuses, children, and open files shared between processes (kcmp). No ptrace here."""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import stat as st_
from collections.abc import Iterable
from dataclasses import dataclass

from ckpt.errors import TargetExited
from ckpt.proc.task import list_children

SYS_KCMP = 312
KCMP_FILE = 0
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class ProcIds:
    pid: int
    comm: str
    state: str
    ppid: int
    pgid: int
    sid: int
    start_time: int
    exit_signal: int  # field 38
    exit_code: int  # the wait status of a zombie (field 52; 0 for a live process)

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def read_ids(pid: int) -> ProcIds:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):
        raise TargetExited(f"process {pid} does not exist (or exited)") from None
    lp, rp = raw.index("("), raw.rindex(")")
    rest = raw[rp + 2 :].split()  # from field 3 (state) on
    return ProcIds(
        pid=pid,
        comm=raw[lp + 1 : rp],
        state=rest[0],
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        start_time=int(rest[19]),
        exit_signal=int(rest[35]),
        exit_code=int(rest[49]) if len(rest) > 49 else 0,
    )


def children(pid: int) -> list[int]:
    """The child processes of every thread of `pid` ([] once it is gone)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []
    return list_children(pid, tids)


def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether two fds of two processes are one open file description (shared offset and flags)."""
    r = _libc.syscall(SYS_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2)
    return r == 0


def shared_descriptions(fds: dict[int, Iterable[tuple[int, str]]]) -> list[tuple[int, int, int, int, str]]:
    """Open file descriptions held by two processes of a tree (pid -> (fd, path)): (pid1, fd1, pid2,
    fd2, path) for each pair found. Only fds naming the same inode are compared, so the cost is that
    of the files actually in common. Pipes, FIFOs and devices are left out: pipes are matched by
    inode (their records), terminals and stateless devices have no state of their own."""
    by_id: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
    for pid, entries in fds.items():
        for fd, path in entries:
            try:
                s = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not (st_.S_ISFIFO(s.st_mode) or st_.S_ISCHR(s.st_mode) or st_.S_ISBLK(s.st_mode)):
                by_id.setdefault((s.st_dev, s.st_ino), []).append((pid, fd, path))
    out = []
    for holders in by_id.values():
        for i, (p1, f1, path) in enumerate(holders):
            for p2, f2, _ in holders[i + 1 :]:
                if p1 != p2 and same_file(p1, f1, p2, f2):
                    out.append((p1, f1, p2, f2, path))
    return out


# What clone() can share between two processes (not threads) that a restore would give each its own.
KCMP_SHARED = {
    1: "address space (CLONE_VM)",
    2: "fd table (CLONE_FILES)",
    3: "working directory, root and umask (CLONE_FS)",
    4: "signal handlers (CLONE_SIGHAND)",
}  # (not KCMP_SYSVSEM: two processes without an undo list compare equal, NULL and NULL)


def shared_tables(pids: Iterable[int]) -> list[str]:
    """Each pair of live processes sharing one of KCMP_SHARED (kcmp: 0 when the same object; a
    zombie has none of them, and would compare equal to another zombie). kcmp also orders two
    objects (1: less, 2: greater): sorted by it, the processes sharing one are neighbours, so a tree
    of n costs O(n log n) calls per kind, not n(n-1)/2 (a tree freeze makes them while frozen)."""
    pids = sorted(pids)
    pairs = [(a, b, k) for k, kind in enumerate(KCMP_SHARED) for a, b in _equal_pairs(pids, kind)]
    names = list(KCMP_SHARED.values())
    return [f"processes {a} and {b} share one {names[k]}" for a, b, k in sorted(pairs)]


class _Unordered(Exception):
    """kcmp gave no order (an error: a process gone, or not ours to compare)."""


def _kcmp(a: int, b: int, kind: int) -> int:
    return int(_libc.syscall(SYS_KCMP, a, b, kind, 0, 0))


def _equal_pairs(pids: list[int], kind: int) -> list[tuple[int, int]]:
    """The pairs (a < b) of ``pids`` whose object of ``kind`` is one."""

    def order(a: int, b: int) -> int:
        r = _kcmp(a, b, kind)
        if r not in (0, 1, 2):
            raise _Unordered
        return (0, -1, 1)[r]

    try:
        ranked = sorted(pids, key=functools.cmp_to_key(order))
        runs: list[list[int]] = []  # neighbours in kcmp's order that compare equal
        for prev, cur in itertools.pairwise(ranked):
            if order(prev, cur):
                continue
            if runs and runs[-1][-1] == prev:
                runs[-1].append(cur)
            else:
                runs.append([prev, cur])
    except _Unordered:  # every pair, as each answers
        return [(a, b) for i, a in enumerate(pids) for b in pids[i + 1 :] if _kcmp(a, b, kind) == 0]
    return [(a, b) for run in runs for i, a in enumerate(sorted(run)) for b in sorted(run)[i + 1 :]]


__all__ = ["ProcIds", "children", "read_ids", "same_file", "shared_descriptions", "shared_tables"]
