"""One thread run SCHED_FIFO 1 for a while, then given back exactly what it had: the primitive of the
freeze's boost (ckpt/ptrace/rtboost.py) and the migration's downtime boost (ckpt/migrate/boost.py).

Priority 1, the lowest real-time one, with SCHED_RESET_ON_FORK: what the thread starts meanwhile
(threads of a pool, a process) starts ordinary. A thread that is not SCHED_OTHER (real-time
already, in a freeze inside another's, or BATCH/IDLE/DEADLINE as the user chose) is left alone.
Where it is not allowed (no CAP_SYS_NICE, RLIMIT_RTPRIO 0, an RT cgroup without runtime) nothing
changes. The kernel's real-time throttling (kernel.sched_rt_runtime_us) bounds what a stuck thread
could take. No state outside the returned value: nothing can outlive the holder, nor follow a
thread id the kernel gives to another thread."""

from __future__ import annotations

import os
import threading
from contextlib import suppress
from dataclasses import dataclass

POLICY = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
PRIORITY = 1


@dataclass(frozen=True)
class Raised:
    """What raise_thread() changed: the thread, and the policy to give back (SCHED_OTHER's priority
    is always 0, and its nice value stays aside while the thread is real-time)."""

    tid: int
    policy: int  # as sched_getscheduler() gave it (SCHED_RESET_ON_FORK included)


def raise_thread(tid: int = 0, priority: int = PRIORITY) -> Raised | None:
    """Thread `tid` (0: the calling one) to SCHED_FIFO `priority`; None when nothing was changed."""
    try:
        policy = os.sched_getscheduler(tid)
        if policy & ~os.SCHED_RESET_ON_FORK != os.SCHED_OTHER:
            return None
        os.sched_setscheduler(tid, POLICY, os.sched_param(priority))
    except OSError:
        return None  # EPERM (an ordinary thread it stays), ESRCH (gone)
    return Raised(tid or threading.get_native_id(), policy)


def restore(r: Raised | None) -> None:
    """Give the thread back its policy (and so its nice value, which the legacy sched_setscheduler
    keeps across a real-time spell). By its id (it may be given back from another thread), but only
    while the id is one of this process's: once the thread has ended its policy went with it, and
    the id may name another's task."""
    if r is None:
        return
    if r.tid == threading.get_native_id() or os.path.exists(f"/proc/self/task/{r.tid}"):
        with suppress(OSError):
            os.sched_setscheduler(r.tid, r.policy, os.sched_param(0))
