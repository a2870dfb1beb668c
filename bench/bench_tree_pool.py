"""python's multiprocessing.Pool as a process tree (issue 12 B3/B4): dump, merge, restore.

    python bench/bench_tree_pool.py [--workers 2,4,8] [--repeat 3] [--markdown]

A `multiprocessing.Pool(N)` (fork) that ran one `map` and waits for more: N + 1 processes (the
parent with its three pool threads), its semaphores deleted /dev/shm files mapped shared by all.
Each run: `ckpt dump --kill --json` (the tree), `ckpt merge` of it into another directory, then
`ckpt restore --detach --json` of the merged tree (each shared semaphore made once by ckpt and
mapped by every process). Reported: the dump's freeze, the wall and CPU seconds (user + system;
steadier than wall on a shared machine) of dump, merge and restore, ckpt's own restore total.
Medians of --repeat runs. Not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tree import ENV, PR_SET_CHILD_SUBREAPER, ROOT, _ckpt, _cpu, _kill_all, _reap_all, print_table

POOL = (
    "import multiprocessing as mp, sys\n"
    "mp.set_start_method('fork')\n"
    "p = mp.Pool(int(sys.argv[1]))\n"
    "print('ready', *p.map(abs, range(-8, 0)), flush=True)\n"
    "sys.stdin.read()\n"
)


def one(n: int) -> dict[str, float]:
    py = subprocess.Popen(
        [sys.executable, "-c", POOL, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert py.stdout is not None
    assert py.stdout.readline().startswith(b"ready")
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as m:
        out, dump_wall, dump_cpu = _ckpt("dump", "--pid", str(py.pid), "-D", d, "--kill", "--json")
        assert out["restorable"], out["not_restorable"]
        py.wait()
        _reap_all()
        c0, t0 = _cpu(), time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "ckpt", "merge", str(out["layer"]), "-o", m],
            check=True, stdout=subprocess.DEVNULL, env=ENV, cwd=ROOT,
        )  # fmt: skip
        merge_wall, merge_cpu = time.perf_counter() - t0, _cpu() - c0
        got, rest_wall, rest_cpu = _ckpt("restore", m, "--detach", "--json")
        _kill_all([x["pid"] for x in got["tree"]])  # type: ignore[attr-defined]
        _reap_all()
    return {
        "freeze_ms": float(out["freeze_ms"]),  # type: ignore[arg-type]
        "dump_wall_ms": dump_wall * 1e3,
        "dump_cpu_s": dump_cpu,
        "merge_wall_ms": merge_wall * 1e3,
        "merge_cpu_s": merge_cpu,
        "restore_wall_ms": rest_wall * 1e3,
        "restore_ms": float(got["timings_ms"]["tree_total"]),  # type: ignore[index]
        "restore_cpu_s": rest_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="2,4,8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    cols = ["freeze_ms", "dump_wall_ms", "dump_cpu_s", "merge_wall_ms", "merge_cpu_s", "restore_wall_ms",
            "restore_ms", "restore_cpu_s"]  # fmt: skip
    rows = []
    for n in (int(x) for x in a.workers.split(",")):
        runs = [one(n) for _ in range(a.repeat)]
        rows.append([str(n)] + [f"{statistics.median(r[c] for r in runs):.2f}" for c in cols])
    head = ["workers", *cols]
    print_table(head, rows, a.markdown)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
