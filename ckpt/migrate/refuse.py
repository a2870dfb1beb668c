"""What `ckpt migrate` refuses before it touches the process (issue 12: every kind after a migration).

A migration builds the copy whole, held stopped, while the original still exists (it is killed only
once the copy runs, so that a failure can let it go): what the copy must own exclusively while the
original still owns it can never come across. Found by the final restore, that would cost every
live round first; found here, the original is not even frozen.

A write lock (flock LOCK_EX, a POSIX or OFD write lock) is such a thing: the file is the same one
wherever the copy runs (its fds are reopened by path and checked to be the same file), so the copy
could take the lock only after the original is gone, past the point where the migration can be
undone. Read locks share, and migrate. (A listening or bound socket, a SysV key, the tids of threads
are free on another host or in other namespaces, and migrate there: to this same machine's loopback
the restore refuses them at the end, naming them, and the original runs on.)

A process in a job-control stop (Ctrl-Z, SIGSTOP, a debugger's) is not refused: its image records
the stop (task.stop, ckpt/jobstop.py), so the copy comes back stopped the same way, and every path
that gives the original back continues only a stop that is ckpt's own (ckpt.ptrace.freeze.thaw_all,
guard.stopped_by_another): one someone else made stays (tests/test_migrate_stopped.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ckpt.errors import CkptError, TargetExited
from ckpt.proc.fds import FdInfo, list_fds
from ckpt.proc.props import read_locks
from ckpt.proc.tree import children

MAX_MEMBERS = 4096  # bounds the walk of a tree that forks as fast as it is walked


def members(pid: int, limit: int = MAX_MEMBERS) -> list[int]:
    """The process and its descendants (a tree migrates whole), at most `limit` of them."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < limit:
        p = todo.pop()
        out.append(p)
        try:
            todo.extend(children(p))
        except (CkptError, OSError):
            continue
    return out


def _path(fds: Sequence[FdInfo], fd: int) -> str:
    return next((f.path for f in fds if f.fd == fd), "?")


def walk(pid: int) -> dict[int, list[FdInfo]]:
    """The process and its descendants (members()) with their fds: read once, for every check made
    before a migration (refusals here, tcpmove.check_connections). One gone meanwhile is left out:
    the dump itself says what became of it."""
    out: dict[int, list[FdInfo]] = {}
    for p in members(pid):
        try:
            out[p] = list_fds(p)
        except (TargetExited, OSError):
            continue
    return out


def refusals(pid: int, walked: Mapping[int, Sequence[FdInfo]] | None = None) -> list[str]:
    """What of the process (and its descendants) cannot migrate, one phrase each; [] if nothing.
    `walked`: walk(pid), when the caller has it."""
    out: list[str] = []
    for p, fds in (walk(pid) if walked is None else walked).items():
        who = "" if p == pid else f"process {p}: "
        try:
            locks = read_locks(p, [f.fd for f in fds])
        except (TargetExited, OSError):
            continue  # gone meanwhile: the dump itself says what became of it
        for lk in locks:
            if lk["write"] and lk["kind"] in ("FLOCK", "POSIX", "OFDLCK"):
                out.append(
                    f"{who}fd {lk['fd']} ({_path(fds, lk['fd'])}) holds a {lk['kind']} write lock, which "
                    "the copy could take only once the original is gone"
                )
    return out
