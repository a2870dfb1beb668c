"""What letting restored threads go back inside their syscalls costs, on each restore path (issue 12 A).

    python bench/bench_resume.py [--threads 1,4,12] [--repeat 5] [--markdown]

tests/targets/insyscall.c with N threads blocked in pause/nanosleep/read/futex (and, for `tree`,
the same in a parent with two children of its own) is dumped with --kill, then restored in this
process with restore_process (what `ckpt restore`, the API and `ckpt serve`'s cold restore run)
or through a WarmRestore (`ckpt serve`'s warm restore: the same layer as its only round, then as
its final one). Reported per path and thread count: CPU time (user + system) of the restore's own
thread inside resume.let_run (PTRACE_SYSCALL to the syscall-enter-stop, the check, the resume past
it), per thread let go. Medians of --repeat runs. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckpt.api import dump, open_layer  # noqa: E402
from ckpt.image import Layer  # noqa: E402
from ckpt.restore import restorer, resume, threads, tree  # noqa: E402
from tests.util import Target, build_c  # noqa: E402

KINDS = ("pause", "sleep", "read", "futex")


@contextlib.contextmanager
def counted() -> Iterator[list[float]]:
    """CPU seconds of every let_run call (in the calling thread), into the list yielded."""
    spent: list[float] = []
    real = resume.let_run

    def let_run(tid: int, regs: Any) -> None:
        t0 = time.thread_time()
        try:
            real(tid, regs)
        finally:
            spent.append(time.thread_time() - t0)

    mods = (restorer, threads, tree)
    for m in mods:
        m.let_run = let_run  # type: ignore[attr-defined]
    try:
        yield spent
    finally:
        for m in mods:
            m.let_run = real  # type: ignore[attr-defined]


def dumped(exe: Path, kinds: list[str], work: Path) -> Path:
    t = Target([str(exe), *kinds], stderr=subprocess.DEVNULL)
    d = work / "d"
    shutil.rmtree(d, ignore_errors=True)
    res = dump(t.pid, d, kill=True)
    t.proc.wait(30)
    for w in t.ready.split()[1:]:  # a tree's children: ours to reap (this process is their subreaper)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(int(w.split(":")[0]), 0)
    return Path(res.layer)


def kill_tree(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    for p in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p, 0)


def restore_cold(layer: Path) -> list[int]:
    rp = restorer.restore_process(open_layer(layer))
    return [rp.pid] + [int(x["pid"]) for x in rp.tree if x["pid"] != rp.pid]


def restore_warm(layer: Path) -> list[int]:
    from ckpt.migrate.warm import WarmRestore

    w = WarmRestore()
    try:
        w.round(Layer.open(layer))
        w.drain()
        rp = w.finish(Layer.open(layer))
    finally:
        w.close()
    return [rp.pid]


def one(exe: Path, kinds: list[str], how: Callable[[Path], list[int]], work: Path) -> tuple[float, int]:
    layer = dumped(exe, kinds, work)
    with counted() as spent:
        pids = how(layer)
    kill_tree(pids)
    return sum(spent), len(spent)


def dump_thaw(repeat: int, work: Path) -> list[tuple[str, float, float, float]]:
    """tests/targets/wakeups.c (6 threads asleep in pause, nanosleep, clock_nanosleep, read, futex,
    poll; the main one in read): incremental dumps with the thaw as `ckpt dump` does it (from a
    thread that ends: every thread goes back into its call traced) and with a plain PTRACE_DETACH
    (the dump run in this thread). Per mode: the thaw's wall ms (phases_ms), the whole dump's CPU ms
    (user + system of this process), and its freeze_ms; medians."""
    from ckpt.dump import _dump, run_to_end

    t = Target([str(build_c("wakeups"))], stderr=subprocess.DEVNULL)
    d = work / "w"
    shutil.rmtree(d, ignore_errors=True)
    out = []
    try:
        dump(t.pid, d)
        for mode in ("thread that ends (ckpt dump)", "PTRACE_DETACH"):
            thaw, cpu, freeze = [], [], []
            for _ in range(repeat):
                c0 = time.process_time()
                if mode == "PTRACE_DETACH":
                    with contextlib.ExitStack() as locks:
                        r = run_to_end(_dump(t.pid, d, locks=locks, incremental=True))
                else:
                    r = dump(t.pid, d, incremental=True)
                cpu.append((time.process_time() - c0) * 1e3)
                thaw.append(r.phases_ms["frozen: thaw"])
                freeze.append(r.freeze_ms)
            out.append((mode, statistics.median(thaw), statistics.median(cpu), statistics.median(freeze)))
    finally:
        t.proc.kill()
        t.proc.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,4,12")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--dump-only", action="store_true", help="only the dump's thaw")
    a = ap.parse_args()
    import ctypes

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: a killed tree's orphans are ours
    exe = build_c("insyscall")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in () if a.dump_only else (int(x) for x in a.threads.split(",")):
            base = [KINDS[i % len(KINDS)] for i in range(n)]
            paths: list[tuple[str, list[str], Callable[[Path], list[int]]]] = [
                ("restore_process (CLI, API, serve cold)", base, restore_cold),
                ("tree (+2 children)", [*base[:1], "+pause", "+sleep", *base[1:]], restore_cold),
                ("serve warm", base, restore_warm),
            ]
            for name, kinds, how in paths:
                per = []
                for _ in range(a.repeat):
                    cpu, calls = one(exe, kinds, how, work)
                    per.append(cpu / calls * 1e3)
                rows.append((name, n, len(kinds), statistics.median(per)))
        thaws = dump_thaw(a.repeat * 2, work)
    if a.markdown:
        print("| path | threads in syscalls | threads and children | CPU ms per thread (median) |")
        print("|---|---|---|---|")
        for name, n, k, ms in rows:
            print(f"| {name} | {n} | {k} | {ms:.3f} |")
    else:
        for name, n, k, ms in rows:
            print(f"{name:42s} {n:3d} {k:3d} {ms:8.3f} ms CPU/thread")
    print()
    print("| dump thaw (wakeups: 6 threads in calls, 1 in read) | thaw ms | dump CPU ms | freeze ms |")
    print("|---|---|---|---|")
    for mode, th, cpu, fr in thaws:
        print(f"| {mode} | {th:.2f} | {cpu:.1f} | {fr:.2f} |")
    print(f"load: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
