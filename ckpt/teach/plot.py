"""--plot FILE.svg|png for dirtyrate, simulate and migrate (matplotlib, the optional `plot` extra):
rounds as bars, the stop rule's threshold as a line, the downtime marked; the dirty rate and the
writable-working-set curve."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ckpt.errors import CkptError

PAGE = 4096
FORMATS = (".svg", ".png")


def check_target(path: str) -> None:
    """Refuse early (before any freeze or measurement) what could not be drawn."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise CkptError(f"--plot {path!r}: the file must end in .svg or .png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CkptError("--plot needs matplotlib: pip install 'ckpt[plot]' (scripts/setup.sh does)") from None
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CkptError(f"--plot {path!r}: no directory {d}")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    plt = _pyplot()
    fig.tight_layout()
    try:
        # svg.hashsalt and no date: the same run draws the same file
        fig.savefig(path, metadata={"Date": None} if path.lower().endswith(".svg") else None, dpi=110)
    except OSError as e:
        raise CkptError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def threshold_pages(policy: str, bandwidth: float, downtime_limit_ms: float) -> float | None:
    """The dirty-set size below which the rule stops (None for rounds:N, which counts rounds)."""
    if policy == "qemu":
        return bandwidth * downtime_limit_ms / 1e3 / PAGE if bandwidth > 0 else None
    if policy == "xen":
        return 50.0
    if policy == "phaul":
        return 64.0
    return None


def plot_rounds(
    path: str, rounds: Sequence[dict[str, Any]], done: dict[str, Any], threshold: float | None
) -> None:
    """One bar per round (pages sent; the final, frozen round in red), the threshold as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = list(range(len(rounds)))
    pages = [max(int(r.get("pages_sent", r.get("pages_dirty", 0))), 1) for r in rounds]
    colors = ["#c0392b" if r.get("kind") == "final" else "#2e86c1" for r in rounds]
    ax.bar(xs, pages, color=colors)
    ax.set_yscale("log")  # round 0 is the whole memory; the rounds after it are what matters
    step = max(1, len(xs) // 15)  # at most ~15 labels: thirty rounds of labels overlap
    ticks = [x for x in xs if x % step == 0 or rounds[x].get("kind") == "final"]
    ax.set_xticks(ticks, [("final" if rounds[x].get("kind") == "final" else str(x)) for x in ticks])
    ax.set_xlabel("round")
    ax.set_ylabel("pages sent (log)")
    if threshold:
        ax.axhline(
            threshold, color="#27ae60", linestyle="--", label=f"stop threshold ({threshold:.0f} pages)"
        )
    for x, r in zip(xs, rounds, strict=True):
        if r.get("kind") == "final":
            ax.annotate(
                f"downtime {float(done.get('downtime_ms', 0)):.0f} ms",
                (x, pages[x]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                color="#c0392b",
            )
    src = "simulated" if done.get("simulated") else "measured"
    ax.set_title(
        f"pre-copy ({src}), policy {done.get('policy')}: {done.get('rounds')} live rounds, "
        f"{int(done.get('bytes_sent', 0)) / 1e6:.1f} MB sent\nstop: {str(done.get('stop_reason', ''))[:90]}",
        fontsize=9,
    )
    if threshold:
        ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def plot_dirtyrate(path: str, t_ms: Sequence[float], mb_s: Sequence[float], summary: dict[str, Any]) -> None:
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot([t / 1e3 for t in t_ms], list(mb_s), marker=".", color="#2e86c1")
    a1.set_xlabel("time (s)")
    a1.set_ylabel("dirty rate (MB/s)")
    a1.set_title(f"pid {summary.get('pid')}: dirty rate per {summary.get('interval_ms'):g} ms", fontsize=9)
    wss = summary.get("wss") or []
    if wss:
        a2.plot([p["window_ms"] for p in wss], [p["pages"] for p in wss], marker="o", label="mean")
        a2.plot([p["window_ms"] for p in wss], [p["max_pages"] for p in wss], linestyle=":", label="max")
        a2.set_xscale("log")
        a2.legend(fontsize=8)
    a2.set_xlabel("window (ms)")
    a2.set_ylabel("distinct pages written")
    a2.set_title("writable working set", fontsize=9)
    _save(fig, path)


def plot_migration(path: str, res: Any, policy: str, downtime_limit_ms: float) -> None:
    """`ckpt migrate --plot`: the same picture as simulate's, from the real round reports."""
    rounds = [r.to_dict() for r in res.round_reports]
    live = [r for r in rounds if r.get("kind") == "live"]
    bw = float(live[-1].get("bandwidth", 0.0)) if live else 0.0
    plot_rounds(path, rounds, res.to_dict(), threshold_pages(policy, bw, downtime_limit_ms))
