"""The plan's part for established TCP connections (called from plan.py; made by restore/tcp.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckpt.image.format import FdRecord
from ckpt.restore.plansockets import record_index

if TYPE_CHECKING:
    from ckpt.restore.plan import FdPlan


def _find(c: Any, f: FdRecord) -> int:
    return record_index(c.tcp_established, f)


def is_tcp(c: Any, f: FdRecord) -> bool:
    return _find(c, f) >= 0


def tcp_plan(c: Any, f: FdRecord, flags: int) -> FdPlan:
    from ckpt.restore.plan import FdPlan

    return FdPlan(f.fd, "tcp", f, flags, obj=_find(c, f))


def left_to_final(c: Any, f: FdRecord) -> bool:
    """A socket of a live round (a pre-dump: consistent: false, never restored itself): its
    connection, if it is one, is taken by the final dump (migrate/tcpmove.py), so the warm restore
    built from live rounds plans only the rest."""
    return bool(c.live) and f.kind == "socket"
