"""What letting every thread of a tree back into its call costs a tree dump (ckpt/ptrace/parting.py).

A `wakeups 2` tree (tests/targets/wakeups.c: a root and two children, each with six threads asleep
in pause/nanosleep/clock_nanosleep/read/futex/poll and its main thread in read) is dumped with
dumptree.dump_tree, a full dump then incrementals, thawed as ckpt does (each thread parted into its
call by a thread that ends) and, for comparison, with every thread let go by a plain PTRACE_DETACH
(Frozen._parted switched off: the old thaw). Each mode twice, alternated; medians of --dumps.

    python bench/bench_tree_thaw.py [--dumps 8]

Prints a markdown table: the dumping process's CPU (user+sys, all its threads), wall, and the
freeze the dump reports.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ckpt.dumptree import dump_tree
from ckpt.ptrace import Frozen
from tests.util import build_c


def _cpu_ms() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dumps", type=int, default=8)
    args = ap.parse_args()
    p = subprocess.Popen([str(build_c("wakeups")), "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        for _ in range(3):
            p.stdout.readline()
        parted = Frozen._parted
        rows = []
        for mode in ("parted", "detach", "parted", "detach"):
            Frozen._parted = parted if mode == "parted" else (lambda self, th: False)  # type: ignore[method-assign]
            cpu, wall, freeze = [], [], []
            with tempfile.TemporaryDirectory() as d:
                for i in range(args.dumps):
                    t0, c0 = time.perf_counter(), _cpu_ms()
                    r = dump_tree(p.pid, d, incremental=i > 0)
                    wall.append((time.perf_counter() - t0) * 1e3)
                    cpu.append(_cpu_ms() - c0)
                    freeze.append(r.freeze_ms)
            rows.append((mode, statistics.median(cpu), statistics.median(wall), statistics.median(freeze)))
        Frozen._parted = parted  # type: ignore[method-assign]
    finally:
        p.kill()
        p.wait()
    print("| tree dump thaw (3 processes x 7 threads) | dump CPU ms | wall ms | freeze ms |")
    print("|---|---|---|---|")
    for mode, c, w, f in rows:
        print(f"| {mode} | {c:.1f} | {w:.1f} | {f:.1f} |")
    load = os.getloadavg()[0]
    print(f"\nload average {load:.1f}, medians of {args.dumps} dumps (a full, then incrementals)")


if __name__ == "__main__":
    main()
