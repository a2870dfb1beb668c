"""Cost of a huge untouched reservation (issue 13 item 5): each command's peak RSS and wall time, and
the target's page tables (VmPTE), for a process with one MAP_NORESERVE reservation of a few pages
touched. Not a test: it prints a table. Wall times are noisy on a shared machine.

    python bench/bench_reservation.py [--gib 64 16384]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.util import Target, build_c  # noqa: E402


def vmpte(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmPTE:"))


def run(argv: list[str]) -> tuple[int, float, int]:
    """(exit code, wall s, peak RSS MB) of one command, its output discarded."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.execve(sys.executable, [sys.executable, *argv], env)
    _, st, ru = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(st), time.perf_counter() - t0, ru.ru_maxrss // 1024


def one(gib: int, work: Path) -> None:
    t = Target([str(build_c("reserve")), str(gib), "small"])
    try:
        base = int(t.cmd("info").split()[1], 16)
        d = work / f"r{gib}"
        shutil.rmtree(d, ignore_errors=True)
        for c in ("write 0 1", "write 1000 2"):
            t.cmd(c)
        pte0 = vmpte(t.pid)
        print(f"\n{gib} GiB reservation, VmPTE before: {pte0} kB")
        print(f"{'command':<22} {'rc':>3} {'wall s':>7} {'RSS MB':>7} {'VmPTE kB':>9}")
        plan = "from ckpt.image import open_layer; from ckpt.restore.plan import make_plan; import sys\n"
        plan += "try: make_plan(open_layer(sys.argv[1]))\nexcept Exception: pass"
        l1, l2 = str(d / "layer-0001.ckpt"), str(d / "layer-0002.ckpt")
        cmds: list[tuple[str, list[str]]] = [
            ("dump", ["-m", "ckpt", "dump", "--pid", str(t.pid), "-D", str(d)]),
            (
                "dump --incremental",
                ["-m", "ckpt", "dump", "--incremental", "--pid", str(t.pid), "-D", str(d)],
            ),
            ("show", ["-m", "ckpt", "show", l2]),
            ("verify", ["-m", "ckpt", "verify", l2]),
            ("read", ["-m", "ckpt", "read", l2, "--addr", hex(base), "--size", "16"]),
            ("diff", ["-m", "ckpt", "diff", l1, l2]),
            ("merge", ["-m", "ckpt", "merge", l2, "-o", str(d / "merged.ckpt")]),
            ("restore planning", ["-c", plan, l2]),
        ]
        for name, argv in cmds:
            if name == "dump --incremental":
                for c in ("write 5 3", "write 300000 4", "drop 1000 1"):
                    t.cmd(c)
            rc, wall, rss = run(argv)
            print(f"{name:<22} {rc:>3} {wall:>7.2f} {rss:>7} {vmpte(t.pid):>9}")
    finally:
        t.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, nargs="+", default=[64, 16384])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for g in a.gib:
            one(g, Path(tmp))


if __name__ == "__main__":
    main()
