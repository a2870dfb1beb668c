"""Shared objects (issue 12 (B) 4): what a memfd or a deleted file costs a dump and a restore.

    python bench/bench_objects.py [--sizes 16,64,256] [--repeat 3] [--markdown]

A Python target keeps one object of SIZE MiB (1/4 random, 1/2 text, 1/4 zero pages), open and
mapped MAP_SHARED: a memfd, or a deleted file in /tmp. `ckpt dump --kill --json` (its freeze: the
object is read while the process is frozen), then `ckpt restore --detach --json`. Reported: the
dump's freeze and total, the layer's size, the dump's and the restore's CPU seconds (user+system),
the restore's own total. Medians of --repeat runs. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.util import LineChannel  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
TARGET = textwrap.dedent(
    """
    import mmap, os, random, sys
    kind, mib, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    size = mib << 20
    if kind == "memfd":
        fd = os.memfd_create("bench")
    else:
        path = os.path.join(tmp, "ghost.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    rnd = random.Random(5)
    text = (b"the quick brown fox jumps over the lazy dog " * 100)[:4096]
    for p in range(size // 4096):
        k = p % 4
        if k == 0:
            m[p * 4096 : (p + 1) * 4096] = rnd.randbytes(4096)
        elif k in (1, 2):
            m[p * 4096 : (p + 1) * 4096] = text
    if kind == "ghost":
        os.unlink(path)
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(kind: str, mib: int, work: Path) -> dict[str, float]:
    d = work / f"{kind}-{mib}"
    tgt = subprocess.Popen(
        [sys.executable, "-c", TARGET, kind, str(mib), str(work)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ch = LineChannel(tgt, 120)
    assert ch.readline() == "ready"
    c0 = _cpu()
    out = subprocess.run(
        [sys.executable, "-m", "ckpt", "dump", "--pid", str(tgt.pid), "-D", str(d), "--json", "--kill",
         "--ghost-limit", "4G"],
        capture_output=True, text=True, env=ENV, check=True,
    )  # fmt: skip
    c1 = _cpu()
    tgt.wait(30)
    dumped = json.loads(out.stdout)
    r = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", dumped["layer"], "--detach", "--json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    so, se = r.communicate(timeout=300)
    c2 = _cpu()
    if r.returncode:
        raise RuntimeError(se.decode())
    rest = json.loads(so)
    os.kill(rest["pid"], signal.SIGKILL)
    for f in (tgt.stdin, tgt.stdout):
        if f:
            f.close()
    return {
        "freeze_ms": dumped["freeze_ms"],
        "dump_ms": dumped["elapsed_ms"],
        "layer_mib": os.path.getsize(dumped["layer"]) / 2**20,
        "dump_cpu_s": c1 - c0,
        "restore_ms": rest["timings_ms"]["total"],
        "restore_cpu_s": c2 - c1,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,64,256")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    cols = ["freeze_ms", "dump_ms", "layer_mib", "dump_cpu_s", "restore_ms", "restore_cpu_s"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-objects-") as tmp:
        for kind in ("memfd", "ghost"):
            for mib in (int(s) for s in a.sizes.split(",")):
                runs = []
                for i in range(a.repeat):
                    w = Path(tmp) / f"r{i}"
                    w.mkdir(exist_ok=True)
                    runs.append(run_once(kind, mib, w))
                rows.append([kind, str(mib)] + [f"{statistics.median(r[c] for r in runs):.3g}" for c in cols])
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    head = ["object", "MiB", *cols]
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        for r in [head, *rows]:
            print("  ".join(f"{x:>13}" for x in r))


if __name__ == "__main__":
    main()
