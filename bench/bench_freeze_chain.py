"""Two trees of ckpt, each dumping one chain of its own target many times: a freeze's change that the
run-to-run spread of bench_freeze.py --base hides.

    python bench/bench_freeze_chain.py --base DIR [--target sigwait:8 | dirty:256] [--chunks 6] [--per 10]
        [--env NAME=VALUE] [--base-env NAME=VALUE]

bench_freeze.py --base starts a fresh target and a fresh Python for every run of each tree: on a
shared 2-vCPU machine its medians move by 1-2 ms between quarter-hours, more than most changes of
the freeze are worth. Here each tree gets one resident process (its own `import ckpt`) holding one
target (bench/freezetarget.c), a full dump (uffd-wp) and one incremental first, not counted; then
the trees take turns, CHUNKS times PER incrementals each, in alternating order (A B, B A, ...), so
both see the same minutes of the host. One chain per tree, as a migration's rounds or a checkpointing
job's dumps are: what stays warm between freezes (caches of the process, the flag counters through
an API caller's PageTablesCache when --walks-cache is given) counts as it does for them.

--target MODE:THREADS for an idle target of 8 MiB (sigwait, nanosleep, read), or dirty:MIB for a
target of MIB MiB that writes 1% of its pages (evenly spread) before each incremental.
--env and --base-env set a variable in one tree's process only (CKPT_FREEZE_RT=1 against =auto:
--base DIR may then be this tree itself). Prints, per phase of `phases_ms`, the median and the first
quartile of each tree; "held" is the seize to the thaw's end (DumpResult.held_ms). Not a test.
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

# The resident process of one tree: argv root, mode, threads, MiB, walks-cache; then a count per
# line on stdin, answered with one JSON line (the phases of that many incrementals).
_SERVER = r"""
import json, shutil, subprocess, sys, tempfile
root = sys.argv[1]
sys.path[:0] = [root, root + "/bench"]
import bench_freeze as bf
mode, threads, mib, cache = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
exe = bf.build_target()
p = subprocess.Popen([str(exe), mode, threads, mib], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
ch = bf.LineChannel(p, 120)
assert ch.readline().startswith("ready")
kw = bf.watch_kw(True) if cache else {}
d = tempfile.mkdtemp(prefix="ckpt-bench-chain-")
try:
    bf.dump(p.pid, d, track="uffd-wp", **kw)
    bf.dump(p.pid, d, incremental=True, track="uffd-wp", **kw)
    print("ready", flush=True)
    for line in sys.stdin:
        out = []
        for _ in range(int(line)):
            if mode == "dirty":
                assert ch.cmd("write 10").startswith("written")
            out.append(bf.phases(bf.dump(p.pid, d, incremental=True, track="uffd-wp", **kw)))
        print(json.dumps(out), flush=True)
finally:
    p.kill()
    p.wait()
    shutil.rmtree(d, ignore_errors=True)
"""

KEYS = (
    "freeze", "held", "frozen: seize", "frozen: track", "frozen: collect", "frozen: collect: inject",
    "frozen: collect: fds", "frozen: collect: props", "frozen: collect: threads", "frozen: collect: task",
    "frozen: scan", "frozen: copy", "frozen: smaps", "frozen: thaw", "cpu: frozen",
)  # fmt: skip


def _server(
    root: str, mode: str, threads: str, mib: str, cache: bool, env: list[str]
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", _SERVER, root, mode, threads, mib, "1" if cache else "0"]
    e = dict(os.environ, **dict(kv.split("=", 1) for kv in env))
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=e)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("ready"):
        p.kill()
        raise RuntimeError(f"{root}: the resident dumper did not start ({line!r})")
    return p


def _ask(p: subprocess.Popen[str], n: int) -> list[dict[str, float]]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(f"{n}\n")
    p.stdin.flush()
    rows: list[dict[str, float]] = json.loads(p.stdout.readline())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the other tree (its C libraries built)")
    ap.add_argument("--target", default="sigwait:8", help="MODE:THREADS (idle, 8 MiB) or dirty:MIB")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--per", type=int, default=10)
    ap.add_argument("--walks-cache", action="store_true", help="the dumps share a PageTablesCache")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for this tree's process only")
    ap.add_argument("--base-env", action="append", default=[], help="NAME=VALUE for the base's only")
    a = ap.parse_args()
    mode, _, n = a.target.partition(":")
    threads, mib = ("1", n or "256") if mode == "dirty" else (n or "1", "8")
    trees = {"base": a.base, "this": str(ROOT)}
    envs = {"base": a.base_env, "this": a.env}
    procs = {n: _server(root, mode, threads, mib, a.walks_cache, envs[n]) for n, root in trees.items()}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        for c in range(a.chunks):
            for name in ("base", "this") if c % 2 == 0 else ("this", "base"):
                rows[name] += _ask(procs[name], a.per)
                print(".", end="", file=sys.stderr, flush=True)
    finally:
        for p in procs.values():
            if p.stdin is not None:
                p.stdin.close()
            p.wait()
    print(file=sys.stderr)
    what = f"{mib} MiB, 1% written" if mode == "dirty" else f"{mode}, {threads} thread(s), 8 MiB"
    print(f"{what}: {a.chunks} x {a.per} incrementals per tree, alternated; ms")
    print(f"{'phase':26s} {'base med':>9s} {'this med':>9s} {'base p25':>9s} {'this p25':>9s}")
    for k in KEYS:
        b = [r.get(k, 0.0) for r in rows["base"]]
        t = [r.get(k, 0.0) for r in rows["this"]]
        qb, qt = statistics.quantiles(b, n=4)[0], statistics.quantiles(t, n=4)[0]
        name = k.removeprefix("frozen: ").replace("cpu: frozen", "cpu")
        print(f"{name:26s} {statistics.median(b):9.3f} {statistics.median(t):9.3f} {qb:9.3f} {qt:9.3f}")


if __name__ == "__main__":
    main()
