"""A listening TCP socket (or a bound UDP socket) handed over, not made again, by a migration on one
machine (issue 12 (B) 6).

A migration to a `ckpt serve` on the same machine and in the same network namespace cannot bind the
copy's listener afresh: the original, stopped but alive until the copy runs, still listens on the
port (EADDRINUSE), and it must keep doing so until the commit, since a failure before it lets the
original run on. A repair-mode bind would pass (SK_FORCE_REUSE), but listen() would not beside
the original's listener, and a listener put into repair mode gives its accepted sockets repair mode
too (measured here: their send() is EINVAL); the original's listener would have to be shut at the
commit and every connection still in its accept queue would be reset.

So the copy takes the original's own listening socket: the helper gets the same open file with
pidfd_getfd from the original (restore/pipes.py's fetch_fd) at the fd the process had it. It is the
same socket, with its options, its backlog, and the connections in its accept queue (completed but
not yet accepted at the final freeze, or arriving at any moment of the downtime: the kernel keeps
completing handshakes for it), which the copy accepts when it runs. The one-copy rule holds by
itself: before the commit the copy is a stopped helper and, if the migration fails, is killed,
dropping its reference: the original runs on with its listener untouched; after RUNNING the
original is killed and its reference goes, the copy's stays.

Only `ckpt serve` takes listeners over (allow(): its restores are the copies of migrations), and
only from the dumped process itself: same boot, same pid and start time, its fd still that socket
(by inode), in the helper's network namespace. Anywhere else (another machine, another namespace)
nothing holds the port, and the listener is bound afresh (restore/sockets.py); connections in its
accept queue are then refused by the plan, named.

A bound UDP socket is taken over the same way, for the same reason (the original holds its
address), with the datagrams not yet read, and those that arrive during the downtime."""

from __future__ import annotations

import os
from typing import Any

from ckpt import sysno as nr
from ckpt.errors import RestoreError, TargetExited
from ckpt.image.sockets import InetListenRecord
from ckpt.proc.sockets import _copy_fd, same_netns
from ckpt.proc.stat import boot_id, read_stat
from ckpt.restore.pipes import F_SETFD, fetch_fd
from ckpt.restore.remote import Remote

_allowed: list[bool] = []


def allow() -> None:
    """This process is a migration's destination: its restores may take listeners over."""
    _allowed.append(True)


def _holds(pid: int, fd: int, ino: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{ino}]"
    except OSError:
        return False


def held_by_original(inventory: Any, fd: int, r: InetListenRecord) -> bool:
    """Whether the dumped process still runs here and holds the listener `r` at `fd` (to be taken
    over, see the module's docstring)."""
    if not _allowed:
        return False
    pid = int(inventory.pid)
    try:
        if inventory.boot_id != boot_id() or read_stat(pid).start_time != inventory.start_time:
            return False
    except (OSError, TargetExited):
        return False
    return same_netns(pid) and _holds(pid, fd, r.ino)


def take_over(remote: Remote, dumped_pid: int, fd: int, r: InetListenRecord, flags: int) -> int:
    """The original's listener as a new fd of the helper (its close-on-exec as in `flags`); its
    number."""
    what = f"taking over {r.label()} from the original process {dumped_pid}"
    # Through ckpt: a helper in a new pid namespace (--pidns) cannot name the original, outside it.
    mine = _copy_fd(dumped_pid, fd)
    try:
        if mine < 0 or not _holds(os.getpid(), mine, r.ino):  # the original went, and its pid with it
            raise RestoreError(f"{what}: its fd {fd} is no longer that socket")
        got = fetch_fd(remote, os.getpid(), mine, what)
    finally:
        if mine >= 0:
            os.close(mine)
    if not flags & nr.O_CLOEXEC:  # pidfd_getfd always sets it
        remote.check(what, nr.FCNTL, got, F_SETFD, 0)
    return got
