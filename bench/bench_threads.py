"""Restore of multi-threaded processes (issue 12 B2): what each thread costs.

    python bench/bench_threads.py [--threads 1,8,32,64] [--repeat 3] [--markdown]

For each count, tests/targets/threads.c with that many workers (waiting in futex waits, pause and
nanosleep, or spinning) is dumped with --kill and restored with `ckpt restore --detach --json`;
the restored process must then answer `check` with "ok" (every worker checked itself). Reported:
the dump's freeze time, ckpt's own restore total and its "finish" part (everything after the
pages: threads are made there), the restore command's CPU seconds (user + system, steadier than
wall on a shared machine) and the injected syscalls. Medians of --repeat runs. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.util import LineChannel, Target, build_c  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")


def ckpt(*args: str) -> dict[str, object]:
    p = subprocess.run([sys.executable, "-m", "ckpt", *args], capture_output=True, text=True, env=ENV)
    if p.returncode:
        raise RuntimeError(f"ckpt {' '.join(args)}: {p.stderr.strip()}")
    out: dict[str, object] = json.loads(p.stdout)
    return out


def one(exe: Path, n: int, work: Path) -> dict[str, float]:
    t = Target([str(exe), str(n)], stderr=subprocess.DEVNULL)
    try:
        assert t.cmd("waiting") == "waiting"
        d = work / f"d{n}"
        out = ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--json", "--kill")
        t.proc.wait(30)
    finally:
        t.close()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(out["layer"]), "--detach", "--json"],
        stdout=subprocess.PIPE, stdin=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    chan = LineChannel(p, 120)
    res = json.loads(chan.readline())
    p.wait(60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = int(res["pid"])
    # The restored process shares the command's pipes: it checks itself.
    answer = chan.cmd("check")
    os.kill(pid, signal.SIGKILL)
    if answer != "ok":
        raise RuntimeError(f"{n} threads: the restored process says {answer}")
    shutil.rmtree(d)
    return {
        "freeze_ms": float(out["freeze_ms"]),  # type: ignore[arg-type]
        "restore_ms": float(res["timings_ms"]["total"]),
        "finish_ms": float(res["timings_ms"]["finish"]),
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "syscalls": float(res["syscalls"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,8,32,64")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    exe = build_c("threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in a.threads.split(",")):
            runs = [one(exe, n, Path(tmp)) for _ in range(a.repeat)]
            rows.append((n, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    head = ["threads", "dump freeze ms", "restore ms", "finish ms", "restore CPU s", "syscalls"]
    lines = [[str(n + 1), f"{m['freeze_ms']:.1f}", f"{m['restore_ms']:.1f}", f"{m['finish_ms']:.1f}",
              f"{m['cpu_s']:.2f}", f"{m['syscalls']:.0f}"] for n, m in rows]  # fmt: skip
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        print("  ".join(f"{h:>14}" for h in head))
        for ln in lines:
            print("  ".join(f"{c:>14}" for c in ln))
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs", file=sys.stderr)


if __name__ == "__main__":
    main()
