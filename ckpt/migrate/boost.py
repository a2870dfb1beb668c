"""The downtime's CPU priority: the threads that hand the final round on, on both sides, and the
destination's restore helper, run under SCHED_FIFO (ckpt's threads priority 2, the helper 1) from
the final round's start until the copy runs, and go back to what they had right after (the
primitive: ckpt/rtprio.py).

On a shared machine (2 CPUs, load 8-19 on the project's) the final round's work is some 30 ms of
CPU, but it is a chain of hand-overs: the source's freeze, its dump up to END, the socket, the
destination's receiving thread, its warm-restore thread, ~60 ptrace round trips with the restore
helper, READY, COMMIT, RUNNING. Each hand-over waits for a CPU behind every runnable process of the
machine: the 64 MiB idle migration measured 50-330 ms of downtime. A nice value does not help
there: with autogroup (kernel.sched_autogroup_enabled=1, the default) nice weighs a thread only
against the threads of its own session, and the load comes from other sessions (measured: nice -10
changed nothing). A real-time policy is ahead of every SCHED_OTHER task of the machine.

Only the hand-off threads, each by an explicit call: the thread that starts the boost (`start`:
the source's main thread, which runs the final dump after its thaw and waits for the answer; the
destination's receiving thread), and those that `join` it (the source's freezing thread at the
final seize, which then keeps the boost through its thaw where the freeze's own spell,
ckpt/ptrace/rtboost.py, would end before it; the source's committer; the destination's
warm-restore thread, told at the final layer's header). Threads that do bulk work beside
the path (compression and restore pools, a page-table walk, a sink) are never raised: they would
take the CPUs from everything else of the machine for as long as they run.

Why this is safe:
- only for the final round, whose every wait is bounded (the commit's timeout, the freeze's);
- SCHED_RESET_ON_FORK: a process or thread started meanwhile (an --on-commit command, a pool)
  runs as an ordinary one;
- the kernel's RT throttling (kernel.sched_rt_runtime_us, 0.95 s of every 1 s) bounds even a
  runaway;
- never the source's target: its final dump reads its policy and nice, and would carry the raised
  ones to the copy (tests/test_migrate_boost.py caught exactly that); its freeze still waits for it
  to be scheduled for the seize and each injected call;
- the helper becomes the restored process: it is raised only where the restore sets the dumped
  main thread's own policy and nice just before it runs (plan.thread.props, restore/props.py);
  its threads, cloned meanwhile, start ordinary (reset on fork) and get theirs the same way.
Best effort: without CAP_SYS_NICE nothing changes and `note` says why. CKPT_MIGRATE_BOOST=0 turns
it off (to measure the difference).

The same window keeps the idle CPUs polling, on each side (ckpt/idlepoll.py): each hand-over above
wakes a thread, and a CPU that halted meanwhile is woken through the host in a VM. The source's
freeze and a cold restore hold that request themselves; the window covers the rest (the final
dump's write and send after the thaw, the destination's receiving, its warm restore, READY,
COMMIT, RUNNING). It follows CKPT_IDLE_POLL, not CKPT_MIGRATE_BOOST, and needs no CAP_SYS_NICE."""

from __future__ import annotations

import os
import threading

from ckpt import idlepoll
from ckpt.rtprio import POLICY, PRIORITY, Raised, raise_thread, restore

__all__ = ["HANDOFF_PRIORITY", "POLICY", "PRIORITY", "Boost", "enabled", "raise_task"]

# ckpt's own hand-off threads one above the target raised for its final freeze (targetboost.py,
# at PRIORITY): a target whose threads all spin could otherwise hold both CPUs against the thread
# that is to stop it, until the kernel's real-time throttling let it in (0.95 s of each second).
HANDOFF_PRIORITY = PRIORITY + 1


def enabled() -> bool:
    return os.environ.get("CKPT_MIGRATE_BOOST", "1") != "0"


def raise_task(tid: int) -> Raised | None:
    """Task `tid` (the destination's helper) to the boost's policy; None where it was not changed.
    Its own policy and nice are set from the dump before it runs: nothing to give back."""
    return raise_thread(tid)


class Boost:
    """`start` raises the calling thread and opens the window; `join` raises the calling thread
    while it is open; `end` gives each its own back and closes it. All safe to call again."""

    def __init__(self) -> None:
        self.raised: list[Raised] = []
        self.active = False
        self.note = ""
        self._lock = threading.Lock()
        self._idle: idlepoll.Held | None = None  # idle CPUs polling while the window is open

    def start(self) -> None:
        with self._lock:
            if self._idle is None:
                self._idle = idlepoll.hold()
        if self.active:
            return
        if not enabled():
            self.note = "off (CKPT_MIGRATE_BOOST=0)"
            return
        with self._lock:
            r = raise_thread(priority=HANDOFF_PRIORITY)
            if r is None:
                self.note = "not raised: no permission for SCHED_FIFO (CAP_SYS_NICE), or not SCHED_OTHER"
                return
            self.raised.append(r)
            self.active = True

    def join(self) -> None:
        with self._lock:
            tid = threading.get_native_id()
            if not self.active or any(r.tid == tid for r in self.raised):
                return
            if (r := raise_thread(priority=HANDOFF_PRIORITY)) is not None:
                self.raised.append(r)

    def end(self) -> None:
        with self._lock:
            for r in self.raised:
                restore(r)
            self.raised = []
            self.active = False
            idle, self._idle = self._idle, None
            idlepoll.release(idle)
