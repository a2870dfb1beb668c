"""The freezing thread scheduled SCHED_FIFO while its target is frozen.

Every stop of a frozen target is a hand-off: ckpt wakes a thread of the target (PTRACE_INTERRUPT,
PTRACE_SYSCALL, PTRACE_CONT), then sleeps until it stops. On a busy machine the woken thread
preempts ckpt's thread on its CPU, runs a few microseconds to its stop, and the CPU then goes to
whichever other task is due: ckpt's thread waits its turn behind them, for milliseconds, at every
stop (measured with /proc/self/task/TID/schedstat: most of an incremental freeze's wall time at load
7-19 was ckpt's thread runnable but not running, inside the ptrace calls that wake the target). As
a real-time thread it is not preempted by ordinary tasks, and its wake-up at each stop takes the CPU
at once. Only ckpt's own thread changes: the target is never touched. The lowest real-time
priority; SCHED_RESET_ON_FORK, so that threads it starts meanwhile (copy pools) stay ordinary; the
kernel's real-time throttling and fair server bound what it may take from other tasks. Where it is
not allowed (no CAP_SYS_NICE, RLIMIT_RTPRIO 0) the freeze runs as before; CKPT_FREEZE_RT=0 turns it
off. A thread that is real-time already (a freeze inside another) is left as it is.
"""

from __future__ import annotations

import os
import threading
from contextlib import suppress
from dataclasses import dataclass

PRIORITY = 1
ENABLED = os.environ.get("CKPT_FREEZE_RT", "1") != "0"


@dataclass(frozen=True)
class Boost:
    """What boost() changed: the thread, and the policy and priority to give back."""

    tid: int
    policy: int  # as sched_getscheduler() gave it (SCHED_RESET_ON_FORK included)
    priority: int


def boost() -> Boost | None:
    """Raise the calling thread; None when nothing was changed (disabled, not allowed, or real-time
    already: a freeze inside another's, as a process tree's members are, leaves it to the outer
    one). No state outside the returned value: nothing can outlive the freeze that holds it, nor
    follow a thread id the kernel gives to another thread."""
    if not ENABLED:
        return None
    try:
        policy = os.sched_getscheduler(0)
        if policy & ~os.SCHED_RESET_ON_FORK != os.SCHED_OTHER:
            return None  # real-time already, or BATCH/IDLE/DEADLINE as the user chose: left alone
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(PRIORITY))
    except OSError:
        return None  # EPERM: an ordinary thread it stays
    return Boost(threading.get_native_id(), policy, 0)  # (SCHED_OTHER's priority is always 0)


def unboost(b: Boost | None) -> None:
    """Give the thread back its policy and priority (and so its nice value, which a real-time
    policy keeps aside)."""
    if b is None:
        return
    # By its id (a freeze may be ended from another thread: kill()), but only while the id is one of
    # ours: once the thread has ended its policy went with it, and the id may name another's task.
    if b.tid == threading.get_native_id() or os.path.exists(f"/proc/self/task/{b.tid}"):
        with suppress(OSError):
            os.sched_setscheduler(b.tid, b.policy, os.sched_param(b.priority))
