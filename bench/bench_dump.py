"""Dump benchmarks: ckpt beside the bare pipeline, measured in the same run on the same target.

    python bench/bench_dump.py [--sizes 1,256,1024] [--repeat 3] [--level -1] [--incremental] [--markdown]
                               [--service]

Full dumps (issue 2, issue 9): for each size, a target with 1/4 zero pages, 1/4 random, 1/2 text, and
  - bare read: PAGEMAP_SCAN + process_vm_readv of the same pages into a pre-faulted buffer
  - bare read + zstd at ckpt's level (1 MiB chunks, 2 threads) + file write + fsync
  - ckpt dump (a separate process of the installed `ckpt` program, as a user runs it: ckpt_program):
    wall time of the command (Python's start and imports included), its own elapsed and freeze
    clocks, CPU seconds (user + system, all threads: steadier than wall on a shared machine),
    dumper peak RSS, layer size
  - with --service, the same dump through a `ckpt service` of this tree (CKPT_SERVICE), alternated
    with the in-process one: its wall (the client's start included) and clocks
  - CRIU 4.2 `dump --leave-running`: figures quoted from issue 9 / ../shared/PERF-NOTES.md (CRIU
    does not run on this kernel from Debian's package), not measured here
Incremental dumps (issue 3, --incremental): a 1 GiB target with 1%, 10%, 50% of its pages written
between dumps, for each tracker this kernel has, beside the full dump.
Medians of --repeat runs. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard

if TYPE_CHECKING:
    from bench_service import Service

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ckpt's bytecode, as an installed package has it (PYTHONDONTWRITEBYTECODE would leave every
# command compiling its modules from source, which no user's install does).
subprocess.run(
    [sys.executable, "-m", "compileall", "-q", str(ROOT / "ckpt")], check=True, capture_output=True
)

from ckpt.memory import PageBuffer, present_pages, read_pages  # noqa: E402
from ckpt.proc import read_maps  # noqa: E402
from ckpt.track import available  # noqa: E402
from ckpt.track.base import tracked_vmas  # noqa: E402
from tests.util import LineChannel, build_c  # noqa: E402

PAGE = 4096


def ckpt_program() -> list[str]:
    """The command a user runs: the venv's installed `ckpt` program (the interpreter line with `-S`
    that scripts/setup.sh gives it), which imports the tree PYTHONPATH names; `python -m ckpt` where
    there is none. (`python -m ckpt` imports `site` and runpy first: ~35 ms more of each command's
    wall here, measured through a service, which is not a user's.)"""
    prog = Path(sys.executable).parent / "ckpt"
    return [str(prog)] if prog.exists() else [sys.executable, "-m", "ckpt"]


def build_target() -> Path:
    """bench/bigtarget.c built once per content (tests/util.build_c: not taken for another tree's)."""
    return build_c("bigtarget", ["-O2"], where=ROOT / "bench")


class Target:
    def __init__(self, mib: int) -> None:
        self.p = subprocess.Popen(
            [str(build_target()), str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.pid = self.p.pid
        self.chan = LineChannel(self.p, 120)
        line = self.chan.readline()
        assert line.startswith("ready"), line

    def write(self, permille: int, seed: int) -> int:
        return int(self.chan.cmd(f"write {permille} {seed}").split()[1])

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


# CRIU 4.2 on the same kind of target, same machine, quoted (wall s, frozen ms); None: not measured.
CRIU_DUMP: dict[int, tuple[str, str]] = {
    1: ("0.065", "-"),
    256: ("0.29-0.45", "240-400"),
    1024: ("4.8", "4670"),
}


def bare(pid: int, outdir: Path, level: int) -> dict[str, float]:
    """The pipeline with nothing of ckpt's: find, read, compress in 2 threads, write, fsync."""
    vmas = tracked_vmas(read_maps(pid))
    pages = present_pages(pid, vmas)
    b0 = time.process_time()
    buf = PageBuffer(len(pages) + 1024)  # pre-faulted (with slack), as ckpt does before its freeze
    buf_cpu = time.process_time() - b0  # (outside the pipeline's clock; reported apart)
    c0 = time.process_time()
    t0 = time.perf_counter()
    pages = present_pages(pid, vmas)
    rr = read_pages(pid, pages, buf)
    t_read = time.perf_counter() - t0
    chunk = 256 * PAGE
    mv = buf.view[: rr.nbytes]

    def comp(i: int) -> bytes:
        return zstandard.ZstdCompressor(level=level).compress(mv[i : i + chunk])

    path = outdir / "bare.out"
    with ThreadPoolExecutor(2) as ex, open(path, "wb") as f:
        for blob in ex.map(comp, range(0, rr.nbytes, chunk)):
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    t_all = time.perf_counter() - t0
    cpu = time.process_time() - c0
    size = path.stat().st_size
    path.unlink()
    buf.close()
    return {
        "read_s": t_read,
        "all_s": t_all,
        "cpu_s": cpu,
        "buf_cpu_s": buf_cpu,
        "bytes": rr.nbytes,
        "out_bytes": size,
    }


def ckpt_dump_isolated(pid: int, d: Path, *args: str, svc: Service | None = None) -> dict[str, float]:
    """Run the dump through a wrapper whose own children's maxrss is only that dump's. ``svc``:
    through that `ckpt service` (CKPT_SERVICE, its environment, and its log's word that it ran the
    dump): its CPU and memory are then the service's child's, which the wrapper does not see (only
    the client's few ms)."""
    code = (
        "import json, resource, subprocess, sys, time\n"
        "t0 = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True)\n"
        "wall = time.perf_counter() - t0\n"
        "if p.returncode: sys.stderr.write(p.stderr.decode()); sys.exit(1)\n"
        "r = json.loads(p.stdout)\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "r['maxrss_mb'] = ru.ru_maxrss / 1024\n"
        "r['cpu_s'] = ru.ru_utime + ru.ru_stime\n"
        "r['wall_s'] = wall\n"
        "print(json.dumps(r))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("CKPT_SERVICE", None)
    if svc is not None:
        env = dict(svc.env, CKPT_SERVICE=str(svc.sock))
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            *ckpt_program(),
            "dump",
            "--pid",
            str(pid),
            "-D",
            str(d),
            "--json",
            *args,
        ],
        capture_output=True,
        env=env,
        text=True,
    )
    if p.returncode:
        raise RuntimeError(f"ckpt dump failed: {p.stderr}")
    if svc is not None and (got := svc.outcome()).get("outcome") != "ran":
        raise RuntimeError(f"the service did not run the dump: {got}")
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def full_rows(
    sizes: list[int],
    repeat: int,
    work: Path,
    level: int,
    max_buffer: str | None = None,
    svc: Service | None = None,
) -> list[list[str]]:
    rows = []
    for mib in sizes:
        t = Target(mib)
        try:
            bares = [bare(t.pid, work, level) for _ in range(repeat)]
            dumps = []
            served = []
            for i in range(repeat):  # (in-process and served dumps alternated)
                d = work / f"full-{mib}-{i}"
                dumps.append(ckpt_dump_isolated(t.pid, d, "--track", "none", "--level", str(level)))
                shutil.rmtree(d)
                if svc is not None:
                    args = ("--track", "none", "--level", str(level))
                    served.append(ckpt_dump_isolated(t.pid, d, *args, svc=svc))
                    shutil.rmtree(d)
            mb = bares[0]["bytes"] / 1e6
            br, ba = med([b["read_s"] for b in bares]), med([b["all_s"] for b in bares])
            bcpu = med([b["cpu_s"] for b in bares])
            fz = med([r["freeze_ms"] for r in dumps]) / 1e3
            tot = med([r["elapsed_ms"] for r in dumps]) / 1e3
            wall = med([r["wall_s"] for r in dumps])
            cpu = med([r["cpu_s"] for r in dumps])
            size = f"{mib} MiB"
            rows.append(
                [
                    size,
                    "bare read (process_vm_readv)",
                    f"{br * 1e3:.0f}",
                    "-",
                    f"{br * 1e3:.0f}",
                    "-",
                    f"{mb / br:.0f}",
                    "-",
                    "-",
                ]
            )
            rows.append(
                [
                    size,
                    f"bare read + zstd {level} + write",
                    f"{br * 1e3:.0f}",
                    "-",
                    f"{ba * 1e3:.0f}",
                    f"{bcpu:.2f}",
                    f"{mb / ba:.0f}",
                    "-",
                    f"{bares[0]['out_bytes'] / 1e6:.1f}",
                ]
            )
            # The same pipeline with its buffer's fault-in counted (ckpt faults its own in beside
            # its imports, and that CPU is in ckpt's row): the buffer's cost varies with the guest
            # (fresh memory the host backs lazily), so it is measured each time, not assumed.
            bbuf = med([b["buf_cpu_s"] for b in bares])
            rows.append(
                [
                    size,
                    f"bare read + zstd {level} + write, buffer fault-in counted",
                    "-",
                    "-",
                    "-",
                    f"{bcpu + bbuf:.2f}",
                    "",
                    "-",
                    "",
                ]
            )
            rows.append(
                [
                    size,
                    "ckpt dump",
                    f"{fz * 1e3:.0f}",
                    f"{wall * 1e3:.0f}",
                    f"{tot * 1e3:.0f}",
                    f"{cpu:.2f}",
                    f"{mb / tot:.0f}",
                    f"{med([r['maxrss_mb'] for r in dumps]):.0f}",
                    f"{dumps[0]['bytes_written'] / 1e6:.1f}",
                ]
            )
            rows.append(
                [
                    size,
                    "ratio ckpt / bare",
                    f"{fz / br:.2f}x",
                    f"{wall / ba:.2f}x",
                    f"{tot / ba:.2f}x",
                    f"{cpu / bcpu:.2f}x",
                    "",
                    "",
                    "",
                ]
            )
            counted = f"{cpu / (bcpu + bbuf):.2f}x"
            rows.append([size, "ratio ckpt / bare, buffer fault-in counted", "", "", "", counted, "", "", ""])
            if served:
                sfz = med([r["freeze_ms"] for r in served]) / 1e3
                stot = med([r["elapsed_ms"] for r in served]) / 1e3
                swall = med([r["wall_s"] for r in served])
                rows.append(
                    [
                        size,
                        "ckpt dump through `ckpt service` (CPU, RSS: the service's child's, not counted)",
                        f"{sfz * 1e3:.0f}",
                        f"{swall * 1e3:.0f}",
                        f"{stot * 1e3:.0f}",
                        "-",
                        f"{mb / stot:.0f}",
                        "-",
                        f"{served[0]['bytes_written'] / 1e6:.1f}",
                    ]
                )
                ratios = [f"{sfz / br:.2f}x", f"{swall / ba:.2f}x", f"{stot / ba:.2f}x"]
                rows.append([size, "ratio served / bare", *ratios, "", "", "", ""])
            if max_buffer:
                # The memory/freeze trade-off: a buffer smaller than the copy streams while frozen.
                bounded = []
                for i in range(repeat):
                    d = work / f"bounded-{mib}-{i}"
                    bounded.append(
                        ckpt_dump_isolated(
                            t.pid, d, "--track", "none", "--level", str(level), "--max-buffer", max_buffer
                        )
                    )
                    shutil.rmtree(d)
                btot = med([r["elapsed_ms"] for r in bounded]) / 1e3
                rows.append(
                    [
                        size,
                        f"ckpt dump --max-buffer {max_buffer}",
                        f"{med([r['freeze_ms'] for r in bounded]):.0f}",
                        f"{med([r['wall_s'] for r in bounded]) * 1e3:.0f}",
                        f"{btot * 1e3:.0f}",
                        f"{med([r['cpu_s'] for r in bounded]):.2f}",
                        f"{mb / btot:.0f}",
                        f"{med([r['maxrss_mb'] for r in bounded]):.0f}",
                        f"{bounded[0]['bytes_written'] / 1e6:.1f}",
                    ]
                )
            crw, crf = CRIU_DUMP.get(mib, ("-", "-"))
            rows.append([size, "CRIU 4.2, quoted (raw pages)", crf, f"{crw} s", "-", "-", "", "", ""])
        finally:
            t.close()
    return rows


def incremental_rows(mib: int, repeat: int, work: Path) -> list[list[str]]:
    rows = []
    trackers = [n for n in ("soft-dirty", "uffd-wp", "hash") if available()[n][0]]
    for trk in trackers:
        res: dict[str, list[dict[str, float]]] = {}
        for i in range(repeat):
            t = Target(mib)
            try:
                d = work / f"inc-{trk}-{i}"
                res.setdefault("full", []).append(ckpt_dump_isolated(t.pid, d, "--track", trk))
                for pm in (10, 100, 500):
                    t.write(pm, 1000 + pm + i)
                    res.setdefault(f"{pm / 10:g}%", []).append(ckpt_dump_isolated(t.pid, d, "--incremental"))
                shutil.rmtree(d)
            finally:
                t.close()
        full_w = med([r["bytes_written"] for r in res["full"]])
        for k, rs in res.items():
            w = med([r["bytes_written"] for r in rs])
            rows.append(
                [
                    trk,
                    "full dump" if k == "full" else f"{k} written",
                    f"{med([r['freeze_ms'] for r in rs]):.1f}",
                    f"{med([r['elapsed_ms'] for r in rs]):.0f}",
                    f"{med([r['pages_dumped'] for r in rs]):.0f}",
                    f"{w / 1e6:.1f}",
                    f"{100 * w / full_w:.1f}%",
                    f"{med([r['maxrss_mb'] for r in rs]):.0f}",
                ]
            )
    return rows


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30
    py = platform.python_version()
    return f"{os.cpu_count()} vCPU {cpu}, {mem:.0f} GiB, Linux {platform.release()}, Python {py}"


def table(title: str, cols: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print(f"\n### {title}\n")
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,256,1024", help="MiB, comma-separated")
    ap.add_argument("--level", type=int, default=-1, help="zstd level for ckpt and the bare pipeline")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--incremental", action="store_true", help="also the incremental table (1 GiB)")
    ap.add_argument("--inc-size", type=int, default=1024)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--max-buffer", help="also a row with `ckpt dump --max-buffer SIZE` (memory vs freeze)")
    ap.add_argument(
        "--service", action="store_true", help="also each dump through a `ckpt service` of this tree"
    )
    a = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir=os.environ.get("CKPT_BENCH_DIR")) as w:
        work = Path(w)
        svc = None
        if a.service:
            from bench_service import Service as Started  # (it imports this module: not at the top)

            svc = Started(work)
        try:
            sizes = [int(x) for x in a.sizes.split(",")]
            rows = full_rows(sizes, a.repeat, work, a.level, a.max_buffer, svc)
        finally:
            if svc is not None:
                svc.close()
        table(
            "full dump (medians)",
            [
                "target",
                "pipeline",
                "freeze ms",
                "wall ms",
                "elapsed ms",
                "CPU s",
                "MB/s",
                "peak RSS MB",
                "output MB",
            ],
            rows,
            a.markdown,
        )
        if a.incremental:
            rows = incremental_rows(a.inc_size, a.repeat, work)
            table(
                f"incremental dumps of a {a.inc_size} MiB target (medians)",
                [
                    "tracker",
                    "between dumps",
                    "freeze ms",
                    "total ms",
                    "pages stored",
                    "MB written",
                    "of full",
                    "peak RSS MB",
                ],
                rows,
                a.markdown,
            )


if __name__ == "__main__":
    main()
