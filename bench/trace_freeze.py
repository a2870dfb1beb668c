"""An incremental dump's freeze as the kernel saw it: who ran on which CPU, and when (tracefs).

    python bench/trace_freeze.py [--target sigwait:8 | dirty:256] [--warm 20] [--out trace.txt]

Laps (`phases_ms`) say how long each step of a freeze took, not why: whether the freezing thread
was working, waiting for the target, or runnable and waiting for a CPU. This starts a target
(bench/freezetarget.c, as bench_freeze_chain.py does), dumps it fully and WARM times
incrementally in this process, then traces one more incremental with tracefs: sched_switch,
sched_wakeup, raw_syscalls (enter/exit) and signal_generate of this process's threads and the
target's, and prints the freeze's timeline (µs from the seize, CPU, thread, what happened; each
syscall with its duration) and, for the freezing thread, the time it spent runnable but not running
(woken, and waiting for its CPU) and its longest stretches with no syscall (Python at work).
Root only; tracefs is mounted at /sys/kernel/tracing if it is not, and every setting this changes
is put back. What found the helpers' worker on the freezing thread's CPU (docs/benchmarks.md,
"ckpt's own helper threads and the freezing thread's CPU"). Not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import bench_freeze as bf  # noqa: E402

T = Path("/sys/kernel/tracing")
EVENTS = " ".join(
    (
        "sched:sched_switch",
        "sched:sched_wakeup",
        "raw_syscalls:sys_enter",
        "raw_syscalls:sys_exit",
        "signal:signal_generate",
    )
)
LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+): (.*)$")


def _w(name: str, value: str) -> None:
    (T / name).write_text(value)


def _syscall_names() -> dict[int, str]:
    out: dict[int, str] = {}
    for p in ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"):
        if os.path.exists(p):
            for m in re.finditer(r"#define __NR_(\w+) (\d+)", Path(p).read_text()):
                out[int(m.group(2))] = m.group(1)
            break
    return out


def timeline(
    text: str, freezer: int | None = None, until: float | None = None
) -> tuple[list[str], dict[str, float]]:
    """The trace between the markers, as lines, and the freezing thread's figures: the thread that
    made the first PTRACE_SEIZE (0x4206) unless ``freezer`` is given; its longest stretches without
    a syscall among those begun before ``until`` µs from the seize (the thaw's end)."""
    names = _syscall_names()
    rows = [m.groups() for ln in text.splitlines() if (m := LINE.match(ln))]
    start = next(i for i, r in enumerate(rows) if r[4] == "tracing_mark_write" and "FREEZE-START" in r[5])
    rows = rows[start:]
    seize = next(
        (i for i, r in enumerate(rows) if r[4] == "sys_enter" and r[5].startswith("NR 101 (4206,")), 0
    )
    if freezer is None and seize:
        freezer = int(rows[seize][1])
    t0 = float(rows[seize][3])
    out: list[str] = []
    entered: dict[str, tuple[float, str]] = {}
    woken: float | None = None
    waiting = 0.0
    last_exit: float | None = None
    gaps: list[tuple[float, float]] = []
    for _comm, tid, cpu, ts, ev, rest in rows[seize:]:
        us = (float(ts) - t0) * 1e6
        if ev == "tracing_mark_write" and "FREEZE-END" in rest:
            break
        mine = freezer is not None and int(tid) == freezer
        if ev == "sys_enter":
            nr = int(rest.split()[1])
            entered[tid] = (us, f"{names.get(nr, nr)}({rest.split('(', 1)[1][:36]}")
            if mine and last_exit is not None:
                gaps.append((us - last_exit, last_exit))
            continue
        if ev == "sys_exit":
            began, what = entered.pop(tid, (us, "?"))
            out.append(
                f"{began:9.1f} {us - began:7.1f} c{cpu} {tid:>7} {what} = {rest.split('=')[-1].strip()}"
            )
            if mine:
                last_exit = us
            continue
        if ev == "sched_wakeup" and freezer is not None and f"pid={freezer} " in rest:
            woken = us
        if (
            ev == "sched_switch"
            and freezer is not None
            and f"next_pid={freezer} " in rest
            and woken is not None
        ):
            waiting += us - woken
            woken = None
        out.append(f"{us:9.1f}         c{cpu} {tid:>7} {ev} {rest[:100]}")
    if until is not None:  # (the part of each before the thaw's end)
        gaps = [(min(g, until - at), at) for g, at in gaps if at < until]
    gaps.sort(reverse=True)
    figures = {"freezer": float(freezer or 0), "runnable_waiting_us": waiting}
    for i, (g, at) in enumerate(gaps[:5]):
        figures[f"gap{i + 1}_us"] = g
        figures[f"gap{i + 1}_at"] = at
    return sorted(out, key=lambda s: float(s.split()[0])), figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="sigwait:8", help="MODE:THREADS (idle, 8 MiB) or dirty:MIB")
    ap.add_argument("--warm", type=int, default=20, help="incrementals before the traced one")
    ap.add_argument("--out", help="also save the raw trace here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("trace_freeze: tracefs needs root")
    if not (T / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(T)], check=True)
    mode, _, n = a.target.partition(":")
    threads, mib = ("1", n or "256") if mode == "dirty" else (n or "1", "8")
    exe = bf.build_target()
    p = subprocess.Popen(
        [str(exe), mode, threads, mib], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    ch = bf.LineChannel(p, 120)
    assert ch.readline().startswith("ready")
    d = tempfile.mkdtemp(prefix="ckpt-bench-trace-")
    saved = {k: (T / k).read_text() for k in ("buffer_size_kb", "set_event_pid", "tracing_on")}
    saved_fork = (T / "options/event-fork").read_text()
    try:
        bf.dump(p.pid, d, track="uffd-wp")
        for _ in range(a.warm):
            bf.dump(p.pid, d, incremental=True, track="uffd-wp")
        if mode == "dirty":
            assert ch.cmd("write 10").startswith("written")
        _w("tracing_on", "0")
        _w("trace", "")
        _w("buffer_size_kb", "20000")
        _w("set_event", EVENTS)
        _w(
            "set_event_pid",
            " ".join(
                [
                    str(os.getpid()),
                    *os.listdir(f"/proc/{os.getpid()}/task"),
                    *os.listdir(f"/proc/{p.pid}/task"),
                ]
            ),
        )
        _w("options/event-fork", "1")
        _w("tracing_on", "1")
        _w("trace_marker", "FREEZE-START")
        r = bf.dump(p.pid, d, incremental=True, track="uffd-wp")
        _w("trace_marker", "FREEZE-END")
        _w("tracing_on", "0")
        text = (T / "trace").read_text()
    finally:
        _w("tracing_on", "0")
        _w("set_event", "")
        _w("set_event_pid", "")
        _w("options/event-fork", saved_fork.strip())
        _w("buffer_size_kb", saved["buffer_size_kb"].split()[0])
        _w("trace", "")
        p.kill()
        p.wait()
        shutil.rmtree(d, ignore_errors=True)
    if a.out:
        Path(a.out).write_text(text)
    held = getattr(r, "held_ms", 0.0) or r.freeze_ms
    lines, fig = timeline(text, until=held * 1e3)
    for ln in lines:
        print(ln)
    ph = bf.phases(r)
    print(f"\nfreeze_ms {r.freeze_ms:.3f}  held_ms {held:.3f}  (the trace itself adds a little to both)")
    print(
        f"freezing thread {int(fig['freezer'])}: runnable but not running {fig['runnable_waiting_us']:.0f} us"
    )
    for i in range(1, 6):
        if f"gap{i}_us" in fig:
            print(f"  no syscall for {fig[f'gap{i}_us']:.0f} us from {fig[f'gap{i}_at']:.0f} us (Python)")
    print(
        "phases: "
        + ", ".join(f"{k.removeprefix('frozen: ')} {v:.2f}" for k, v in ph.items() if k.startswith("frozen"))
    )


if __name__ == "__main__":
    main()
