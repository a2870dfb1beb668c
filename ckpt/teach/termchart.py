"""Terminal charts (plotext): pages sent per round, the WSS curve, dirty rate over time.
Each returns the chart as text, so callers print it where they print the rest."""

from __future__ import annotations

import os
from collections.abc import Sequence


def _plt(width: int, height: int, color: bool):  # type: ignore[no-untyped-def]
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, height)
    if not color:
        plt.theme("clear")
    return plt


def _done(plt, color: bool) -> str:  # type: ignore[no-untyped-def]
    out: str = plt.build()
    return out if color else str(plt.uncolorize(out))


def use_color(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ


def rounds_chart(
    pages: Sequence[int],
    kinds: Sequence[str],
    title: str,
    threshold_pages: float | None = None,
    width: int = 78,
    height: int = 16,
    color: bool = False,
) -> str:
    """Pages sent per round as bars (the final round labelled F); the stop rule's threshold, in
    pages, as a line."""
    plt = _plt(width, height, color)
    labels = [("F" if k == "final" else str(i)) for i, k in enumerate(kinds)]
    vals = [float(p) for p in pages]
    rest = max([*vals[1:], threshold_pages or 0.0], default=0.0)
    clipped = len(vals) > 1 and rest > 0 and vals[0] > 4 * rest
    if clipped:
        # Round 0 is the whole memory: drawn to scale it would flatten every round after it.
        vals[0] = 3 * rest
    plt.bar(labels, vals, width=0.6)
    if clipped:
        plt.text(f"round 0: {int(pages[0])} (cut)", 1, 3 * rest * 1.05, alignment="left")
    if threshold_pages is not None and threshold_pages > 0:
        plt.hline(threshold_pages)
    plt.title(title)
    plt.xlabel("round (F = final, frozen)")
    plt.ylabel("pages")
    return _done(plt, color)


def wss_chart(
    window_ms: Sequence[float], pages: Sequence[float], width: int = 78, height: int = 14, color: bool = False
) -> str:
    plt = _plt(width, height, color)
    plt.plot(list(window_ms), list(pages), marker="dot")
    plt.xscale("log")
    plt.title("writable working set: distinct pages written in a window")
    plt.xlabel("window (ms, log)")
    plt.ylabel("pages")
    return _done(plt, color)


def rate_chart(
    t_ms: Sequence[float], mb_s: Sequence[float], width: int = 78, height: int = 12, color: bool = False
) -> str:
    plt = _plt(width, height, color)
    plt.plot([t / 1e3 for t in t_ms], list(mb_s), marker="dot")
    plt.title("dirty rate per interval")
    plt.xlabel("time (s)")
    plt.ylabel("MB/s")
    return _done(plt, color)
