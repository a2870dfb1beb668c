"""A long fuzz run over real layers (the standing test is tests/test_fuzz.py, same cases).

    .venv/bin/python bench/fuzz_layers.py --cases 500 --seed 1

Prints each failing case (with the seed to replay it) and a table: per mutation kind, how many
cases, how often each command exited 0/1/2, and the largest peak RSS of a case's child.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzzing import RSS_LIMIT, odd_files, run_case
from tests.test_fuzz import make_chain


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 32)
    print(f"seed {seed}, {a.cases} cases; peak RSS bound {RSS_LIMIT >> 20} MiB", flush=True)
    rng = random.Random(seed)
    kinds: Counter[str] = Counter()
    codes: dict[str, Counter[str]] = defaultdict(Counter)
    peak: dict[str, int] = defaultdict(int)
    bad = 0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        _ = make_chain(work / "chain")
        top = work / "chain" / "layer-0002.ckpt"
        odd = odd_files(work / "odd")
        for i in range(a.cases):
            out = run_case(rng, work / "chain", top, work, odd)
            k = out.case.kind
            kinds[k] += 1
            peak[k] = max(peak[k], out.vmhwm)
            for cmd, c in out.codes.items():
                codes[k][f"{cmd}={c}"] += 1
            if out.problems:
                bad += 1
                print(f"FAIL case {i} ({k}: {out.case.detail}): " + "; ".join(out.problems), flush=True)
    print(f"\n{'kind':10} {'cases':>5} {'peak RSS':>9}  exits (command=code: count)")
    for k in sorted(kinds):
        ex = ", ".join(f"{c}:{n}" for c, n in sorted(codes[k].items()))
        print(f"{k:10} {kinds[k]:>5} {peak[k] >> 20:>6} MiB  {ex}")
    print(f"\n{bad} failing case(s) of {a.cases} in {time.monotonic() - t0:.0f} s (seed {seed})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
