"""What `--pidns` costs a restore (issue 12 B3): the same tree dump restored with and without it.

    python bench/bench_pidns.py [--children 1,4,16] [--repeat 3] [--markdown]

The tree is bench_tree.py's (`sh -c` starting N `sleep`s and waiting: N + 1 processes), dumped once
with --kill; then `ckpt restore --detach --json` of that dump, alternately plain and with `--pidns`
(a launcher helper, the namespace's init, its fds and pidfd, the root forked from it, the init's
start; the rest as plain). Reported per mode: the command's wall time, ckpt's own tree total and
the command's CPU seconds (user + system), medians of --repeat runs. Not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tree import PR_SET_CHILD_SUBREAPER, _ckpt, _kill_all, _reap_all, print_table


def _restore(d: str, pidns: bool) -> dict[str, float]:
    got, wall, cpu = _ckpt("restore", d, "--detach", "--json", *(["--pidns"] if pidns else []))
    init = got.get("init_pid")
    if isinstance(init, int):
        os.kill(init, signal.SIGKILL)  # and the namespace with it
        os.waitpid(init, 0)
    else:
        _kill_all([m["pid"] for m in got["tree"]])  # type: ignore[attr-defined]
    return {"wall_ms": wall * 1e3, "tree_ms": float(got["timings_ms"]["tree_total"]), "cpu_s": cpu}  # type: ignore[index]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--children", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    rows = []
    for n in (int(x) for x in a.children.split(",")):
        script = f"i=0; while [ $i -lt {n} ]; do sleep 1000 & i=$((i+1)); done; echo ready; wait"
        sh = subprocess.Popen(
            ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert sh.stdout is not None and sh.stdout.readline() == b"ready\n"
        with tempfile.TemporaryDirectory() as d:
            _ckpt("dump", "--pid", str(sh.pid), "-D", d, "--kill", "--json")
            sh.wait()
            _reap_all()
            runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for _ in range(a.repeat):
                for mode in (False, True):
                    runs[mode].append(_restore(d, mode))
        for mode in (False, True):
            med = {c: statistics.median(r[c] for r in runs[mode]) for c in ("wall_ms", "tree_ms", "cpu_s")}
            figures = [f"{med['wall_ms']:.1f}", f"{med['tree_ms']:.1f}", f"{med['cpu_s']:.3f}"]
            rows.append([str(n + 1), "--pidns" if mode else "plain", *figures])
    print_table(["processes", "mode", "wall_ms", "tree_total_ms", "cpu_s"], rows, a.markdown)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
