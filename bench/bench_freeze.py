"""How long a dump holds its target frozen, phase by phase (issue 9, part 2).

    python bench/bench_freeze.py [--modes sigwait,nanosleep,read,busy] [--threads 1,8] [--mib 8]
                                 [--repeat 7] [--track uffd-wp] [--markdown]

For each target (bench/freezetarget.c: every thread idle in sigwaitinfo, clock_nanosleep or read(),
or busy writing a few pages in a loop; MIB MiB of random data) and each thread count: a full dump
(arming the tracker) and an incremental dump on top of it, in this process through the API, so
Python's start is not counted. A fresh target for each run (a full dump of an armed target would
find its mappings held by the earlier chain's userfaultfd). Prints the median freeze and the median
of each frozen phase of `phases_ms`. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:
    from ckpt.ptrace import sigchld

    with sigchld.blocked():  # as the CLI does: numpy's OpenBLAS thread must not take SIGCHLD
        from ckpt.dump import dump
except ImportError:  # an older ckpt, for a "before" figure
    from ckpt.dump import dump
from ckpt import sysno as nr  # noqa: E402
from ckpt.ptrace import Frozen  # noqa: E402
from tests.util import LineChannel  # noqa: E402

PHASES = ("frozen: seize", "frozen: track", "frozen: collect", "frozen: copy", "frozen: thaw")


def build_target() -> Path:
    src = ROOT / "bench" / "freezetarget.c"
    out = Path(tempfile.gettempdir()) / "ckpt-bench-freezetarget"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-pthread", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def one_run(exe: Path, mode: str, threads: int, mib: int, track: str) -> list[dict[str, float]]:
    """A full dump then an incremental one of a fresh target; the freeze and phases of each."""
    p = subprocess.Popen(
        [str(exe), mode, str(threads), str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    try:
        line = LineChannel(p, 60).readline()
        assert line.startswith("ready"), line
        out = []
        with tempfile.TemporaryDirectory(prefix="ckpt-bench-freeze-") as d:
            for incremental in (False, True):
                r = dump(p.pid, d, incremental=incremental, track=track)
                row = {k: v for k, v in r.phases_ms.items() if k.startswith("frozen")}
                row["freeze"] = r.freeze_ms
                row["dirty"] = r.pages_dirty
                out.append(row)
        return out
    finally:
        p.kill()
        p.wait()


def inject_latency(exe: Path, n: int, foreign: bool) -> list[float]:
    """ms per injected getpid() in a frozen idle target, one after another. ``foreign``: a thread
    of this process that ckpt did not start, with SIGCHLD unblocked, idles meanwhile (a program
    using the API; before the fix, ckpt's own compression pool and numpy's OpenBLAS thread)."""
    p = subprocess.Popen([str(exe), "sigwait", "1", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    stop = threading.Event()
    th = threading.Thread(target=stop.wait)
    if foreign:
        th.start()
    try:
        assert LineChannel(p, 60).readline().startswith("ready")
        out = []
        with Frozen(p.pid) as f:
            for _ in range(n):
                t0 = time.perf_counter()
                f.syscall(nr.GETPID)
                out.append((time.perf_counter() - t0) * 1e3)
        return out
    finally:
        stop.set()
        if foreign:
            th.join()
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="sigwait,nanosleep,read,busy")
    ap.add_argument("--threads", default="1,8")
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--track", default="uffd-wp")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--inject", type=int, default=300, help="injected syscalls per latency row (0: none)")
    a = ap.parse_args()
    exe = build_target()
    if a.inject:
        print(f"one injected getpid() in a frozen idle target, ms over {a.inject} calls")
        print("  another thread with SIGCHLD unblocked   median     p90     max  >=20ms")
        for foreign in (False, True):
            lat = sorted(inject_latency(exe, a.inject, foreign))
            print(
                f"  {'yes' if foreign else 'no':<38}{statistics.median(lat):7.3f} "
                f"{lat[int(len(lat) * 0.9)]:7.3f} {lat[-1]:7.1f} {sum(x >= 20 for x in lat):7d}"
            )
        print()
    cols = ["target", "thr", "dump", "dirty", "freeze", *(ph.split(": ")[1] for ph in PHASES)]
    rows: list[list[str]] = []
    for mode in a.modes.split(","):
        for nt in (int(x) for x in a.threads.split(",")):
            runs = [one_run(exe, mode, nt, a.mib, a.track) for _ in range(a.repeat)]
            for i, kind in enumerate(("full", "incr")):
                med = {
                    k: statistics.median(r[i].get(k, 0.0) for r in runs) for k in ("freeze", "dirty", *PHASES)
                }
                rows.append(
                    [
                        f"{mode} {a.mib}MiB",
                        str(nt),
                        kind,
                        f"{med['dirty']:.0f}",
                        f"{med['freeze']:.1f}",
                        *(f"{med[ph]:.1f}" for ph in PHASES),
                    ]
                )
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"freeze and frozen phases in ms, median of {a.repeat} runs, tracker {a.track}")
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    if a.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
