"""Two versions of ckpt, interleaved on the same targets: what a change buys on a shared machine.

    git archive main | tar -x -C /tmp/ckpt-main      # the other version, as plain files
    python bench/bench_ab.py --base /tmp/ckpt-main [--sizes 1,256,1024] [--rounds 5]

For each size, a bench/bigtarget.c process; each round runs `ckpt dump --track none` then
`ckpt restore --detach` of that layer, once with each version (in alternating order), as a user
runs them: a separate process, its working directory the version's own, so `python -m ckpt`
imports that version. Wall, CPU (user + system of the command, all threads), the command's own
clock and its frozen time (dump) or check time (restore); medians. When a machine is loaded,
absolute wall times mostly measure the queue for a CPU, but both versions wait in the same queue.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.util import build_c  # noqa: E402


def build_target() -> Path:
    """bench/bigtarget.c built once per content (tests/util.build_c: not taken for another tree's)."""
    return build_c("bigtarget", ["-O2"], where=ROOT / "bench")


def run(argv: list[str], src: Path) -> tuple[float, float, dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(src))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=src)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"{' '.join(argv)} ({src}) failed: {p.stderr}")
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return wall, cpu, json.loads(p.stdout.splitlines()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the other version's source tree (has ckpt/)")
    ap.add_argument("--sizes", default="1,256,1024", help="MiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    base = Path(a.base).resolve()
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(base / "ckpt"), str(ROOT / "ckpt")], check=True
    )
    versions = {"base": base, "this": ROOT}
    res: dict[tuple[int, str, str], list[tuple[float, float, float, float]]] = {}
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-ab-"))
    try:
        for mib in (int(x) for x in a.sizes.split(",")):
            t = subprocess.Popen(
                [str(build_target()), str(mib)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert t.stdout is not None and t.stdout.readline().startswith(b"ready")
                for i in range(a.rounds):
                    for v in ("base", "this") if i % 2 == 0 else ("this", "base"):
                        d = work / v
                        shutil.rmtree(d, ignore_errors=True)
                        argv = [
                            "-m",
                            "ckpt",
                            "dump",
                            "--pid",
                            str(t.pid),
                            "-D",
                            str(d),
                            "--json",
                            "--track",
                            "none",
                        ]
                        w, c, j = run(argv, versions[v])
                        res.setdefault((mib, "dump", v), []).append(
                            (w, c, j["elapsed_ms"] / 1e3, j["freeze_ms"] / 1e3)
                        )
                        w, c, r = run(
                            ["-m", "ckpt", "restore", j["layer"], "--detach", "--json"], versions[v]
                        )
                        os.kill(r["pid"], 9)
                        tm = r["timings_ms"]
                        res.setdefault((mib, "restore", v), []).append(
                            (w, c, tm["total"] / 1e3, tm.get("check", 0.0) / 1e3)
                        )
            finally:
                t.kill()
                t.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = statistics.median
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; medians of {a.rounds}")
    print("| size | command | code | wall s (median) | wall s (min) | CPU s | own s | frozen / check s |")
    print("|---|---|---|---|---|---|---|---|")
    for (mib, op, v), xs in sorted(res.items()):
        print(
            f"| {mib} MiB | {op} | {v} | {m(x[0] for x in xs):.3f} | {min(x[0] for x in xs):.3f} | "
            f"{m(x[1] for x in xs):.2f} | {m(x[2] for x in xs):.3f} | {m(x[3] for x in xs):.3f} |"
        )


if __name__ == "__main__":
    main()
