"""The live table of `ckpt migrate` on a terminal (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

_COLS = (
    "round",
    "kind",
    "ms",
    "dirty",
    "sent",
    "wire",
    "freeze ms",
    "dirty/s",
    "MB/s",
    "pred. ms",
    "thr",
    "decision",
)


class RoundTable:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.live = Live(self._table(), console=Console(stderr=True), auto_refresh=False)
        self.live.start()

    def _table(self) -> Table:
        t = Table(title="ckpt migrate")
        for c in _COLS:
            t.add_column(c, justify="left" if c in ("kind", "decision") else "right")
        for r in self.rows:
            t.add_row(*r)
        return t

    def add(self, r: Any) -> None:
        self.rows.append(
            (
                str(r.round),
                r.kind,
                f"{r.duration_ms:.1f}",
                str(r.pages_dirty),
                str(r.pages_sent),
                _size(r.bytes_wire),
                f"{r.freeze_ms:.1f}",
                f"{r.dirty_rate:.0f}",
                f"{r.bandwidth / 1e6:.1f}",
                f"{r.predicted_downtime_ms:.1f}",
                f"{r.throttle:.0%}",
                r.decision,
            )
        )
        self.live.update(self._table(), refresh=True)

    def close(self) -> None:
        self.live.stop()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
