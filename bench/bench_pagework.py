"""The writer's compress phase alone, with and without ckpt/image/pagework (the C gather, digests
and zero scan that let go of the GIL), on one and two threads.

    python bench/bench_pagework.py [--mib 256] [--rounds 3]

A buffer of bench/bigtarget.c's mix (1/4 zero, 1/4 random, 1/2 text) goes through
`writer._compress_batch` in batches of 16 MiB, as a full dump's pool does after its thaw; each
configuration runs in a fresh Python (CKPT_PAGEWORK=0 for the pure-Python path), alternated. Prints
wall and CPU medians and the CPUs used (CPU / wall): with two threads, what the GIL leaves parallel.
Not a test: nothing here asserts a speed.
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

_CHILD = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from ckpt.image import pagework, writer
mib, threads, reps = map(int, sys.argv[1:4])
n = mib * 256
pages = np.empty((n, 4096), np.uint8)
rng = np.random.default_rng(1)
words = np.frombuffer(b"lorem ipsum dolor sit amet, consectetur adipiscing elit; checkpoint page ", np.uint8)
text = np.resize(words, 4096 + len(words))
for i in range(n):
    k = i % 4
    if k == 0:
        pages[i] = 0
    elif k == 1:
        pages[i] = rng.integers(0, 256, 4096, dtype=np.uint8)
    else:
        off = i % len(words)
        pages[i] = text[off : off + 4096]
        pages[i, :8] = np.frombuffer(np.uint64(i).tobytes(), np.uint8)
addrs = np.arange(n, dtype=np.uint64) * 4096 + 0x7F0000000000
B = 4096
out = []
for _ in range(reps):
    with ThreadPoolExecutor(threads) as ex:
        t0, c0 = time.perf_counter(), time.process_time()
        futs = [ex.submit(writer._compress_batch, addrs[lo : lo + B], pages[lo : lo + B], 256, -1)
                for lo in range(0, n, B)]
        chunks = [c for f in futs for c, _, _ in f.result().chunks]
        stored = sum(len(c.stored) if c.stored is not None else 256 * 4096 for c in chunks)
        out.append((time.perf_counter() - t0, time.process_time() - c0))
print(json.dumps({"native": pagework.lib() is not None, "stored": stored, "runs": out}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per configuration")
    ap.add_argument("--reps", type=int, default=3, help="passes over the buffer per process")
    a = ap.parse_args()
    confs = [(native, threads) for native in (True, False) for threads in (1, 2)]
    res: dict[tuple[bool, int], list[tuple[float, float]]] = {c: [] for c in confs}
    stored: dict[bool, int] = {}
    for i in range(a.rounds):
        for native, threads in confs if i % 2 == 0 else confs[::-1]:
            env = dict(os.environ, PYTHONPATH=str(ROOT), CKPT_PAGEWORK="1" if native else "0")
            p = subprocess.run(
                [sys.executable, "-c", _CHILD, str(a.mib), str(threads), str(a.reps)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            j = json.loads(p.stdout)
            if j["native"] != native:
                sys.exit("ckpt/image/_pagework.so is not built: run scripts/setup.sh")
            stored[native] = j["stored"]
            res[(native, threads)] += [tuple(r) for r in j["runs"][1:]]  # the first pass faults pages in
    if stored[True] != stored[False]:
        sys.exit(f"the two paths stored different sizes: {stored}")
    m = statistics.median
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {a.mib} MiB")
    print("| path | threads | wall ms (median / least) | CPU ms | CPUs used |")
    print("|---|---|---|---|---|")
    for (native, threads), xs in res.items():
        w, c = m(x[0] for x in xs), m(x[1] for x in xs)
        name = "pagework (C)" if native else "Python"
        least = min(x[0] for x in xs)
        print(f"| {name} | {threads} | {w * 1e3:.0f} / {least * 1e3:.0f} | {c * 1e3:.0f} | {c / w:.2f} |")


if __name__ == "__main__":
    main()
