"""Small processes (issue 9 part 3): wall time of one `ckpt` command on a ~1 MiB process, start-up included.

    python bench/bench_small.py [--repeat 15] [--entry script|module] [--src DIR] [--markdown] [--imports]
                                 [--only dump,uffd,incremental,restore,show]
    python bench/bench_small.py --instructions [--breakdown] [--src DIR]

A 1 MiB target (tests/targets/rounds.c, 256 pages of the benchmarks' mixed data) and, per command,
--repeat runs in separate processes, as a user runs them:
  - dump: `ckpt dump --pid P -D NEW --track none` (a fresh directory each time; no tracking armed)
  - dump (uffd-wp): a full dump with the default tracker (a fresh target each time, so that no
    tracking of an earlier chain piles up in it)
  - incremental: `ckpt dump --incremental` on top of that chain, after one round of writes
  - restore: `ckpt restore --detach` of a layer of a killed target; the restored process must
    answer with the dumped checksum
  - show: `ckpt show LAYER`
Reported (medians): wall time of the command (Python's start, imports and exit included), its CPU
seconds (user + system), ckpt's own clock (`elapsed_ms` of a dump, `timings_ms.total` of a restore,
else -), and the import time: the sum of the top-level imports that `python -X importtime` reports in
a separate run of the same command, with numpy's share. --entry: the venv's console script
(`ckpt`, default) or `python -m ckpt`. --src: another ckpt tree to run instead of this one
(`git archive main | tar -x -C DIR`; with --entry module), for a before/after on the same machine.
--imports: the 25 largest imports of each command. --instructions: instead of all that, the
instructions (valgrind's callgrind, `I refs`) of the start of a dump and of a restore: the imports,
the argument parsing and the exit (a whole command cannot run under valgrind, which lacks
pidfd_open); the same count on every run, whatever the load. --breakdown: where the start goes,
step by step.
CRIU 4.2 (quoted from issue 9, not measured here): dump 0.065 s, restore 0.051 s.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Every command runs in the directory of the tree it runs (ENV's PYTHONPATH): `python -m` and `-c`
# put the working directory first on sys.path.
# ckpt's bytecode, as an installed package has it (PYTHONDONTWRITEBYTECODE would leave every
# command compiling its modules from source, which no user's install does).
subprocess.run(
    [sys.executable, "-m", "compileall", "-q", str(ROOT / "ckpt")], check=True, capture_output=True
)


def build_caches(src: Path) -> None:
    """The bytecode of the records' methods, as scripts/setup.sh builds it (ckpt/codecache.py), for
    a tree that has the cache."""
    if (src / "ckpt" / "codecache.py").exists():
        subprocess.run([sys.executable, "-c", "from ckpt import codecache; codecache.build()"], check=True,
                       capture_output=True, cwd=src, env=dict(os.environ, PYTHONPATH=str(src)))  # fmt: skip


build_caches(ROOT)

from tests.util import LineChannel, Target, build_c  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
ENV.pop("PYTHONDONTWRITEBYTECODE", None)
PR_SET_CHILD_SUBREAPER = 36
NPAGES = 256
CRIU = {"dump": "0.065", "restore": "0.051"}  # seconds, quoted from issue 9
IMPORT_RUNS = 3
# A command's start without the command: what `ckpt dump` of a process without children and
# `ckpt restore` import, the parser, and the exit the entry point takes (cli.run's, where it exists).
START = """
import os, sys
import ckpt.cli
what, stop = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
if stop == "cli":
    os._exit(0)
ckpt.cli.build_parser().parse_args(["dump", "--pid", "1", "-D", "d"] if what == "dump" else ["restore", "l"])
if stop == "parse":
    os._exit(0)
import contextlib
with getattr(ckpt.cli, "_collector_paused", contextlib.nullcontext)():  # as cmd_dump, cmd_restore
    if what == "dump":
        import ckpt.api, ckpt.prefault, ckpt.image, ckpt.dump, ckpt.proc.tree
        if not hasattr(ckpt.cli, "run"):
            import ckpt.dumptree  # before: api.dump imported it for every dump
    else:
        import ckpt.api, ckpt.restore.pipes, ckpt.image, ckpt.restore.run, ckpt.restore.restorer
