"""The target real-time through the final round's freeze: its stops do not wait for a CPU.

A seize stops each thread of the target with PTRACE_INTERRUPT, and each injected call runs the
target up to its next stop: a thread stops only by running. On a loaded machine a woken ordinary
thread first waits behind every other runnable task: the final freeze of an idle 64 MiB target took
1.3-22 ms of wall time at its seize and 2.6-20 ms at its injected batch, for 1.3 and 2.1 ms of
ckpt's CPU (docs/benchmarks.md, downtime10), all of it downtime. Raised to SCHED_FIFO 1 (ckpt/rtprio.py)
from just before the seize until the final dump has returned, it is scheduled at once (ckpt's
freezing thread is real-time already: ptrace/rtboost.py, migrate/boost.py).

Why it is safe:
- the dump records each thread's own policy, not the raise (ckpt/targetrt.py, read by
  ckpt/proc/props.py): the copy runs as the original did; sched_setscheduler keeps the nice value
  aside over a real-time spell, so it is never touched;
- given back after the final dump (the process is stopped from its thaw on: it runs nothing
  meanwhile), and before the original is let go on any failure; only where the policy is still the
  raise's: a thread that changed its own policy in between keeps its own, and is recorded with it;
- SCHED_RESET_ON_FORK: a thread or process the target starts meanwhile starts ordinary;
- a thread that is not SCHED_OTHER (real-time, batch, idle, deadline) is left alone;
- the guard (guard.py) is told the raised threads and their policies before the raise: if ckpt
  dies before giving them back, the guard gives them back before it decides about the original;
- at SCHED_FIFO 1, below ckpt's own hand-off threads (boost.HANDOFF_PRIORITY, 2): a target whose
  threads all spin cannot hold the CPUs against the thread that stops it; raised at the dump's
  "freezing" note, right before the stops (after the walks' prewarm and the freeze's checks), and
  the kernel's real-time throttling bounds even a runaway (kernel.sched_rt_runtime_us);
- only from a freezing thread itself real-time above the raise (SCHED_FIFO/RR, priority > 1): where
  ckpt's own boost did not take (CKPT_MIGRATE_BOOST=0, RLIMIT_RTPRIO below 2, ckpt run as
  SCHED_BATCH/IDLE), a spinning raised target could starve the thread that is to stop it;
- the guard itself raised first (FIFO 2, reset on fork): after ckpt's SIGKILL it gets a CPU to give
  the policies back even against a spinning target; given back at the end.
Best effort: without CAP_SYS_NICE nothing changes. CKPT_MIGRATE_TARGET_BOOST=0 turns it off (to
measure the difference)."""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

from ckpt import targetrt
from ckpt.migrate.boost import HANDOFF_PRIORITY
from ckpt.ptrace.signals import deferred_signals
from ckpt.rtprio import PRIORITY, Raised, raise_thread

MAX_THREADS = 100  # told to the guard in one message (below PIPE_BUF); more are left ordinary


class Teller(Protocol):
    def tell(self, msg: dict[str, object]) -> None: ...


def enabled() -> bool:
    return os.environ.get("CKPT_MIGRATE_TARGET_BOOST", "1") != "0"


def above_the_raise() -> bool:
    """Whether the calling thread is real-time above the target's raise: it then always wins a CPU
    from the raised target."""
    try:
        policy = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
        return policy in (os.SCHED_FIFO, os.SCHED_RR) and os.sched_getparam(0).sched_priority > PRIORITY
    except OSError:
        return False


def tasks(pid: int) -> list[int]:
    """The threads of `pid` now (a thread started later starts ordinary: reset on fork)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        return []


class TargetBoost:
    """`start(pid)` raises the target's threads (telling `guard` first), `end()` gives each back.
    Both safe to call again; `end` after a failed or partial start gives back what was raised."""

    def __init__(self, guard: Teller | None = None) -> None:
        self.guard = guard
        self.pid = 0
        self.told = False
        self.guard_raised: Raised | None = None

    def _raise_guard(self) -> None:
        proc = getattr(self.guard, "proc", None)
        gpid = getattr(proc, "pid", None)
        if isinstance(gpid, int) and self.guard_raised is None:
            self.guard_raised = raise_thread(gpid, HANDOFF_PRIORITY)

    def start(self, pid: int) -> None:
        if self.pid or not enabled() or not above_the_raise():
            return
        self.pid = pid
        plan = []
        for t in tasks(pid)[:MAX_THREADS]:
            try:
                p = os.sched_getscheduler(t)
            except OSError:
                continue  # (gone meanwhile: the seize says what became of the process)
            slack = targetrt.read_slack(t)
            if p & ~os.SCHED_RESET_ON_FORK == os.SCHED_OTHER and slack is not None:
                plan.append([t, p, slack])
        if not plan:
            return
        if self.guard is not None:
            self._raise_guard()
            self.guard.tell({"sched": plan})
            self.told = True
        targetrt.raise_threads([e[0] for e in plan])

    def end(self) -> None:
        if not self.pid:
            return
        # Whole: a Ctrl-C between a give-back and the guard's message would leave the guard a
        # stale list, or a thread raised with no one left to give it back.
        with deferred_signals():
            targetrt.give_back(self.pid)
            if self.told and self.guard is not None:
                self.guard.tell({"sched": []})
            self.told = False
        # (rtprio.restore: by id only while one of ours; the guard is our child, gone it is a zombie)
        if self.guard_raised is not None:
            g, self.guard_raised = self.guard_raised, None
            with contextlib.suppress(OSError):
                os.sched_setscheduler(g.tid, g.policy, os.sched_param(0))
