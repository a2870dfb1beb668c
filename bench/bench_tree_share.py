"""Shared memory of a process tree stored once (issue 12 B4, ckpt/treeshare.py): layer bytes of a
multiprocessing.Pool-like tree whose parent mapped a large shared region before forking its workers.

    python bench/bench_tree_share.py [--mib 64] [--workers 4] [--kind anon,memfd,shmfile] [--repeat 3]
                                     [--checkout /work/main] [--markdown]

The target: python, `--mib` MiB of incompressible bytes (os.urandom) in shared memory (`anon`: an
mmap(-1) MAP_SHARED|MAP_ANONYMOUS region; `memfd`: a memfd mapped shared, fd kept; `shmfile`: a
/dev/shm file mapped shared, left in place while the tree runs), then a
`multiprocessing.Pool(--workers)` (fork) that ran one `map`: every worker maps the region too.
Each run: one full `ckpt dump --json` of the tree (the tree left running), the bytes of every
layer file under the directory (the root's and each member's), the dump's wall and CPU seconds
(user + system of the ckpt process). `--checkout DIR` runs the same with the ckpt of another
checkout (e.g. main, which stores the region in every holder's layer) for the comparison.
Medians of --repeat runs. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TARGET = """
import mmap, multiprocessing as mp, os, sys
kind, mib, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = mib << 20
if kind == "anon":
    m = mmap.mmap(-1, size)
else:
    if kind == "memfd":
        fd = os.memfd_create("bench-shared")
    else:  # shmfile: POSIX shared memory, removed again at once (the mapping keeps it)
        path = f"/dev/shm/ckpt-bench-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    if kind == "shmfile":
        os.close(fd)
for off in range(0, size, 1 << 20):
    m[off : off + (1 << 20)] = os.urandom(1 << 20)
mp.set_start_method("fork")
p = mp.Pool(n)
print("ready", *p.map(abs, range(-n, 0)), flush=True)
sys.stdin.read()
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one(checkout: Path, kind: str, mib: int, n: int) -> dict[str, float]:
    py = subprocess.Popen(
        [sys.executable, "-c", TARGET, kind, str(mib), str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert py.stdout is not None
        assert py.stdout.readline().startswith(b"ready")
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, PYTHONPATH=str(checkout), NO_COLOR="1")
            c0, t0 = _cpu(), time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "ckpt", "dump", "--pid", str(py.pid), "-D", d, "--json"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=checkout,
            )  # fmt: skip
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
            files = list(Path(d).rglob("*.ckpt"))
            root = sum(f.stat().st_size for f in files if f.parent == Path(d))
            total = sum(f.stat().st_size for f in files)
        return {"total": total / 2**20, "root": root / 2**20, "members": (total - root) / 2**20,
                "wall": wall, "cpu": cpu}  # fmt: skip
    finally:
        py.kill()
        py.wait()
        Path(f"/dev/shm/ckpt-bench-{py.pid}").unlink(missing_ok=True)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--kind", default="anon,memfd,shmfile")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--checkout", type=Path, action="append", default=[])
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    # The workers outlive the killed parent for a moment: ours to reap, not init's.
    import ctypes

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    cols = ("ckpt", "kind", "MiB shared", "processes", "layers MiB", "root MiB", "members MiB", "dump wall s",
            "dump CPU s")  # fmt: skip
    rows = []
    for checkout in [ROOT, *a.checkout]:
        for kind in a.kind.split(","):
            runs = [one(checkout, kind, a.mib, a.workers) for _ in range(a.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            name = "this" if checkout == ROOT else str(checkout)
            rows.append((name, kind, a.mib, a.workers + 1, f"{med['total']:.1f}", f"{med['root']:.1f}",
                         f"{med['members']:.1f}", f"{med['wall']:.2f}", f"{med['cpu']:.2f}"))  # fmt: skip
    if a.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(map(str, r)) + " |")
    else:
        w = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=True)]
        for r in [cols, *rows]:
            print("  ".join(str(x).rjust(n) for x, n in zip(r, w, strict=True)))


if __name__ == "__main__":
    main()