if hasattr(ckpt.cli, "run"):
    ckpt.cli._exit(0)
"""
_IMPORT = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def entry(kind: str) -> list[str]:
    if kind == "script":
        from bench_dump import ckpt_program  # (the installed program, as the other benches run it)

        return ckpt_program()
    return [sys.executable, "-m", "ckpt"]


class Run:
    """One command: its wall and CPU time, and its output."""

    def __init__(self, argv: list[str], keep: Callable[[subprocess.Popen[bytes], LineChannel], str] | None):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        pipe = subprocess.PIPE
        p = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, env=ENV, cwd=ENV["PYTHONPATH"])
        io = LineChannel(p, 120)
        if keep is None:
            out, err = p.communicate(timeout=120)
            self.wall = (time.perf_counter() - t0) * 1e3
            if p.returncode:
                raise RuntimeError(f"{' '.join(argv)}: {err.decode().strip()}")
            self.out = out.decode()
        else:
            # restore --detach: the first line comes once the process runs; the command then
            # waits for its child's pipes to be left alone by it, so the wall ends at that line.
            first = io.readline()
            self.wall = (time.perf_counter() - t0) * 1e3
            self.out = first
            keep(p, io)
            p.wait(60)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) * 1e3


def import_times(argv: list[str], cleanup: Callable[[], None]) -> tuple[float, float, dict[str, int]]:
    """(total import ms, numpy's ms, {module: cumulative us}) of one run under -X importtime."""
    pre = [sys.executable, "-X", "importtime"]
    if argv[0] != sys.executable:
        pre += [argv[0]]  # the console script, run by the same interpreter
        argv = argv[1:]
    else:
        argv = argv[1:]
    p = subprocess.run(
        pre + argv, capture_output=True, env=ENV, cwd=ENV["PYTHONPATH"], timeout=120, stdin=subprocess.DEVNULL
    )
    cleanup()
    total = numpy = 0
    cum: dict[str, int] = {}
    for line in p.stderr.decode(errors="replace").splitlines():
        m = _IMPORT.match(line)
        if not m:
            continue
        name = m.group(4)
        cum[name] = int(m.group(2))
        if len(m.group(3)) == 1:  # a top-level import
            total += int(m.group(2))
        if name == "numpy":
            numpy = int(m.group(2))
    return total / 1e3, numpy / 1e3, cum


def instructions(what: str, stop: str = "", argv: tuple[str, ...] = ()) -> int:
    """callgrind's instruction count of START for `what` (dump or restore), up to `stop` (cli: the
    import of ckpt.cli; parse: the parser too); or of `python ARGV` if given."""
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", sys.executable,
             *(argv or ("-c", START, what, stop))],
            capture_output=True, text=True, env=dict(ENV, OPENBLAS_NUM_THREADS="1"), timeout=900,
            cwd=ENV["PYTHONPATH"],
        )  # fmt: skip
    m = re.search(r"I\s+refs:\s+([\d,]+)", p.stderr)
    if p.returncode or not m:
        raise RuntimeError(f"valgrind: {p.stderr[-500:]}")
    return int(m.group(1).replace(",", ""))


