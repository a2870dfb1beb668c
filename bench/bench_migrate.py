"""Live migration benchmarks (issue 10): downtime, rounds and bytes on the wire over loopback.

    python bench/bench_migrate.py [--sizes 64,1024] [--repeat 1] [--markdown] [--quick]

The target is tests/targets/dirtier.c: N MiB, rewriting a share of its pages every 100 ms (0 = idle).
Each run starts `ckpt serve --once --json` and `ckpt migrate --json` as a user would; the restored
copy is asked to check its own memory (every page must match its version), then killed.
Rows:
  warm     the default: the destination builds the process while the rounds arrive
  cold     CKPT_WARM_RESTORE=0: restore from the whole chain after the final round (CRIU's way)
  stop&copy  plain `ckpt dump --kill` + `ckpt restore`: the process is down for both
  --bandwidth rows: a rate-limited sender, with and without --auto-converge
Downtime = the source's final freeze until the destination reports the copy running. Medians of
--repeat runs. Not a test: nothing here asserts a speed; figures on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.util import LineChannel, build_c  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
PR_SET_CHILD_SUBREAPER = 36


def _ckpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckpt", *args]


class Dirtier:
    def __init__(self, mib: int, permille: int) -> None:
        exe = build_c("dirtier")
        self.proc = subprocess.Popen([str(exe), str(mib * 256), str(permille)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        self.io = LineChannel(self.proc, 600)
        assert self.io.readline().startswith("ready")

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()


def migrate_once(mib: int, permille: int, work: Path, *extra: str, warm: bool = True) -> dict[str, Any]:
    t = Dirtier(mib, permille)
    d = Path(tempfile.mkdtemp(dir=work))
    env = dict(ENV, CKPT_WARM_RESTORE="1" if warm else "0")
    srv = subprocess.Popen(_ckpt("serve", "-D", str(d / "dst"), "--once", "--json"), stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    io = LineChannel(srv, 900)
    pid = None
    try:
        addr = json.loads(io.readline())["listening"]
        m = subprocess.run(_ckpt("migrate", "--pid", str(t.proc.pid), "--to", addr, "--json", *extra),
                           capture_output=True, text=True, env=ENV)  # fmt: skip
        if m.returncode:
            raise RuntimeError(f"migrate failed: {m.stderr.strip()}")
        lines = [json.loads(ln) for ln in m.stdout.splitlines()]
        res = lines[-1]
        res["round_lines"] = lines[:-1]
        while True:
            ev = json.loads(io.readline())
            if ev.get("event") == "done":
                pid = ev["pid"]
                break
        check = io.cmd("check")
        if not check.startswith("ok"):
            raise RuntimeError(f"the migrated copy's memory is wrong: {check}")
        return res
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        srv.kill()
        srv.wait()
        t.close()
        shutil.rmtree(d, ignore_errors=True)


def stop_and_copy(mib: int, permille: int, work: Path) -> dict[str, Any]:
    """The baseline: a full dump that kills the process, then a restore; down for both."""
    t = Dirtier(mib, permille)
    d = Path(tempfile.mkdtemp(dir=work))
    pid = None
    try:
        p = subprocess.run(_ckpt("dump", "--pid", str(t.proc.pid), "-D", str(d), "--kill", "--json"),
                           capture_output=True, text=True, env=ENV, check=True)  # fmt: skip
        dump = json.loads(p.stdout)
        t0 = time.perf_counter()
        r = subprocess.run(_ckpt("restore", str(d / "layer-0001.ckpt"), "--detach", "--json"),
                           capture_output=True, text=True, env=ENV, stdin=subprocess.DEVNULL)  # fmt: skip
        wall = (time.perf_counter() - t0) * 1e3
        if r.returncode:
            raise RuntimeError(r.stderr)
        rest = json.loads(r.stdout)
        pid = rest["pid"]
        return {
            "dump_ms": dump["elapsed_ms"],
            "restore_ms": rest["timings_ms"]["total"],
            "restore_wall_ms": wall,
        }
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        t.close()
        shutil.rmtree(d, ignore_errors=True)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,1024")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--quick", action="store_true", help="skip the bandwidth rows")
    a = ap.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    sizes = [int(x) for x in a.sizes.split(",")]
    rows: list[list[str]] = []
    head = ["MiB", "workload", "mode", "policy", "rounds", "downtime ms", "final freeze ms", "restore ms",
            "sent/mem", "total ms", "stop reason"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-mig-") as w:
        work = Path(w)
        for mib in sizes:
            # idle; a fixed dirty set (262 pages per 100 ms whatever the size: downtime should not
            # grow with memory); 1% of the memory per 100 ms (the aim, ~100 MB/s at 1 GiB)
            for permille, wl in ((0, "idle"), (max(1, 1024 // mib), "262 pages/100ms"), (10, "1%/100ms")):
                modes = (True, False) if permille != 10 else (True,)
                for warm in modes:
                    rs = [
                        migrate_once(mib, permille, work, "--max-rounds", "8", warm=warm)
                        for _ in range(a.repeat)
                    ]
                    rows.append([str(mib), wl, "warm" if warm else "cold", "qemu",
                                 str(rs[-1]["rounds"]),
                                 f"{med([r['downtime_ms'] for r in rs]):.1f}",
                                 f"{med([r['final_freeze_ms'] for r in rs]):.1f}",
                                 f"{med([r['restore_ms'] for r in rs]):.1f}",
                                 f"{med([r['sent_per_memory'] for r in rs]):.2f}",
                                 f"{med([r['total_ms'] for r in rs]):.0f}",
                                 str(rs[-1]["stop_reason"])[:60]])  # fmt: skip
                    print(" | ".join(rows[-1]), file=sys.stderr)
            sc = [stop_and_copy(mib, 0, work) for _ in range(a.repeat)]
            down = med([s["dump_ms"] + s["restore_ms"] for s in sc])
            dump_ms = med([s["dump_ms"] for s in sc])
            rest_ms = med([s["restore_ms"] for s in sc])
            row = [str(mib), "idle", "stop&copy", "-", "0", f"{down:.1f}", f"{dump_ms:.1f}", f"{rest_ms:.1f}"]
            rows.append([*row, "-", "-", "dump --kill + restore"])
            print(" | ".join(rows[-1]), file=sys.stderr)
        if not a.quick:
            # 64 MiB rewriting 3% per 100 ms dirties ~19 MB/s: above a 10 MB/s link, below 50 MB/s.
            for extra, label in (
                (("--bandwidth", "50MB/s", "--max-rounds", "8"), "50MB/s"),
                (("--bandwidth", "10MB/s", "--max-rounds", "8"), "10MB/s"),
                (("--bandwidth", "10MB/s", "--max-rounds", "8", "--auto-converge"), "10MB/s +auto-converge"),
            ):
                r = migrate_once(64, 30, work, "--policy", "qemu", *extra)
                thr = max(float(x["throttle"]) for x in r["round_lines"])
                rows.append(["64", "3%/100ms", label, "qemu", str(r["rounds"]), f"{r['downtime_ms']:.1f}",
                             f"{r['final_freeze_ms']:.1f}", f"{r['restore_ms']:.1f}",
                             f"{r['sent_per_memory']:.2f}", f"{r['total_ms']:.0f}",
                             f"{str(r['stop_reason'])[:50]} (max throttle {thr:.0%})"])  # fmt: skip
                print(" | ".join(rows[-1]), file=sys.stderr)
    print(
        f"# ckpt migrate over loopback, {platform.node()} ({os.cpu_count()} CPUs, shared), repeat {a.repeat}"
    )
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table()
        for h in head:
            t.add_column(h)
        for r in rows:
            t.add_row(*r)
        Console().print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
