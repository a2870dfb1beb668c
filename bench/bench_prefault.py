"""The copy buffer faulted in while `ckpt dump` imports (ckpt/prefault.py): what the imports lose to it.

    python bench/bench_prefault.py [--mib 256] [--repeat 7] [--markdown]

Each run is a fresh Python process that does what `ckpt dump` does first: start faulting in an
early buffer of --mib MiB on two threads, then import the dump's modules (numpy, zstandard, ckpt),
then take the buffer. Modes: `none` (no buffer: the imports alone), `one call` (one
MADV_POPULATE_WRITE per half, as before), `1 MiB steps` (ckpt/prefault.py STEP, now). Columns: the
time from the start to the buffer being ready (what the dump waits for), the imports' wall, the main
thread's CPU and the time it was runnable but waiting for a CPU (/proc/thread-self/schedstat); what
is left of the imports' wall, "blocked", is time the main thread could not run at all (the mmap
lock). Medians. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
def sched():
    with open("/proc/thread-self/schedstat") as f:
        a = f.read().split()
    return int(a[0]) / 1e6, int(a[1]) / 1e6
import ckpt.prefault as pf
mode, npages = sys.argv[1], int(sys.argv[2])
if mode == "one call":
    pf.STEP = 1 << 40
s0, ts = sched(), time.perf_counter()
eb = pf.EarlyBuffer(npages) if mode != "none" else None
ti = time.perf_counter()
import numpy, zstandard, xxhash
import ckpt.api, ckpt.dump, ckpt.image.writer, ckpt.memory
t1 = time.perf_counter()
s1 = sched()
if eb is not None:
    eb.take()
t2 = time.perf_counter()
imp = (t1 - ti) * 1e3
run, queue = s1[0] - s0[0], s1[1] - s0[1]
print(json.dumps({"ready": (t2 - t0) * 1e3, "imports": imp, "cpu": run, "queue": queue,
                  "blocked": max(0.0, (t1 - ts) * 1e3 - run - queue)}))
"""


def one(mode: str, npages: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(npages)], capture_output=True, text=True, env=env, check=True
    )
    out: dict[str, float] = json.loads(p.stdout)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "ckpt")], check=True)
    modes = ["none", "one call", "1 MiB steps"]
    npages = a.mib * 256
    res: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for i in range(a.repeat):
        for m in modes if i % 2 == 0 else reversed(modes):  # interleaved: both see the same load
            res[m].append(one(m, npages))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cols = ["buffer", "ready ms", "min ready ms", "imports ms", "main CPU ms", "runnable ms", "blocked ms"]
    print(f"# {a.mib} MiB early buffer, median of {a.repeat}, load {load}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for m in modes:
        rs = res[m]

        def med(k: str, rs: list[dict[str, float]] = rs) -> str:
            return f"{statistics.median(r[k] for r in rs):.0f}"

        least = f"{min(r['ready'] for r in rs):.0f}"
        label = m if m == "none" else f"{a.mib} MiB, {m}"
        cells = [label, med("ready"), least, med("imports"), med("cpu"), med("queue"), med("blocked")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
