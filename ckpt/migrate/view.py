"""The live table of `ckpt migrate` on a terminal (rich)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

# Narrow columns: the table must fit an 80-column terminal; the rule's decision goes in the caption.
_COLS = ("#", "kind", "ms", "dirty", "sent", "wire", "frz", "dirty/s", "MB/s", "pred", "thr")


class RoundTable:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.caption = ""
        self.live = Live(self._table(), console=Console(stderr=True), auto_refresh=False)
        self.live.start()

    def _table(self) -> Table:
        t = Table(
            title="ckpt migrate (ms; frz = freeze ms; pred = predicted downtime ms; thr = throttle)",
            caption=self.caption,
            caption_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for c in _COLS:
            t.add_column(c, justify="left" if c == "kind" else "right", no_wrap=True)
        for r in self.rows:
            t.add_row(*r)
        return t

    def add(self, r: Any) -> None:
        self.rows.append(
            (
                str(r.round),
                "live" if r.kind == "live" else "final",
                f"{r.duration_ms:.0f}",
                str(r.pages_dirty),
                str(r.pages_sent),
                _size(r.bytes_wire),
                f"{r.freeze_ms:.0f}",
                f"{r.dirty_rate:.0f}",
                f"{r.bandwidth / 1e6:.0f}",
                f"{r.predicted_downtime_ms:.0f}",
                f"{r.throttle:.0%}",
            )
        )
        self.caption = r.decision
        self.live.update(self._table(), refresh=True)

    def close(self) -> None:
        self.live.stop()


def _size(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)
