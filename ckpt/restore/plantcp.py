"""The plan's part for established TCP connections (called from plan.py; made by restore/tcp.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckpt.image.format import FdRecord
from ckpt.proc.sockets import SOCKET_RE

if TYPE_CHECKING:
    from ckpt.restore.plan import FdPlan


def _find(c: Any, f: FdRecord) -> int:
    m = SOCKET_RE.match(f.path) if f.kind == "socket" else None
    if m is None:
        return -1
    ino = int(m.group(1))
    return next((i for i, r in enumerate(c.tcp_established) if r.ino == ino), -1)


def is_tcp(c: Any, f: FdRecord) -> bool:
    return _find(c, f) >= 0


def tcp_plan(c: Any, f: FdRecord, flags: int) -> FdPlan:
    from ckpt.restore.plan import FdPlan

    return FdPlan(f.fd, "tcp", f, flags, obj=_find(c, f))
