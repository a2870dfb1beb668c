"""User-space instructions of the dumper inside an idle incremental's freeze, phase by phase (callgrind).

    python bench/bench_freeze_instr.py [--base DIR] [--modes sigwait,nanosleep] [--n 6] [--threads 1,8]

Instruction counts do not depend on the machine's load, which CPU times and walls here do (2 vCPUs
shared by several sessions): they show a change in the Python inside the freeze. They leave out the
kernel's side (ptrace, /proc, the page-table walks) and the waits for the target's stops.

A target (bench/freezetarget.c, MODE, --threads threads, 8 MiB), one full dump (uffd-wp) and one
incremental not counted, then N incrementals of the same chain counted from Frozen.freeze() to the end of the
thaw. Collection is switched by callgrind client requests from a small C library compiled here
(valgrind's callgrind.h), and each phase's count is dumped at each step of `phases_ms` (on_lap):
"thaw" is the thaw itself, "end" what runs between the last phase and the thaw (pending signals,
the job-control stop, the liveness check). valgrind 3.19 has no userfaultfd(2) nor pidfd_open(2):
the tracker's availability probe is answered here (the userfaultfd is made by the target itself,
by an injected call), and the pipes' contents are not read (read_pipes returns none) in either tree.
Needs valgrind and its headers (Debian: valgrind). Not a test: nothing here asserts a count.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOGGLE_C = r"""
#include <valgrind/callgrind.h>
void cg_on(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void cg_off(void) { CALLGRIND_TOGGLE_COLLECT; }
void cg_dump(const char *s) { CALLGRIND_DUMP_STATS_AT(s); }
"""


def child(tree: str, mode: str, n: int, lib_path: str, threads: int = 1) -> None:
    """Runs under valgrind: the dumps of `tree`, counted."""
    sys.path.insert(0, tree)
    sys.path.insert(0, tree + "/bench")
    from ckpt.ptrace import sigchld

    with sigchld.blocked():
        import ckpt.dump as dumpmod
    import bench_freeze as bf

    import ckpt.track.select as select
    from ckpt.ptrace import Frozen
    from tests.util import LineChannel

    ok = (True, "")
    select.available = lambda: {"soft-dirty": (False, ""), "uffd-wp": ok, "hash": ok}  # type: ignore[assignment]
    dumpmod.read_pipes = lambda pid, fds: []  # type: ignore[assignment]
    lib = ctypes.CDLL(lib_path)
    lib.cg_dump.argtypes = [ctypes.c_char_p]
    state = {"want": False, "on": False}
    real_freeze, real_end, real_thaw = Frozen.freeze, Frozen._unblock_sigchld, Frozen.thaw

    def freeze(self: Any) -> None:
        if state["want"] and not state["on"]:
            state["on"] = True
            lib.cg_on()
        real_freeze(self)

    def thaw(self: Any, *a: Any, **k: Any) -> None:
        if state["on"]:
            lib.cg_dump(b"end")
        real_thaw(self, *a, **k)

    def end(self: Any) -> None:
        real_end(self)
        if state["on"]:
            lib.cg_dump(b"thaw")
            lib.cg_off()
            state["on"] = False

    Frozen.freeze, Frozen.thaw, Frozen._unblock_sigchld = freeze, thaw, end  # type: ignore[method-assign]

    def lap(name: str) -> None:
        if state["on"] and name != "frozen: thaw":
            lib.cg_dump(name.encode())

    exe = bf.build_target()
    p = subprocess.Popen(
        [str(exe), mode, str(threads), "8"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    try:
        assert LineChannel(p, 60).readline().startswith("ready")
        with tempfile.TemporaryDirectory(prefix="ckpt-bench-instr-") as d:
            dumpmod.dump(p.pid, d, track="uffd-wp")
            dumpmod.dump(p.pid, d, incremental=True, track="uffd-wp")
            state["want"] = True
            for _ in range(n):
                dumpmod.dump(p.pid, d, incremental=True, track="uffd-wp", on_lap=lap)
            state["want"] = False
    finally:
        p.kill()
        p.wait()


def measure(tree: str, mode: str, n: int, lib: str, tmp: str, threads: int = 1) -> dict[str, float]:
    """M instructions per freeze, by phase (and "total", "in freeze_ms": all but the thaw)."""
    out = f"{tmp}/cg-{abs(hash((tree, mode, threads)))}.out"
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no", "--dump-instr=no",
        f"--callgrind-out-file={out}", sys.executable, __file__, "--child", tree, mode, str(n), lib,
        str(threads),
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
    if p.returncode != 0:
        raise SystemExit(f"valgrind run of {tree} failed:\n{p.stderr[-2000:]}")
    tot: collections.Counter[str] = collections.Counter()
    for f in glob.glob(out + ".*"):
        t = Path(f).read_text()
        m = re.search(r"^desc: Trigger: Client Request: (.*)$", t, re.M)
        s = re.search(r"^(?:summary|totals): (\d+)", t, re.M)
        if m and s:
            tot[m.group(1)] += int(s.group(1))
        os.unlink(f)
    row = {k: v / n / 1e6 for k, v in tot.items()}
    row["total"] = sum(row.values())
    row["in freeze_ms"] = row["total"] - row.get("thaw", 0.0)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="another tree of ckpt, counted the same way")
    ap.add_argument("--modes", default="sigwait,nanosleep")
    ap.add_argument("--n", type=int, default=6, help="incremental freezes counted per target")
    ap.add_argument("--threads", default="1", help="thread counts of the target, comma-separated")
    a = ap.parse_args()
    trees = ([("base", a.base)] if a.base else []) + [("this", str(ROOT))]
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-instr-") as tmp:
        lib = f"{tmp}/toggle.so"
        Path(f"{tmp}/toggle.c").write_text(TOGGLE_C)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", lib, f"{tmp}/toggle.c"], check=True)
        modes = a.modes.split(",")
        nthr = [int(x) for x in a.threads.split(",")]
        rows = {
            (f"{m} {k}", name): measure(tree, m, a.n, lib, tmp, k)
            for m in modes
            for k in nthr
            for name, tree in trees
        }
    phases = sorted({k for r in rows.values() for k in r} - {"total", "in freeze_ms"})
    cols = ["total", "in freeze_ms", *phases]
    print(f"M user instructions per incremental freeze (callgrind, mean of {a.n}), 8 MiB idle")
    print("target: the mode its threads idle in, and their number")
    names = [c.replace("frozen: ", "").replace("collect: ", "c: ") for c in cols]
    print(f"{'target':12s} {'tree':5s} " + " ".join(f"{c:>12s}" for c in names))
    for (m, name), r in rows.items():
        print(f"{m:12s} {name:5s} " + " ".join(f"{r.get(c, 0.0):12.3f}" for c in cols))


if __name__ == "__main__":
    main()
