"""The downtime's CPU priority: ckpt's own threads, and the destination's restore helper, run under
SCHED_FIFO (priority 1, the lowest real-time one) from the final round's start until the copy
runs, and go back to what they had right after.

On a shared machine (2 CPUs, load 8-11 on the project's) the final round's work is some 30 ms of
CPU, but it is a chain of hand-overs: the source's freeze, its writer, the socket, the destination's
receiving thread, its warm-restore thread, ~60 ptrace round trips with the restore helper, READY,
COMMIT, RUNNING. Each hand-over waits for a CPU behind every runnable process of the machine: the
64 MiB idle migration measured 50-330 ms of downtime. A nice value does not help there: with
autogroup (kernel.sched_autogroup_enabled=1, the default) nice weighs a thread only against the
threads of its own session, and the load comes from other sessions (measured: nice -10 changed
nothing). A real-time policy is ahead of every SCHED_OTHER task of the machine, whatever its group.

Why this is safe:
- only for the final round, whose every wait is bounded (the commit's timeout, the freeze's);
- priority 1 with SCHED_RESET_ON_FORK: a process ckpt starts meanwhile (an --on-commit command)
  runs as an ordinary one; only ckpt's own Python threads join (below);
- the kernel's RT throttling (kernel.sched_rt_runtime_us, 0.95 s of every 1 s) bounds even a
  runaway;
- never the source's target: its final dump reads its policy and nice, and would carry the raised
  ones to the copy (tests/test_migrate_boost.py caught exactly that); its freeze still waits for it
  to be scheduled for the seize and each injected call;
- the helper becomes the restored process: it is raised only where the restore sets the dumped
  main thread's own policy and nice just before it runs (plan.thread.props, restore/props.py);
  its threads, cloned meanwhile, start ordinary (reset on fork) and get theirs the same way.
Threads ckpt starts inside the window (the dump's freezing thread is one) join through
threading's profile hook, which runs first in every new Python thread. Best effort: without
CAP_SYS_NICE nothing changes and `note` says why. CKPT_MIGRATE_BOOST=0 turns it off (to measure
the difference)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from types import FrameType

POLICY = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
PRIORITY = 1


def enabled() -> bool:
    return os.environ.get("CKPT_MIGRATE_BOOST", "1") != "0"


def _tids() -> list[int]:
    return [int(t) for t in os.listdir("/proc/self/task")]


def sched_of(tid: int) -> tuple[int, int, int]:
    """A task's policy (SCHED_RESET_ON_FORK included), real-time priority and nice."""
    return (
        os.sched_getscheduler(tid),
        os.sched_getparam(tid).sched_priority,
        os.getpriority(os.PRIO_PROCESS, tid),
    )


def raise_task(tid: int) -> tuple[int, int, int] | None:
    """Task `tid` to the boost's policy; what it had (policy, priority, nice), None where it could
    not be changed (no permission, gone)."""
    try:
        old = sched_of(tid)
        if old[0] & ~os.SCHED_RESET_ON_FORK != os.SCHED_OTHER:
            return None  # real-time already (a freeze's rtboost), or a policy the user chose: left alone
        os.sched_setscheduler(tid, POLICY, os.sched_param(PRIORITY))
    except OSError:
        return None
    return old


def lower_task(tid: int, old: tuple[int, int, int]) -> None:
    policy, prio, nice = old
    with contextlib.suppress(OSError):
        os.sched_setscheduler(tid, policy, os.sched_param(prio))
        os.setpriority(os.PRIO_PROCESS, tid, nice)


class Boost:
    """`start` raises every thread of this process; `join` the calling thread (one started after
    `start` on the downtime's path); `end` puts each back. All safe to call again."""

    def __init__(self) -> None:
        self.old: dict[int, tuple[int, int, int]] = {}
        self.active = False
        self.note = ""
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.active:
            return
        if not enabled():
            self.note = "off (CKPT_MIGRATE_BOOST=0)"
            return
        with self._lock:
            for tid in _tids():
                if (old := raise_task(tid)) is not None:
                    self.old[tid] = old
            self.active = bool(self.old)
            if not self.active:
                self.note = "not raised: no permission for SCHED_FIFO (CAP_SYS_NICE)"
                return
        # Threads ckpt starts in the window (the dump's freezing thread, its page-table walk) are
        # on the path too, but reset on fork; a process it starts is not raised. threading's
        # profile hook runs in each new Python thread before anything else: it joins there.
        threading.setprofile(self._hook)

    def _hook(self, frame: FrameType, event: str, arg: object) -> None:
        sys.setprofile(None)  # once, in this thread
        self.join()

    def join(self) -> None:
        with self._lock:
            tid = threading.get_native_id()
            if self.active and tid not in self.old and (old := raise_task(tid)) is not None:
                self.old[tid] = old

    def end(self) -> None:
        with self._lock:
            if not self.active:
                return
            threading.setprofile(None)
            live = set(_tids())  # (a tid that ended may be another process's by now)
            for tid, old in self.old.items():
                if tid in live:
                    lower_task(tid, old)
            self.old = {}
            self.active = False
