"""How an incremental dump's freeze grows with the target's open fds (issue 9, part 2).

    python bench/bench_manyfds.py [--fds 0,100,400,1000] [--repeat 5] [--dumps 5] [--base DIR] [--markdown]

The target is python3 holding N fds: half of them opens of /dev/null (each its own open file
description on one inode), a quarter pipes, a quarter unix socketpairs; every eighth fd of each kind
is dup'ed (a dup shares its description). Per run: a fresh target, a full uffd-wp dump, then
--dumps incremental ones through the API (Python's start not counted); the median of their freezes
is the run's. Rows: this tree, this tree with CKPT_PROCGRAB=0 (the collect reads /proc itself), and
with --base DIR that tree; each run in a process of its own, the rows' runs alternated. Prints
freeze ms (median / least over the runs) and the collect's share. Not a test: nothing here asserts a
speed.
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

TARGET = r"""
import os, socket, sys
n = int(sys.argv[1])
keep = []
for i in range(n // 2):
    keep.append(os.open("/dev/null", os.O_RDONLY))
for i in range(n // 8):
    keep.extend(os.pipe())
for i in range(n // 8):
    a, b = socket.socketpair()
    keep.extend((a.detach(), b.detach()))
for fd in keep[::8]:
    keep.append(os.dup(fd))
print("ready", len(os.listdir("/proc/self/fd")), flush=True)
sys.stdin.read()
"""

# One run, in a process whose ckpt is the tree given: a fresh target, a full dump, incremental ones.
ONE = r"""
import json, os, statistics, subprocess, sys, tempfile
root, n, dumps, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, root)
from ckpt.dump import dump
p = subprocess.Popen([sys.executable, "-c", target, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
try:
    fds = int(p.stdout.readline().split()[1])
    fr, col = [], []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-fds-") as d:
        dump(p.pid, d, track="uffd-wp")
        for _ in range(dumps):
            r = dump(p.pid, d, incremental=True, track="uffd-wp")
            fr.append(r.freeze_ms)
            col.append(sum(v for k, v in r.phases_ms.items() if k.startswith("frozen: collect")))
    print(json.dumps({"fds": fds, "freeze": statistics.median(fr), "collect": statistics.median(col)}))
finally:
    p.kill()
    p.wait()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fds", default="0,100,400,1000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dumps", type=int, default=5)
    ap.add_argument("--base", help="another tree of ckpt, its rows beside this one's")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    trees = [("this", str(ROOT), {}), ("this, CKPT_PROCGRAB=0", str(ROOT), {"CKPT_PROCGRAB": "0"})]
    if a.base:
        trees.append(("base", a.base, {}))
    rows = []
    for n in (int(x) for x in a.fds.split(",")):
        got: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in trees}
        for _ in range(a.repeat):
            for name, root, env in trees:
                argv = [sys.executable, "-c", ONE, root, str(n), str(a.dumps), TARGET]
                e = {**os.environ, **env}
                out = subprocess.run(argv, capture_output=True, text=True, check=True, env=e)
                got[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(".", end="", file=sys.stderr, flush=True)
        for name, runs in got.items():
            f = [r["freeze"] for r in runs]
            c = [r["collect"] for r in runs]
            rows.append(
                [
                    str(runs[0]["fds"]),
                    name,
                    f"{statistics.median(f):.1f} / {min(f):.1f}",
                    f"{statistics.median(c):.1f}",
                ]
            )
    print(file=sys.stderr)
    cols = ["fds", "tree", "incr freeze ms", "collect ms"]
    print(f"incremental uffd-wp dumps of python3 holding N fds; median of {a.dumps} dumps a run, "
          f"median / least of {a.repeat} runs")
    if a.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        w = [max(len(x) for x in col) for col in zip(cols, *rows, strict=False)]
        for r in [cols, *rows]:
            print("  ".join(x.rjust(k) for x, k in zip(r, w, strict=True)))


if __name__ == "__main__":
    main()
