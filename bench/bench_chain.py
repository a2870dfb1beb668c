"""Long chains (issue 9): what an incremental dump's `prepare` and a restore's plan cost as the chain grows.

    python bench/bench_chain.py [--mib 64] [--lengths 2,10,50,100,200] [--repeat 3] [--markdown]

A bench/bigtarget.c process of --mib MiB (1/4 zero, 1/4 random, 1/2 text) gets a full dump, then
incremental dumps in-process (ckpt.api.dump), 1% of its pages written before each, until the chain
is as long as the longest length asked. At each length asked, alternated:
  - `--repeat` incrementals that read the parent's table file (ckpt/image/tablecache.py): their
    `prepare` phase (phases_ms, wall) and the dump's CPU time;
  - `--repeat` incrementals whose parent's table file was removed first, so that they walk the
    chain (MergedView + page_table, as every incremental did before the table file);
  - the restore plan of the newest layer (Layer.open, MergedView, restore.make_plan: every chunk's
    checksum read, no process made), CPU ms, with its table file and with the walk.
Each measured dump adds a layer, so "at length L" means at L..L+2*repeat layers. The machine is
shared: CPU times are the steadier figure; the load is printed. Not a test: nothing asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_dump import Target, machine, table  # noqa: E402

from ckpt import api  # noqa: E402
from ckpt.image import Layer, MergedView, find_layers, tablecache  # noqa: E402
from ckpt.restore import make_plan  # noqa: E402

COLUMNS = ["layers", "parent table", "prepare ms (least-most)", "dump CPU ms", "restore plan CPU ms", "load"]


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def plan_cpu(top: Path, walk: bool) -> float:
    c0 = time.process_time()
    with MergedView(Layer.open(top)) as v:
        if walk:
            v.cached_table = lambda small=False: None  # type: ignore[method-assign]
        make_plan(v, small=True)
    return (time.process_time() - c0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--lengths", default="2,10,50,100,200")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    lengths = sorted(int(x) for x in a.lengths.split(","))
    print(f"machine: {machine()}; load at start {load()}")
    rows: list[list[str]] = []
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-chain-", dir=os.environ.get("CKPT_BENCH_DIR")))
    t = Target(a.mib)
    seed = [0]

    def incremental(walk: bool) -> tuple[float, float]:
        seed[0] += 1
        t.write(10, seed[0])
        if walk:
            tablecache.remove(find_layers(work)[-1])
        c0 = time.process_time()
        r = api.dump(t.pid, work, incremental=True)
        return r.phases_ms["prepare"], (time.process_time() - c0) * 1e3

    try:
        api.dump(t.pid, work)
        for want in lengths:
            while len(find_layers(work)) < want:
                incremental(False)
            got: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            plans: dict[bool, list[float]] = {False: [], True: []}
            at = len(find_layers(work))
            for _ in range(a.repeat):
                for walk in (False, True):
                    got[walk].append(incremental(walk))
            top = find_layers(work)[-1]
            for _ in range(a.repeat):
                for walk in (False, True):
                    plans[walk].append(plan_cpu(top, walk))
            for walk in (True, False):
                prep = [p for p, _ in got[walk]]
                cpu = [c for _, c in got[walk]]
                rows.append(
                    [
                        f"{at}-{at + 2 * a.repeat}",
                        "walk (no table file)" if walk else "table file",
                        f"{statistics.median(prep):.1f} ({min(prep):.1f}-{max(prep):.1f})",
                        f"{statistics.median(cpu):.0f}",
                        f"{statistics.median(plans[walk]):.0f}",
                        load(),
                    ]
                )
        table(
            f"long chains of a {a.mib} MiB process, 1% written between dumps (medians of {a.repeat})",
            COLUMNS,
            rows,
            a.markdown,
        )
    finally:
        t.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
