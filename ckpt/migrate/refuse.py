"""What `ckpt migrate` refuses before it touches the process (issue 12: every kind after a migration).

A migration builds the copy whole, held stopped, while the original still exists (it is killed only
once the copy runs, so that a failure can let it go): anything the copy must own exclusively while
the original still owns it can never come across. Found by the final restore, that would cost every
live round first; found here, the original is not even frozen.

- A write lock (flock LOCK_EX, a POSIX or OFD write lock): the file is the same one wherever the
  copy runs (its fds are reopened by path and checked to be the same file), so the copy could take
  the lock only after the original is gone, past the point where the migration can be undone.
  Read locks share, and migrate.
- A listening TCP socket or a bound UDP socket, when the destination is this machine's loopback
  (the same network namespace): its address is taken until the original goes. SO_REUSEPORT lets
  both bind, and migrates. To another host (or namespace) they are bound there as a restore binds
  them.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from ckpt.errors import TargetExited
from ckpt.proc.fds import FdInfo, list_fds
from ckpt.proc.props import read_locks
from ckpt.proc.sockets import listening_sockets
from ckpt.proc.tree import children

MAX_MEMBERS = 4096  # bounds the walk of a tree that forks as fast as it is walked


def _members(pid: int) -> list[int]:
    """The process and its descendants (a tree migrates whole)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < MAX_MEMBERS:
        p = todo.pop()
        out.append(p)
        try:
            todo.extend(children(p))
        except (TargetExited, OSError):
            continue
    return out


def _path(fds: Sequence[FdInfo], fd: int) -> str:
    return next((f.path for f in fds if f.fd == fd), "?")


def _address(rec: dict[str, Any]) -> str:
    fam = socket.AF_INET6 if rec["family"] == socket.AF_INET6 else socket.AF_INET
    host = socket.inet_ntop(fam, bytes(rec["addr"]))
    return f"[{host}]:{rec['port']}" if fam == socket.AF_INET6 else f"{host}:{rec['port']}"


def _reuseport(rec: dict[str, Any]) -> bool:
    opts = rec.get("options") or []
    return any(lvl == socket.SOL_SOCKET and opt == socket.SO_REUSEPORT and v for lvl, opt, v in opts)


def refusals(pid: int, loopback: bool) -> list[str]:
    """What of the process (and its descendants) cannot migrate, one phrase each; [] if nothing."""
    out: list[str] = []
    for p in _members(pid):
        who = "" if p == pid else f"process {p}: "
        try:
            fds = list_fds(p)
            locks = read_locks(p, [f.fd for f in fds])
            socks = listening_sockets(p, fds) if loopback else []
        except (TargetExited, OSError):
            continue  # gone meanwhile: the dump itself says what became of it
        for lk in locks:
            if lk["write"] and lk["kind"] in ("FLOCK", "POSIX", "OFDLCK"):
                out.append(
                    f"{who}fd {lk['fd']} ({_path(fds, lk['fd'])}) holds a {lk['kind']} write lock, which "
                    "the copy could take only once the original is gone"
                )
        for s in socks:
            if not s["port"] or _reuseport(s):
                continue
            what = (
                "UDP socket bound to" if s.get("proto") == socket.IPPROTO_UDP else "TCP socket listening on"
            )
            out.append(
                f"{who}a {what} {_address(s)}, which a copy on this machine cannot bind while the original "
                "holds it (migrate to another host or network namespace)"
            )
    return out
