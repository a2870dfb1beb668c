"""The freezing thread scheduled SCHED_FIFO while its target is frozen.

Every stop of a frozen target is a hand-off: ckpt wakes a thread of the target (PTRACE_INTERRUPT,
PTRACE_SYSCALL, PTRACE_CONT), then sleeps until it stops. On a busy machine the woken thread
preempts ckpt's thread on its CPU, runs a few microseconds to its stop, and the CPU then goes to
whichever other task is due: ckpt's thread waits its turn behind them, for milliseconds, at every
stop (measured with /proc/self/task/TID/schedstat: most of an incremental freeze's wall time at load
7-19 was ckpt's thread runnable but not running, inside the ptrace calls that wake the target). As
a real-time thread it is not preempted by ordinary tasks, and its wake-up at each stop takes the CPU
at once. Only ckpt's own thread changes: the target is never touched. The primitive (priority 1,
SCHED_RESET_ON_FORK so that copy pools stay ordinary, what is left alone, what bounds it) is
ckpt/rtprio.py, shared with the migration's downtime boost. A thread that is real-time already (a
freeze inside another) is left as it is.

Only where something competes for the CPUs: on an idle machine the boost costs more than it saves.
A woken tracee is placed on an idle CPU rather than behind a real-time thread, so each stop becomes
a hand-off between two CPUs, and in a VM an idle vCPU is halted: waking it goes through the host.
Measured on the 2-vCPU Firecracker guest of docs/benchmarks.md (halt polling off): an injected
syscall's round trip 20 us with an ordinary tracer (the kernel keeps both on one CPU) against
~120-140 us with a SCHED_FIFO one; an idle 8 MiB target's incremental freeze 0.2-1 ms longer
boosted with 1 thread (with 8, no difference measured); with 4 busy loops beside it, 9.1 ms boosted
against 17 ms without (8 threads). So the freeze is boosted when, just before it, another task
than ckpt's thread and the target's own running threads (frozen in a moment) is runnable:
/proc/loadavg's count of runnable tasks (`contended`), read twice apart in time (`runnable`).
CKPT_FREEZE_RT=1 boosts always, 0 never; unset or `auto`, as just said. (Since every freeze keeps
the idle CPUs polling, ckpt/idlepoll.py, no halted vCPU is woken at a stop: a single-step round trip
10-19 us boosted, 15-21 us ordinary. The rule is kept: a real-time thread only where one is needed.)

ckpt's own threads count as such a task (Frozen.helpers, set by a dump: procgrab.c's workers read
the grab's /proc files, the dirty scans and a small process's smaps beside the freeze; a big
process's scan thread). Woken by the freezing thread, a worker is put on that thread's CPU (this
guest's kernel packs wake-ups onto busy vCPUs rather than waking a halted one), and there the two
took turns: traced (bench/trace_freeze.py), an ordinary freezing thread waited ~0.4-0.9 ms behind
the grab's worker in an 8-thread incremental, runnable on its own CPU while the other sat idle.
Boosted, the worker goes to the other CPU and runs beside it. Measured (bench_freeze_chain.py,
alternated with the code before): 8 threads 6.3 -> 5.6 ms median, one thread 3.9 -> 3.3, 256 MiB
(1% written) 3.7 -> 3.4; the boost against itself (--env CKPT_FREEZE_RT=1, each tree boosted once),
8 threads 7.5 -> 6.9 and 6.6 -> 6.2.
"""

from __future__ import annotations

import os

from ckpt.rtprio import PRIORITY, Raised, raise_thread, restore

__all__ = ["ENABLED", "PRIORITY", "Boost", "boost", "contended", "enabled", "runnable", "unboost"]

ENABLED: bool | None = None  # a test's say (True: always, False: never); None: CKPT_FREEZE_RT's


def enabled(contended: bool = True) -> bool:
    """Whether to boost a freeze; ``contended``: what `contended()` said before it."""
    # Read at each freeze, not at import: a `ckpt service` imports this once for many commands,
    # each with its own environment.
    if ENABLED is not None:
        return ENABLED
    mode = os.environ.get("CKPT_FREEZE_RT", "auto")
    if mode in ("0", "1"):
        return mode == "1"
    return contended


def runnable() -> int | None:
    """Tasks runnable now, the reader among them (/proc/loadavg's fourth field, ~15 us); None when
    unreadable. The kernel sums its CPUs' run queues without a lock, so a task that is moving
    between CPUs at that moment is missed: 1 read in ~48,000 here missed a busy loop that was
    running all along (the cause of one failure of tests/test_freeze_rt.py in CI)."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return None


def contended(target_running: int = 0, earlier: int | None = 0) -> bool:
    """Another task than the caller and ``target_running`` threads of the target is runnable now.
    ``earlier``: runnable()'s count a little before (the caller's other reads in between), of which
    the larger counts: two reads apart in time rarely miss the same moving task. Read before a
    freeze, outside it. Unreadable: True (the boost, as before this check)."""
    now = runnable()
    if now is None or earlier is None:
        return True
    return max(now, earlier) - 1 - target_running > 0


Boost = Raised  # (the name the freeze holds it by)


def boost(contended: bool = True) -> Boost | None:
    """Raise the calling thread; None when nothing was changed (disabled, not ``contended`` where
    that decides, not allowed, or real-time already: a freeze inside another's, as a process tree's
    members are, leaves it to the outer one)."""
    return raise_thread() if enabled(contended) else None


def unboost(b: Boost | None) -> None:
    """Give the thread back its policy and priority (and so its nice value)."""
    restore(b)
