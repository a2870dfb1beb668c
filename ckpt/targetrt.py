"""Threads of a target that ckpt raised to real-time for a while (a migration's final freeze:
ckpt/migrate/targetboost.py), and the policy each had: what a dump records for them instead of
the raise (ckpt/proc/props.py), so that the copy never comes back real-time because of ckpt.

Raising (ckpt/rtprio.py's primitive: SCHED_FIFO 1 with SCHED_RESET_ON_FORK) keeps the nice value
aside, so only the policy, its priority and the timer slack are put back here: the kernel reads a
real-time thread's slack as 0, ignores writes to it meanwhile, and gives the default (50000 ns) back
with SCHED_OTHER, so the slack is saved before the raise and written back after. A thread whose
policy is no longer exactly the raise's changed it itself after the raise: its own is what it has,
and is read as is."""

from __future__ import annotations

import contextlib
import os

from ckpt.rtprio import POLICY, PRIORITY, raise_thread

_own: dict[int, int] = {}  # tid -> its policy before the raise (SCHED_OTHER's priority is 0)
_slack: dict[int, int] = {}  # tid -> its timer slack before the raise (ns)


def raised() -> dict[int, int]:
    return dict(_own)


def read_slack(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/timerslack_ns") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def write_slack(tid: int, slack: int) -> OSError | None:
    """The thread's timer slack set; the error, if any (the thread may be gone, or its slack not
    ours to write: the callers take it as best effort)."""
    try:
        with open(f"/proc/{tid}/timerslack_ns", "w") as f:
            f.write(str(slack))
    except OSError as e:
        return e
    return None


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
        slack = read_slack(t)  # before: a real-time thread's reads 0
        r = raise_thread(t)
        if r is not None:
            _own[t] = r.policy
            if slack is not None:
                _slack[t] = slack
            out.append(t)
    return out


def recorded(tid: int, policy: int, priority: int) -> tuple[int, int]:
    """The policy and priority a dump records for thread `tid`, read as `policy`, `priority`."""
    own = _own.get(tid)
    if own is not None and policy == POLICY and priority == PRIORITY:
        return own, 0
    return policy, priority


def recorded_slack(tid: int, slack: int) -> int:
    """The timer slack a dump records for thread `tid`, read as `slack` (0 while raised)."""
    own = _slack.get(tid)
    return own if own is not None and tid in _own else slack


def give_back(pid: int) -> list[int]:
    """Every raised thread (of process `pid`) back to its own policy where it still runs under the
    raise's; those given back. A thread that exited is forgotten (its id may be another's now)."""
    done = []
    for t, own in list(_own.items()):
        with contextlib.suppress(OSError):
            if os.path.exists(f"/proc/{pid}/task/{t}") and still_raised(t):
                os.sched_setscheduler(t, own, os.sched_param(0))
                slack = _slack.get(t)
                if slack is not None:
                    write_slack(t, slack)  # (SCHED_OTHER came back with the default)
                done.append(t)
        # Only now: interrupted before, it is still ours to give back (ckpt/migrate/source.py).
        _own.pop(t, None)
        _slack.pop(t, None)
    return done
