"""The restore's injected syscalls one by one (a ptrace single-step each) against one run of injected
code (ckpt/restore/blob.py), on a real restore helper: what a migration's final step pays for them.

    python bench/bench_blob.py [--repeat 21] [--markdown]

Each case runs both ways in turn, `--repeat` times, so that both see the same load; medians of wall
and CPU (this process: the tracer's side) per case. Cases: every signal's action (rt_sigaction x 62,
what `complete` sets), 12 mprotects (a small process's mappings), 200 getpids (the cost per call).
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(os.environ.get("CKPT_BENCH_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from ckpt import sysno as nr  # noqa: E402
from ckpt.proc import read_maps  # noqa: E402
from ckpt.ptrace import sigchld  # noqa: E402
from ckpt.ptrace.batch import Call  # noqa: E402
from ckpt.restore import blob  # noqa: E402
from ckpt.restore.helper import CODE_OFFSET, PAUSE_SYSCALL, STUB_BASE, kill_helper, spawn_helper  # noqa: E402
from ckpt.restore.layout import choose_areas  # noqa: E402
from ckpt.restore.memory import install_gadget  # noqa: E402
from ckpt.restore.remote import Remote  # noqa: E402

SIGNALS = [s for s in range(1, 65) if s not in (9, 19)]  # what set_sigactions sets: all but KILL, STOP
PAGE = 4096


def _cases(remote: Remote, area: int) -> dict[str, list[Call]]:
    act = struct.pack("<QQQQ", 0, 0, 0, 0)  # SIG_DFL: changes nothing the helper relies on
    return {
        "rt_sigaction x 62": [Call(nr.RT_SIGACTION, (s, 0, 0, 8), out_arg=1, inp=act) for s in SIGNALS],
        "mprotect x 12": [
            Call(nr.MPROTECT, (area + i * PAGE, PAGE, nr.PROT_READ | (nr.PROT_WRITE if i % 2 else 0)))
            for i in range(12)
        ],
        "getpid x 200": [Call(nr.GETPID) for _ in range(200)],
    }


def _one_by_one(remote: Remote, calls: list[Call]) -> None:
    for c in calls:
        args = list(c.args)
        if c.inp:
            args[c.out_arg] = remote.put(c.inp)
        remote.syscall(c.nr, *(int(a) for a in args))  # type: ignore[arg-type]


def _time(fn: Callable[[], None]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    rows = []
    with sigchld.blocked():  # as the `ckpt` command runs (cli.main blocks SIGCHLD in every thread)
        h = spawn_helper(None)
        remote = Remote(h.pid, STUB_BASE + CODE_OFFSET + PAUSE_SYSCALL)
        try:
            install_gadget(remote, choose_areas(read_maps(h.pid), []))
            area = remote.check("mapping pages to protect", nr.MMAP, 0, 12 * PAGE, nr.PROT_READ,
                                nr.MAP_PRIVATE | nr.MAP_ANONYMOUS, -1, 0)  # fmt: skip
            for name, calls in _cases(remote, area).items():
                one: list[tuple[float, float]] = []
                run: list[tuple[float, float]] = []
                for _ in range(a.repeat):
                    one.append(_time(lambda calls=calls: _one_by_one(remote, calls)))  # type: ignore[misc]
                    run.append(_time(lambda calls=calls: blob.run(remote, calls)))  # type: ignore[misc]
                ow, oc = (statistics.median(x[i] for x in one) for i in (0, 1))
                rw, rc = (statistics.median(x[i] for x in run) for i in (0, 1))
                rows.append([name, f"{ow:.2f}", f"{oc:.2f}", f"{rw:.2f}", f"{rc:.2f}", f"{ow / rw:.0f}x"])
        finally:
            remote.close()
            kill_helper(h.pid)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# restore helper, {platform.node()} ({os.cpu_count()} CPUs), median of {a.repeat}, load {load}")
    head = ["calls", "one by one: wall ms", "CPU ms", "one blob: wall ms", "CPU ms", "wall ratio"]
    sep = " | " if a.markdown else "  "
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    for r in [head, *rows] if not a.markdown else rows:
        print(("| " if a.markdown else "") + sep.join(r) + (" |" if a.markdown else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
