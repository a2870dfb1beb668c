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
off. A thread that is real-time already is left as it is.
"""

from __future__ import annotations

import os
import threading
from contextlib import suppress
from dataclasses import dataclass

PRIORITY = 1
ENABLED = os.environ.get("CKPT_FREEZE_RT", "1") != "0"
_REALTIME = (os.SCHED_FIFO, os.SCHED_RR)


@dataclass
class _Held:
    depth: int
    policy: int  # as sched_getscheduler() gave it (SCHED_RESET_ON_FORK included)
    priority: int


_lock = threading.Lock()
_held: dict[int, _Held] = {}  # native thread id -> what to give back


def boost() -> int:
    """Raise the calling thread; returns its native id for unboost(), 0 when nothing was changed
    (disabled, not allowed, real-time already). Nested boosts of one thread count."""
    if not ENABLED:
        return 0
    tid = threading.get_native_id()
    with _lock:
        got = _held.get(tid)
        if got is not None:
            got.depth += 1
            return tid
        try:
            policy = os.sched_getscheduler(0)
            if policy & ~os.SCHED_RESET_ON_FORK in _REALTIME:
                return 0
            priority = os.sched_getparam(0).sched_priority
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(PRIORITY))
        except OSError:
            return 0  # EPERM: an ordinary thread it stays
        _held[tid] = _Held(1, policy, priority)
        return tid


def unboost(tid: int) -> None:
    """End one boost() of thread ``tid`` (0: nothing); the last gives back its policy and priority
    (and so its nice value, which a real-time policy keeps aside)."""
    if not tid:
        return
    with _lock:
        got = _held.get(tid)
        if got is None:
            return
        got.depth -= 1
        if got.depth > 0:
            return
        del _held[tid]
        with suppress(OSError):  # (the thread has ended)
            os.sched_setscheduler(tid, got.policy, os.sched_param(got.priority))


def boosted(tid: int) -> bool:
    """Whether ``tid`` holds a boost (for tests)."""
    return tid in _held
