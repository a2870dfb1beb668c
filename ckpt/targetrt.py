"""Threads of a target that ckpt raised to real-time for a while (a migration's final freeze:
ckpt/migrate/targetboost.py), and the policy each had: what a dump records for them instead of
the raise (ckpt/proc/props.py), so that the copy never comes back real-time because of ckpt.

Raising (ckpt/rtprio.py's primitive: SCHED_FIFO 1 with SCHED_RESET_ON_FORK) keeps the nice value
aside, so only the policy and its priority are put back here. A thread whose policy is no longer
exactly the raise's changed it itself after the raise: its own is what it has, and is read as is."""

from __future__ import annotations

import contextlib
import os

from ckpt.rtprio import POLICY, PRIORITY, raise_thread

_own: dict[int, int] = {}  # tid -> its policy before the raise (SCHED_OTHER's priority is 0)


def raised() -> dict[int, int]:
    return dict(_own)


def still_raised(tid: int) -> bool:
    """Whether thread `tid` runs under the raise's policy (nothing else changed it since)."""
    try:
        return os.sched_getscheduler(tid) == POLICY and os.sched_getparam(tid).sched_priority == PRIORITY
    except OSError:
        return False


def raise_threads(tids: list[int]) -> list[int]:
    """Raise each ordinary thread of `tids`; those raised."""
    out = []
    for t in tids:
        if t in _own:
            continue
        r = raise_thread(t)
        if r is not None:
            _own[t] = r.policy
            out.append(t)
    return out


def recorded(tid: int, policy: int, priority: int) -> tuple[int, int]:
    """The policy and priority a dump records for thread `tid`, read as `policy`, `priority`."""
    own = _own.get(tid)
    if own is not None and policy == POLICY and priority == PRIORITY:
        return own, 0
    return policy, priority


def give_back(pid: int) -> list[int]:
    """Every raised thread (of process `pid`) back to its own policy where it still runs under the
    raise's; those given back. A thread that exited is forgotten (its id may be another's now)."""
    done = []
    for t, own in list(_own.items()):
        del _own[t]
        with contextlib.suppress(OSError):
            if os.path.exists(f"/proc/{pid}/task/{t}") and still_raised(t):
                os.sched_setscheduler(t, own, os.sched_param(0))
                done.append(t)
    return done
