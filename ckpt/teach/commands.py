"""The `ckpt dirtyrate` and `ckpt simulate` subcommands: their arguments and their output. Kept here
so that ckpt/cli.py only registers them; heavy imports wait until a command runs."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from typing import Any


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def add_parsers(sub: Any, pid_type: Callable[[str], int]) -> None:
    s = sub.add_parser("dirtyrate", help="a process's dirty page rate and writable working set")
    s.add_argument("--pid", "-t", type=pid_type, required=True)
    s.add_argument("--interval", type=float, default=250.0, metavar="MS", help="sampling interval (250)")
    s.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    s.add_argument("--track", default="auto", choices=["auto", "soft-dirty", "uffd-wp"])
    s.add_argument("--json", action="store_true", help="JSON lines (also when stdout is not a terminal)")
    s.add_argument("--pages", action="store_true", help="JSON: each interval's pages (a trace for simulate)")
    s.add_argument("--plot", metavar="FILE", help="draw the rate and the WSS curve (.svg or .png)")
    s.set_defaults(fn=cmd_dirtyrate)

    s = sub.add_parser("simulate", help="model pre-copy rounds for a memory size, dirty rate and link")
    s.add_argument("--memory", metavar="SIZE", help="memory size: 64M, 1G, 4096K (or from --trace)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--dirty-rate", metavar="RATE", help="uniform random writes: 20MB/s, 100Mbit")
    src.add_argument("--trace", metavar="FILE", help="a `ckpt dirtyrate --json [--pages]` recording")
    s.add_argument("--hot", metavar="SIZE", help="with --dirty-rate: writes fall in a hot set this big")
    s.add_argument("--bandwidth", required=True, metavar="RATE", help="the link: 12MB/s, 1Gbit, ...")
    s.add_argument("--policy", default="qemu", help="stop rule: qemu, xen, phaul or rounds:N (default qemu)")
    s.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS", help="for qemu (default 300)")
    s.add_argument("--max-rounds", type=int, help="cap on live rounds (default 30)")
    s.add_argument("--auto-converge", action="store_true", help="throttle the writes when not converging")
    s.add_argument("--round-overhead", type=float, metavar="MS", help="fixed cost of a live round (20)")
    s.add_argument("--final-overhead", type=float, metavar="MS", help="fixed cost of the final round (50)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", metavar="FILE", help="draw the rounds (.svg or .png)")
    s.set_defaults(fn=cmd_simulate)


def _check_plot(path: str | None) -> None:
    if path is not None:
        from ckpt.teach.plot import check_target

        check_target(path)


def cmd_dirtyrate(a: argparse.Namespace) -> int:
    from rich.console import Console

    from ckpt.teach import termchart
    from ckpt.teach.dirtyrate import Interval, measure
    from ckpt.teach.view import IntervalTable

    _check_plot(a.plot)
    live = sys.stdout.isatty() and not a.json
    table: IntervalTable | None = None
    seen: set[int] = set()
    rows: list[tuple[float, float]] = []

    def on_interval(iv: Interval) -> None:
        rows.append((iv.t_ms, iv.dirty_mb_s))
        if table is not None:
            seen.update(int(p) for p in iv.pages)
            table.add(iv, len(seen))
        else:
            _emit(iv.to_dict(with_pages=a.pages))

    # A supervisor's SIGTERM is a Ctrl-C: the tracking is taken out before ckpt exits.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    console = Console()
    if live:
        table = IntervalTable(a.pid, console)
    try:
        s = measure(
            a.pid,
            interval_ms=a.interval,
            duration_s=a.duration,
            track=a.track,
            on_interval=on_interval,
        )
    finally:
        if table is not None:
            table.close()
    for w in s.warnings:
        print(f"ckpt: warning: {w}", file=sys.stderr)
    if a.plot:
        from ckpt.teach.plot import plot_dirtyrate

        plot_dirtyrate(a.plot, [r[0] for r in rows], [r[1] for r in rows], s.to_dict())
    if not live:
        _emit(s.to_dict())
        return 0
    color = termchart.use_color(sys.stdout)
    if rows:
        print(termchart.rate_chart([r[0] for r in rows], [r[1] for r in rows], color=color))
    if s.wss:
        print(termchart.wss_chart([p.window_ms for p in s.wss], [p.pages for p in s.wss], color=color))
    print(
        f"pid {s.pid}: {s.intervals} intervals of {s.interval_ms:g} ms ({s.tracker}), ended: {s.end}\n"
        f"  dirty rate mean {s.mean_dirty_mb_s:.2f} MB/s, peak {s.peak_dirty_mb_s:.2f} MB/s; "
        f"memory {s.memory_pages} pages"
    )
    for p in s.wss:
        print(f"  WSS over {p.window_ms:8.0f} ms: {p.pages:9.1f} pages (max {p.max_pages})")
    return 0


def cmd_simulate(a: argparse.Namespace) -> int:
    import ckpt.teach.simulate as sim
    from ckpt.teach import termchart

    _check_plot(a.plot)
    res = sim.run(sim.options_from_args(a))
    if a.plot:
        from ckpt.teach.plot import plot_rounds

        plot_rounds(a.plot, [r.to_dict() for r in res.round_reports], res.to_dict(), res.threshold_pages)
    if a.json or not sys.stdout.isatty():
        for r in res.round_reports:
            _emit(r.to_dict())
        _emit(res.to_dict())
        return 0
    for r in res.round_reports:
        print(
            f"round {r.round} ({r.kind}): {r.pages_dirty} dirty, {r.bytes_wire} B, "
            f"{r.duration_ms:.1f} ms; {r.decision}"
        )
    print(
        termchart.rounds_chart(
            [r.pages_sent for r in res.round_reports],
            [r.kind for r in res.round_reports],
            f"simulated pre-copy, policy {res.policy}: pages sent per round",
            res.threshold_pages,
            color=termchart.use_color(sys.stdout),
        )
    )
    print(
        f"{res.rounds} live rounds + final; stopped: {res.stop_reason}\n"
        f"  downtime {res.downtime_ms:.1f} ms, total {res.total_ms:.0f} ms, {res.bytes_sent} bytes sent "
        f"({res.bytes_sent / max(res.memory_bytes, 1):.2f}x the memory)"
    )
    for w in res.warnings:
        print(f"ckpt: warning: {w}", file=sys.stderr)
    return 0
