"""What pipes and anonymous-inode fds add to a dump and a restore (issue 12 (B) 1 and 5).

    python bench/bench_fdkinds.py [--repeat 5] [--markdown]

tests/targets/fdkinds.c holds the fds of each case: none (the baseline), a pipe with both ends in
the process (5000 bytes buffered, plus two small pipes), a full 1 MiB pipe, and every kind at once
(pipes, eventfd, timerfd, signalfd, epoll, socketpairs with queued messages, inotify). For each:
the CPU time of reading the new records alone (pipes' bytes by tee, fdinfo, kcmp, sock_diag,
peeks), `ckpt dump --json` (its freeze time, and the command's CPU seconds, user + system), then
`ckpt restore --detach --json` (ckpt's own total, and the command's CPU seconds); the restored
process must answer `check` with "ok". Medians of --repeat runs. Not a test: nothing here asserts
a speed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
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

from ckpt.proc.anonfds import read_anonfds  # noqa: E402
from ckpt.proc.fds import list_fds  # noqa: E402
from ckpt.proc.pipes import read_pipes  # noqa: E402
from tests.util import LineChannel, Target, build_c  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
PR_SET_CHILD_SUBREAPER = 36
CASES = {
    "no extra fds": "",
    "pipes (5000 B buffered)": "pipe",
    "full 1 MiB pipe": "bigpipe",
    "every kind": "pipe,eventfd,timerfd,signalfd,epoll,socket,inotify",
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(*args: str) -> tuple[dict[str, object], float, subprocess.Popen[bytes] | None]:
    before = _cpu()
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    chan = LineChannel(p, 120)
    out = json.loads(chan.readline())
    if args[0] == "dump":
        p.wait(60)
        return out, _cpu() - before, None
    p.wait(60)  # restore --detach returns once the process runs; the process keeps p's pipes
    return out, _cpu() - before, p


def one(kinds: str, work: Path) -> dict[str, float]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    t = Target([str(build_c("fdkinds")), kinds, str(work)], stderr=subprocess.DEVNULL)
    try:
        # The new records alone, read from the running target (the dump reads them frozen).
        fds = list_fds(t.pid)
        c0 = time.process_time()
        read_pipes(t.pid, fds)
        read_anonfds(t.pid, fds)
        records_cpu = time.process_time() - c0
        d = work / "d"
        dumped, dump_cpu, _ = _run("dump", "--pid", str(t.pid), "-D", str(d), "--json", "--kill")
        t.proc.wait(30)
    finally:
        t.close()
    restored, restore_cpu, p = _run("restore", str(dumped["layer"]), "--detach", "--json")
    assert p is not None
    try:
        answer = LineChannel(p, 60).cmd("check")
        if answer != "ok":
            raise RuntimeError(f"{kinds}: the restored process says {answer}")
    finally:
        os.kill(int(restored["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        os.waitpid(int(restored["pid"]), 0)  # type: ignore[call-overload]
    return {
        "records_cpu_ms": records_cpu * 1e3,
        "freeze_ms": float(dumped["freeze_ms"]),  # type: ignore[arg-type]
        "dump_cpu_ms": dump_cpu * 1e3,
        "restore_ms": float(restored["timings_ms"]["total"]),  # type: ignore[index]
        "restore_cpu_ms": restore_cpu * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # restored processes are ours to reap
    keys = ("records_cpu_ms", "freeze_ms", "dump_cpu_ms", "restore_ms", "restore_cpu_ms")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-fd-") as tmp:
        for name, kinds in CASES.items():
            runs = [one(kinds, Path(tmp) / "w") for _ in range(a.repeat + 1)][1:]
            rows.append([name, *(f"{statistics.median(r[k] for r in runs):.1f}" for k in keys)])
    head = ["fds", "records CPU ms", "freeze ms", "dump CPU ms", "restore ms", "restore CPU ms"]
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        print("".join(f"{h:>26}" for h in head))
        for r in rows:
            print("".join(f"{c:>26}" for c in r))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average: {load}; medians of {a.repeat} (after one run not counted)")


if __name__ == "__main__":
    main()
