"""What keeping the last smaps walk saves (ckpt/proc/flagwatch.py): the walk against the counters'
check, and a migration's final freeze with and without it.

    python bench/bench_flagwatch.py [--sizes 8,256,1024] [--repeat 5] [--migrate 64,1024] [--cli 8,1024]
                                    [--markdown]

walk: a target with SIZE MiB present (bench/freezetarget.c, idle); per size the time and CPU of what a
freeze reads without the counters (smaps' VmFlags, the guard regions' PAGEMAP_SCAN) and of what it
reads with them (the counters of every thread, the fd check). --threads: the target's threads.
migrate: `ckpt migrate` of an idle tests/targets/dirtier.c of SIZE MiB over loopback (as
bench_migrate.py runs it), CKPT_FLAGWATCH=0 (the walk read in the final freeze) and =1 (kept from the
last round while the counters stay at zero), runs alternating; the final freeze and the downtime.
cli: `ckpt dump --incremental --json` from the shell of a target with 1% written before each dump,
CKPT_FLAGWATCH=0 (smaps read in the freeze) and =1 (read before it, kept if the counters stay at zero).
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ckpt.proc.flagwatch import FlagWatch  # noqa: E402
from ckpt.proc.maps import read_maps  # noqa: E402
from ckpt.proc.props import read_guards, read_vmflags  # noqa: E402
from tests.util import LineChannel  # noqa: E402


def table(cols: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for r in [cols, *rows]:
        print("  ".join(x.rjust(w[i]) for i, x in enumerate(r)))


def _timed(fn: object, n: int) -> tuple[float, float]:
    """(median wall ms, median CPU ms) of n calls."""
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        fn()  # type: ignore[operator]
        wall.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def _walk_one(exe: Path, mib: int, threads: int, repeat: int) -> list[str]:
    p = subprocess.Popen([str(exe), "read", str(threads), str(mib)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    try:
        assert LineChannel(p, 120).readline().startswith("ready")
        pid = p.pid
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        smaps = _timed(lambda: read_vmflags(pid), repeat)
        guards = _timed(lambda: read_guards(pid, read_maps(pid)), repeat)
        w = FlagWatch(pid, tids)
        try:
            check = _timed(lambda: w.changed(tids), repeat)
            reset = _timed(w.reset, repeat)
        finally:
            w.close()
        return [f"{mib} MiB", str(threads), *(f"{x:.2f}" for x in (*smaps, *guards, *check, *reset))]
    finally:
        p.kill()
        p.wait()


def walk(sizes: list[int], threads: int, repeat: int, markdown: bool) -> None:
    import bench_freeze as bf

    exe = bf.build_target()
    rows = [_walk_one(exe, mib, threads, repeat) for mib in sizes]
    print(f"ms, median of {repeat}: what a freeze reads without the counters and with them")
    cols = ["target", "thr", "smaps wall", "smaps cpu", "guards wall", "guards cpu", "check wall",
            "check cpu", "reset wall", "reset cpu"]  # fmt: skip
    table(cols, rows, markdown)


def migrate(sizes: list[int], repeat: int, markdown: bool) -> None:
    import bench_migrate as bm

    rows = []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-fw-") as work:
        for mib in sizes:
            got: dict[str, list[dict[str, float]]] = {"0": [], "1": []}
            for _ in range(repeat):
                for fw in ("0", "1"):
                    bm.ENV["CKPT_FLAGWATCH"] = fw
                    got[fw].append(bm.migrate_once(mib, 0, Path(work)))
                print(".", end="", file=sys.stderr, flush=True)
            for fw, rs in got.items():
                ff = [r["final_freeze_ms"] for r in rs]
                dt = [r["downtime_ms"] for r in rs]
                rows.append([f"{mib} MiB idle", "on" if fw == "1" else "off",
                             f"{statistics.median(ff):.1f}", f"{min(ff):.1f}", f"{statistics.median(dt):.1f}",
                             f"{min(dt):.1f}", str(rs[-1]["rounds"])])  # fmt: skip
    print(file=sys.stderr)
    print(
        f"ckpt migrate over loopback, median of {repeat} (runs alternating); flagwatch off = CKPT_FLAGWATCH=0"
    )
    table(["target", "flagwatch", "final freeze", "least", "downtime", "least", "rounds"], rows, markdown)


def cli(sizes: list[int], repeat: int, markdown: bool) -> None:
    """`ckpt dump --incremental --json` as a user runs it (a new process each), 1% of the pages
    written before each, CKPT_FLAGWATCH=0 and =1 alternating on one chain."""
    import json
    import os

    import bench_freeze as bf

    exe = bf.build_target()
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
    keys = ("freeze_ms", "frozen: smaps", "smaps (before the freeze)", "cpu: frozen", "elapsed_ms")
    rows = []
    for mib in sizes:
        p = subprocess.Popen([str(exe), "dirty", "1", str(mib)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
        got: dict[str, list[dict[str, float]]] = {"0": [], "1": []}
        try:
            ch = LineChannel(p, 300)
            assert ch.readline().startswith("ready")
            with tempfile.TemporaryDirectory(prefix="ckpt-bench-fw-") as d:

                def run(*extra: str, fw: str = "1", pid: int = p.pid) -> dict[str, float]:
                    argv = [
                        sys.executable,
                        "-m",
                        "ckpt",
                        "dump",
                        "--pid",
                        str(pid),
                        "-D",
                        d,
                        "--json",
                        *extra,
                    ]
                    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                                         env=dict(env, CKPT_FLAGWATCH=fw)).stdout  # fmt: skip
                    r = json.loads(out)
                    return {k: r.get(k, r["phases_ms"].get(k, 0.0)) for k in keys}

                run("--track", "uffd-wp")
                for _ in range(repeat):
                    for fw in ("0", "1"):
                        assert ch.cmd("write 10").startswith("written")
                        got[fw].append(run("--incremental", fw=fw))
                    print(".", end="", file=sys.stderr, flush=True)
        finally:
            p.kill()
            p.wait()
        for fw, rs in got.items():
            med = [statistics.median(r[k] for r in rs) for k in keys]
            least = min(r["freeze_ms"] for r in rs)
            rows.append(
                [f"{mib} MiB", "on" if fw == "1" else "off", f"{least:.1f}", *(f"{x:.1f}" for x in med)]
            )
    print(file=sys.stderr)
    print(f"ckpt dump --incremental from the shell, 1% written before each, median of {repeat} (alternating)")
    cols = [
        "target",
        "flagwatch",
        "least freeze",
        "freeze",
        "frozen smaps",
        "smaps before",
        "cpu frozen",
        "elapsed",
    ]
    table(cols, rows, markdown)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8,256,1024")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--migrate", default="", help="MiB,...: a migration's final freeze, off and on")
    ap.add_argument("--cli", default="", help="MiB,...: `ckpt dump --incremental` from the shell, off and on")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    if a.sizes:
        walk([int(x) for x in a.sizes.split(",")], a.threads, a.repeat, a.markdown)
    if a.cli:
        cli([int(x) for x in a.cli.split(",")], a.repeat, a.markdown)
    if a.migrate:
        migrate([int(x) for x in a.migrate.split(",")], a.repeat, a.markdown)


if __name__ == "__main__":
    main()
