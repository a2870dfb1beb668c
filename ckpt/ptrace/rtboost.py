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
ckpt/rtprio.py, shared with the migration's downtime boost. CKPT_FREEZE_RT=0 turns it off. A thread
that is real-time already (a freeze inside another) is left as it is.
"""

from __future__ import annotations

import os

from ckpt.rtprio import PRIORITY, Raised, raise_thread, restore

__all__ = ["ENABLED", "PRIORITY", "Boost", "boost", "enabled", "unboost"]

ENABLED: bool | None = None  # a test's say; None: CKPT_FREEZE_RT's


def enabled() -> bool:
    # Read at each freeze, not at import: a `ckpt service` imports this once for many commands,
    # each with its own environment.
    if ENABLED is not None:
        return ENABLED
    return os.environ.get("CKPT_FREEZE_RT", "1") != "0"


Boost = Raised  # (the name the freeze holds it by)


def boost() -> Boost | None:
    """Raise the calling thread; None when nothing was changed (disabled, not allowed, or real-time
    already: a freeze inside another's, as a process tree's members are, leaves it to the outer
    one)."""
    return raise_thread() if enabled() else None


def unboost(b: Boost | None) -> None:
    """Give the thread back its policy and priority (and so its nice value)."""
    restore(b)
