"""ckpt/pageset.py: where numpy starts to pay for its import (issue 9 part 3).

    python bench/bench_pageset.py [--sizes 256,4096,16384,65536] [--repeat 5]

For each size, a page set like a process's (runs of 1-64 pages with gaps) and a second one sharing
half its pages; each operation of the interface on the array('Q') kind and on the numpy kind (best
of --repeat, in ms), and numpy's import time measured in a fresh interpreter. The threshold
(pageset.DEFAULT_SMALL_MAX) is right where a whole small dump's operations on the array kind cost
less than importing numpy. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ckpt.pageset import PAGE, BigPages, PageSet, SmallPages  # noqa: E402


def layout(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    out: list[int] = []
    a = 0x7F0000000000
    while len(out) < n:
        k = rnd.randint(1, 64)
        out.extend(a + i * PAGE for i in range(min(k, n - len(out))))
        a += (k + rnd.randint(1, 16)) * PAGE
    return out


def best(fn: Callable[[], object], repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3


def numpy_import_ms(repeat: int) -> float:
    code = "import time; t = time.perf_counter(); import numpy; print((time.perf_counter() - t) * 1e3)"
    return min(float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,4096,16384,65536")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    print(f"numpy import (fresh interpreter, best of {a.repeat}): {numpy_import_ms(a.repeat):.1f} ms")
    ops: dict[str, Callable[[PageSet, PageSet, list[tuple[int, int]]], object]] = {
        "runs": lambda x, y, sp: x.runs(),
        "union": lambda x, y, sp: x.union(y),
        "difference": lambda x, y, sp: x.difference(y),
        "isin": lambda x, y, sp: x.isin(y),
        "within": lambda x, y, sp: x.within(sp),
        "to_bytes": lambda x, y, sp: x.to_bytes(),
    }
    print("| pages | kind | " + " | ".join(ops) + " | all |")
    print("|---|---|" + "---|" * (len(ops) + 1))
    for n in (int(s) for s in a.sizes.split(",")):
        xs = layout(n, 1)
        ys = sorted(set(xs[::2]) | set(layout(n // 2, 2)))
        sp = SmallPages(array("Q", xs)).runs()[::3]
        for kind, make in (("array('Q')", lambda v: SmallPages(array("Q", v))),
                           ("numpy", lambda v: BigPages(np.array(v, dtype=np.uint64)))):  # fmt: skip
            x, y = make(xs), make(ys)
            t = [best(lambda f=f, x=x, y=y, sp=sp: f(x, y, sp), a.repeat) for f in ops.values()]  # type: ignore[misc]
            print(f"| {n} | {kind} | " + " | ".join(f"{v:.2f}" for v in t) + f" | {sum(t):.2f} |")


if __name__ == "__main__":
    main()
