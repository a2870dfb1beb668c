"""Process-tree benchmarks (issue 12 B3): dump and restore of a shell with N background children.

    python bench/bench_tree.py [--children 1,4,16] [--repeat 3] [--markdown]

The tree is `sh -c` starting N `sleep`s and waiting for them: N + 1 processes. Each run is
`ckpt dump --kill --json` (the tree frozen, each process dumped into its own chain, killed once
written), then `ckpt restore --detach --json` (every child forked from its restored parent, with its
pid). Reported: the dump's freeze (what the tree felt), the dump's and the restore's wall time (as a
user runs them: Python's start included), ckpt's own restore total, and each command's CPU seconds
(user + system; steadier than wall on a shared machine). Medians of --repeat runs. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
PR_SET_CHILD_SUBREAPER = 36


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _ckpt(*args: str) -> tuple[dict[str, object], float, float]:
    """Run a ckpt command; its JSON (first line), wall seconds and CPU seconds. Read as a line: a
    restored tree holds the command's stdout, which sees no EOF while it runs."""
    c0, t0 = _cpu(), time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert p.stdout is not None
    line = p.stdout.readline()
    rc = p.wait()
    p.stdout.close()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if rc:
        raise SystemExit(f"ckpt {' '.join(args)} failed ({rc})")
    return json.loads(line), wall, cpu


def _reap_all() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _kill_all(pids: list[int]) -> None:
    """SIGKILL the restored processes, then reap them (ours: this process is a subreaper)."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    for p in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p, 0)


def print_table(head: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        print("  ".join(f"{h:>15}" for h in head))
        for r in rows:
            print("  ".join(f"{x:>15}" for x in r))


def one(n: int) -> dict[str, float]:
    script = f"i=0; while [ $i -lt {n} ]; do sleep 1000 & i=$((i+1)); done; echo ready; wait"
    sh = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert sh.stdout is not None
    assert sh.stdout.readline() == b"ready\n"
    with tempfile.TemporaryDirectory() as d:
        out, dump_wall, dump_cpu = _ckpt("dump", "--pid", str(sh.pid), "-D", d, "--kill", "--json")
        assert len(out["tree"]) == n, out  # type: ignore[arg-type]
        sh.wait()
        _reap_all()
        got, rest_wall, rest_cpu = _ckpt("restore", d, "--detach", "--json")
        _kill_all([m["pid"] for m in got["tree"]])  # type: ignore[attr-defined]
    return {
        "freeze_ms": float(out["freeze_ms"]),  # type: ignore[arg-type]
        "dump_wall_ms": dump_wall * 1e3,
        "dump_cpu_s": dump_cpu,
        "restore_wall_ms": rest_wall * 1e3,
        "restore_ms": float(got["timings_ms"]["tree_total"]),  # type: ignore[index]
        "restore_cpu_s": rest_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--children", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    cols = ["freeze_ms", "dump_wall_ms", "dump_cpu_s", "restore_wall_ms", "restore_ms", "restore_cpu_s"]
    rows = []
    for n in (int(x) for x in a.children.split(",")):
        runs = [one(n) for _ in range(a.repeat)]
        rows.append([str(n + 1)] + [f"{statistics.median(r[c] for r in runs):.2f}" for c in cols])
    head = ["processes", *cols]
    print_table(head, rows, a.markdown)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
