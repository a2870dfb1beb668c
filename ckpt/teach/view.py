"""The live table of `ckpt dirtyrate` on a terminal (rich)."""

from __future__ import annotations

from collections import deque
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

SHOWN = 12  # the last intervals in the table; the whole run is in the chart at the end


class IntervalTable:
    def __init__(self, pid: int, console: Console) -> None:
        self.pid = pid
        self.rows: deque[tuple[str, ...]] = deque(maxlen=SHOWN)
        self.caption = ""
        self.live = Live(self._table(), console=console, auto_refresh=False)
        self.live.start()

    def _table(self) -> Table:
        t = Table(
            title=f"ckpt dirtyrate: pid {self.pid} (Ctrl-C stops)",
            caption=self.caption,
            caption_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for c in ("t (s)", "pages", "MB/s", "freeze ms", "top mappings (pages)"):
            t.add_column(c, justify="left" if c.startswith("top") else "right", no_wrap=True)
        for r in self.rows:
            t.add_row(*r)
        return t

    def add(self, iv: Any, wss_pages: int) -> None:
        top = escape(", ".join(f"{_short(m['path'])} {m['pages']}" for m in iv.mappings[:3]))
        self.rows.append(
            (f"{iv.t_ms / 1e3:.2f}", str(iv.pages_dirty), f"{iv.dirty_mb_s:.1f}", f"{iv.freeze_ms:.1f}", top)
        )
        self.caption = f"{iv.index + 1} intervals; pages written at least once so far: {wss_pages}"
        self.live.update(self._table(), refresh=True)

    def close(self) -> None:
        self.live.stop()


def _short(path: str) -> str:
    return path.rsplit("/", 1)[-1][:24]
