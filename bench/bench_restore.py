"""Restore benchmarks (issue 5): time to rebuild a process from a merged layer and from a 10-layer chain.

    python bench/bench_restore.py [--sizes 1,256,1024] [--repeat 3] [--layers 10] [--markdown]

For each size, tests/targets/rounds.c fills its region with the mixed data of the dump benchmarks
(1/4 random, 1/4 zero, 1/2 text), gets a full dump, then 9 x (one round: 1/7 of the pages touched,
incremental dump): a 10-layer chain; `ckpt merge` makes the merged layer of it. Each restore is
`ckpt restore --detach --json` in a separate process, as a user runs it; the process it builds
answers `sum` (its own checksum of its memory) through the pipes, which must be the dumped one.
Reported: wall time of the command (Python start included), ckpt's own total (from the check to
the running process), its check and page-filling parts, the command's CPU seconds (user + system,
steadier than wall on a shared machine), and the rate of the data pages written. CRIU 4.2's restore
wall time is quoted from issue 9 / ../shared/PERF-NOTES.md (CRIU does not run on this kernel from
Debian's package), not measured here.
Medians of --repeat runs. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ckpt's bytecode, as an installed package has it (PYTHONDONTWRITEBYTECODE would leave every
# command compiling its modules from source, which no user's install does).
subprocess.run(
    [sys.executable, "-m", "compileall", "-q", str(ROOT / "ckpt")], check=True, capture_output=True
)

from tests.util import LineChannel, build_c  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
PR_SET_CHILD_SUBREAPER = 36
CRIU_RESTORE = {1: "0.051", 256: "0.24", 1024: "0.9-2.2"}  # seconds, quoted


def ckpt(*args: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "ckpt", *args], capture_output=True, text=True, env=ENV, check=False
    )
    if p.returncode:
        raise RuntimeError(f"ckpt {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def make_chain(mib: int, work: Path, layers: int = 10) -> tuple[Path, Path, str]:
    """(top of a chain of `layers` layers, its merged layer, the checksum the restored process must
    report)."""
    exe = build_c("rounds")
    t = subprocess.Popen([str(exe), str(mib * 256)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    io = LineChannel(t, 300)
    try:
        assert io.readline().startswith("ready")
        assert io.cmd("mix") == "ok"
        chain = work / f"chain-{mib}"
        ckpt("dump", "--pid", str(t.pid), "-D", str(chain))
        for i in range(layers - 1):
            io.cmd("round")
            want = io.cmd("sum").split()[1]
            ckpt(
                "dump",
                "--pid",
                str(t.pid),
                "-D",
                str(chain),
                "--incremental",
                *(["--kill"] if i == layers - 2 else []),
            )
    finally:
        t.kill()
        t.wait()
    top = sorted(chain.glob("layer-*.ckpt"))[-1]
    merged = work / f"merged-{mib}.ckpt"
    ckpt("merge", str(top), "-o", str(merged))
    return top, merged, want


def restore_once(layer: Path, want: str) -> dict[str, float]:
    t0 = time.perf_counter()
    argv = [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach", "--json"]
    pipe = subprocess.PIPE
    p = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, env=ENV)
    io = LineChannel(p, 300)
    pid = 0
    try:
        out = json.loads(io.readline())
        wall = (time.perf_counter() - t0) * 1e3
        pid = out["pid"]
        got = io.cmd("sum").split()[1]
        if got != want:
            raise RuntimeError(f"restored process reports sum {got}, dumped {want}")
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        p.wait(60)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # ours: we are a subreaper
        if p.poll() is None:
            p.kill()
        p.wait()
    tm = out["timings_ms"]
    return {
        "wall": wall,
        "total": tm["total"],
        "check": tm["check"],
        "fill": tm["fill"],
        "cpu": cpu,
        "pages": out["pages_written"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,256,1024", help="MiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--layers", type=int, default=10, help="layers of the chain (a long job's: 50, 200)")
    a = ap.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-restore-"))
    rows: list[tuple[str, ...]] = []
    try:
        for mib in (int(x) for x in a.sizes.split(",")):
            top, merged, want = make_chain(mib, work, a.layers)
            sources = (("merged layer", merged, 1), (f"{a.layers}-layer chain", top, a.layers))
            for name, layer, layers in sources:
                runs = [restore_once(layer, want) for _ in range(a.repeat)]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rate = med["pages"] * 4096 / (med["fill"] / 1e3) / 1e9 if med["fill"] else 0.0
                rows.append(
                    (
                        f"{mib} MiB",
                        name,
                        str(layers),
                        f"{med['wall']:.0f}",
                        f"{med['total']:.0f}",
                        f"{med['check']:.0f}",
                        f"{med['fill']:.0f}",
                        f"{med['cpu']:.2f}",
                        str(int(med["pages"])),
                        f"{rate:.2f}",
                        CRIU_RESTORE.get(mib, "-") if layers == 1 else "-",
                    )
                )
            shutil.rmtree(top.parent)
            merged.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = ("size", "source", "layers", "wall ms", "restore ms", "check ms", "fill ms", "CPU s",
            "pages written", "fill GB/s", "CRIU 4.2 wall s (quoted)")  # fmt: skip
    print(
        f"# ckpt restore, {platform.node()} ({os.cpu_count()} CPUs), Linux {platform.release()}, "
        f"median of {a.repeat}"
    )
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print("  ".join(f"{h:>14}" for h in head))
    for cells in rows:
        print("| " + " | ".join(cells) + " |" if a.markdown else "  ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
