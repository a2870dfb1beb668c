"""The plan's checks for listening TCP sockets (called from plan.py; made by restore/sockets.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ckpt.image.format import FdRecord
from ckpt.image.sockets import IPPROTO_TCP
from ckpt.proc.sockets import SOCKET_RE
from ckpt.restore.listenshare import held_by_original

if TYPE_CHECKING:
    from ckpt.restore.plan import FdPlan


def record_index(records: Sequence[Any], f: FdRecord) -> int:
    """The index of the socket record (by inode) that fd `f` names, or -1."""
    m = SOCKET_RE.match(f.path) if f.kind == "socket" else None
    if m is None:
        return -1
    ino = int(m.group(1))
    return next((i for i, r in enumerate(records) if r.ino == ino), -1)


def _find(c: Any, f: FdRecord) -> int:
    return record_index(c.inet_listen, f)


def is_listener(c: Any, f: FdRecord) -> bool:
    return _find(c, f) >= 0


def listen_plan(c: Any, f: FdRecord, what: str, flags: int) -> FdPlan | None:
    from ckpt.restore.plan import FdPlan

    i = _find(c, f)
    r = c.inet_listen[i]
    top = c.top.meta if hasattr(c.top, "meta") else c.top
    if held_by_original(top.inventory, f.fd, r):  # queued connections or datagrams and all (listenshare.py)
        return FdPlan(f.fd, "handover", f, flags, obj=i)
    if r.pending and r.proto == IPPROTO_TCP:
        c.unsupported.append(
            f"{what} (a TCP socket listening on {r.endpoint()} with {r.pending} connection(s) not yet "
            "accepted, which would be lost)"
        )
        return None
    if r.pending:
        c.unsupported.append(f"{what} ({r.label()} with {r.pending} bytes of datagrams not yet read)")
        return None
    return FdPlan(f.fd, "listen", f, flags, obj=i)