def start_breakdown() -> None:
    """The start in steps, each row what it adds (M instructions): the interpreter and site, ckpt.cli's
    imports, the parser, then the command's modules and the exit."""
    bare = instructions("", argv=("-S", "-c", "pass"))
    plain = instructions("", argv=("-c", "pass"))
    print("| step | dump | restore |\n|---|---|---|")
    print(f"| interpreter (`python -S -c pass`) | {bare / 1e6:.0f} | {bare / 1e6:.0f} |")
    print(f"| + site (the venv's .pth files) | {(plain - bare) / 1e6:.0f} | {(plain - bare) / 1e6:.0f} |")
    last = {"dump": plain, "restore": plain}
    for stop, label in (("cli", "+ ckpt.cli and its imports"), ("parse", "+ the parser"),
                        ("", "+ the command's modules and the exit")):  # fmt: skip
        row = []
        for what in ("dump", "restore"):
            n = instructions(what, stop)
            row.append(f"{(n - last[what]) / 1e6:.0f}")
            last[what] = n
        print(f"| {label} | {' | '.join(row)} |")
    print(f"| total | {last['dump'] / 1e6:.0f} | {last['restore'] / 1e6:.0f} |")


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--entry", choices=("script", "module"), default="script")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--imports", action="store_true")
    ap.add_argument("--src", type=Path, help="the ckpt tree to run (default: this one)")
    ap.add_argument("--instructions", action="store_true", help="count a start's instructions (valgrind)")
    ap.add_argument("--breakdown", action="store_true", help="with --instructions: where the start goes")
    ap.add_argument("--only", help="comma-separated commands to measure (dump,uffd,incremental,restore,show)")
    a = ap.parse_args()
    if a.src:
        src = a.src.resolve()
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(src / "ckpt")], check=True,
                       capture_output=True)  # fmt: skip
        build_caches(src)
        ENV["PYTHONPATH"] = str(src)
        if a.entry == "script" and not a.instructions:
            ap.error("--src runs `python -m ckpt`: give --entry module")
    if a.instructions:
        for what in ("dump", "restore"):
            print(f"{what}: start, imports, parser and exit: {instructions(what) / 1e6:.0f} M instructions "
                  f"(ckpt of {ENV['PYTHONPATH']})")  # fmt: skip
        if a.breakdown:
            start_breakdown()
        return
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    ck = entry(a.entry)
    exe = str(build_c("rounds"))
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-small-"))
    rows: list[list[str]] = []
    biggest: dict[str, list[tuple[int, str]]] = {}
    n = 0

    def fresh() -> Path:
        nonlocal n
        n += 1
        return work / f"d{n}"

    Make = Callable[[], tuple[list[str], Callable[[Run | None], float | None]]]
    Keep = Callable[[subprocess.Popen[bytes], LineChannel], str]

    only = set(a.only.split(",")) if a.only else None
    keys = {"dump": "dump", "dump (uffd-wp)": "uffd", "incremental dump": "incremental", "restore": "restore",
            "show": "show"}  # fmt: skip

    def measure(name: str, make: Make, keep: Keep | None = None) -> None:
        if only is not None and keys[name] not in only:
            return
        walls, cpus, owns, imps, nps = [], [], [], [], []
        for _ in range(a.repeat):
            argv, done = make()
            r = Run(argv, keep)
            own = done(r)
            walls.append(r.wall)
            cpus.append(r.cpu)
            if own is not None:
                owns.append(own)
        for _ in range(IMPORT_RUNS):  # separate runs, under -X importtime
            argv, done = make()
            tot, npy, cum = import_times(argv, functools.partial(done, None))
            imps.append(tot)
            nps.append(npy)
        biggest[name] = sorted(((v, k) for k, v in cum.items()), reverse=True)[:25]
        crius = CRIU.get(name.split()[0], "-")
        rows.append([name, f"{med(walls):.0f}", f"{min(walls):.0f}", f"{med(cpus):.0f}",
                     f"{med(owns):.0f}" if owns else "-", f"{med(imps):.0f}",
                     f"{med(nps):.0f}" if max(nps) else "not imported", crius])  # fmt: skip

    mixed = Target([exe, str(NPAGES)], stderr=subprocess.DEVNULL)
    try:
        assert mixed.cmd("mix") == "ok"

        def dump_none() -> tuple[list[str], Callable[[Run | None], float | None]]:
            argv = [*ck, "dump", "--pid", str(mixed.pid), "-D", str(fresh()), "--track", "none", "--json"]
            return argv, lambda r: json.loads(r.out)["elapsed_ms"] if r else None

        measure("dump", dump_none)

        def dump_uffd() -> tuple[list[str], Callable[[Run | None], float | None]]:
            t = Target([exe, str(NPAGES)], stderr=subprocess.DEVNULL)
            t.cmd("mix")
            argv = [*ck, "dump", "--pid", str(t.pid), "-D", str(fresh()), "--json"]

            def done(r: Run | None) -> float | None:
                t.proc.kill()
                t.proc.wait()
                return json.loads(r.out)["elapsed_ms"] if r else None

            return argv, done

        measure("dump (uffd-wp)", dump_uffd)

        chain = fresh()
        argv = [*ck, "dump", "--pid", str(mixed.pid), "-D", str(chain)]
        subprocess.run(argv, env=ENV, cwd=ENV["PYTHONPATH"], check=True, capture_output=True)

        def incremental() -> tuple[list[str], Callable[[Run | None], float | None]]:
            mixed.cmd("round")
            argv = [*ck, "dump", "--pid", str(mixed.pid), "-D", str(chain), "--incremental", "--json"]
            return argv, lambda r: json.loads(r.out)["elapsed_ms"] if r else None

        measure("incremental dump", incremental)
        subprocess.run(
            [*ck, "untrack", "--pid", str(mixed.pid)],
            env=ENV,
            cwd=ENV["PYTHONPATH"],
            check=True,
            capture_output=True,
        )

        # the layer a restore starts from: a target killed by its dump
        src = Target([exe, str(NPAGES)], stderr=subprocess.DEVNULL)
        src.cmd("mix")
        want = src.cmd("sum").split()[1]
        d = fresh()
        subprocess.run([*ck, "dump", "--pid", str(src.pid), "-D", str(d), "--track", "none", "--kill"],
                       env=ENV, cwd=ENV["PYTHONPATH"], check=True, capture_output=True)  # fmt: skip
        src.proc.wait()
        layer = sorted(d.glob("layer-*.ckpt"))[-1]
        pids: list[int] = []

        def keep(p: subprocess.Popen[bytes], io: LineChannel) -> str:
            got = io.cmd("sum").split()[1]
            if got != want:
                raise RuntimeError(f"restored process reports sum {got}, dumped {want}")
            return got

        def reap() -> None:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)  # ours: we are a subreaper
            pids.clear()

        def restore() -> tuple[list[str], Callable[[Run | None], float | None]]:
            argv = [*ck, "restore", str(layer), "--detach", "--json"]

            def done(r: Run | None) -> float | None:
                if r is None:  # the -X importtime run: its process is ours to find and kill
                    for c in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
                        pids.append(int(c))
                    reap()
                    return None
                out = json.loads(r.out)
                pids.append(out["pid"])
                reap()
                return float(out["timings_ms"]["total"])

            return argv, done

        measure("restore", restore, keep)
        measure("show", lambda: ([*ck, "show", str(layer)], lambda r: None))
    finally:
        mixed.proc.kill()
        mixed.proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    head = ["command", "wall ms", "min wall ms", "CPU ms", "own ms", "imports ms", "numpy ms",
            "CRIU 4.2 wall s (quoted)"]  # fmt: skip
    load = os.getloadavg()
    print(f"# 1 MiB process, entry `{' '.join(Path(x).name for x in ck)}` of {ENV['PYTHONPATH']}, "
          f"{platform.node()} "
          f"({os.cpu_count()} CPUs), Linux {platform.release()}, Python {platform.python_version()}, "
          f"median of {a.repeat}, load {load[0]:.1f} {load[1]:.1f}")  # fmt: skip
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print("  ".join(f"{h:>16}" for h in head))
    for cells in rows:
        print("| " + " | ".join(cells) + " |" if a.markdown else "  ".join(f"{c:>16}" for c in cells))
    if a.imports:
        for name, top in biggest.items():
            print(f"\n## {name}: largest imports (cumulative ms)")
            print(", ".join(f"{k} {v / 1e3:.1f}" for v, k in top))


if __name__ == "__main__":
    main()
