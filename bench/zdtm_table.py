"""ckpt's zdtm-style corpus (tests/zdtm) as a table, like the summary of CRIU's zdtm.py.

    python bench/zdtm_table.py [--markdown] [--workers 2] [--variants full,incr] [NAME ...]

Runs every program (or the NAMEs) through each variant (tests/zdtm_run.py: `full` is one dump with
--kill then a restore, `incr` a full dump, a change, an incremental dump with --kill, then a restore
of the chain) and prints one row per program with its outcome per variant (PASS, REFUSED, WRONG),
the reason of each refusal or failure, and the counts. Also the CPU seconds (user+sys) of every
ckpt command run, and the wall time. Not a test: tests/test_zdtm.py asserts the outcomes.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.zdtm_run import VARIANTS, describe, programs, run_all  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    names = a.names or programs()
    variants = a.variants.split(",")
    # Orphans of the tree programs come to us, not to init.
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    t0 = time.monotonic()
    res = run_all([(n, v) for n in names for v in variants], workers=a.workers)
    wall = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    counts: Counter[tuple[str, str]] = Counter()
    rows = []
    for n in names:
        outs = [res[(n, v)] for v in variants]
        for o in outs:
            counts[(o.variant, o.verdict)] += 1
        why = next((o.detail for o in outs if o.verdict != "PASS"), "")
        why = why.replace("|", "/")[:160]
        rows.append((n, describe(n), *[o.verdict for o in outs], why))
    head = ("program", "what it checks", *variants, "refusal or failure")
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        for r in rows:
            print(f"{r[0]:15} " + " ".join(f"{x:8}" for x in r[2 : 2 + len(variants)]) + f" {r[-1][:100]}")
    print()
    for v in variants:
        c = {k: counts[(v, k)] for k in ("PASS", "REFUSED", "WRONG", "SETUP")}
        print(f"{v}: {len(names)} programs: {c['PASS']} PASS, {c['REFUSED']} REFUSED, {c['WRONG']} WRONG"
              + (f", {c['SETUP']} broken" if c["SETUP"] else ""))  # fmt: skip
    print(f"wall {wall:.0f} s, ckpt and programs' CPU {ru.ru_utime + ru.ru_stime:.0f} s (user+sys), "
          f"{a.workers} at a time")  # fmt: skip


if __name__ == "__main__":
    main()
