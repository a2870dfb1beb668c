"""The job-control stop of a dumped process: which stop signal held it in a group-stop, if any.

A process stopped by SIGSTOP, SIGTSTP, SIGTTIN or SIGTTOU (Ctrl-Z, `kill -STOP`, a background job
reading its terminal) is in a group-stop: state T, its parent told (waitpid WUNTRACED), waiting for
SIGCONT. A dump records it, so that the restored process comes back stopped the same way instead of
running (CRIU's TASK_STOPPED and stop_signo in its core image).

The stop signal is read where the kernel reports it: PTRACE_SEIZE of a task in group-stop re-traps
it, and its first stop is a PTRACE_EVENT_STOP whose WSTOPSIG is the signal of the group-stop (an
interrupt-stop says SIGTRAP): Frozen.group_stops, taken from the freeze's first stops.

No stop of ckpt's own is taken for the process's: the freeze is a ptrace-stop (state t), never a
group-stop; the migration's SIGSTOP duty cycle is lifted (SIGCONT, which wakes the process before
kill() returns) at the "seize" phase, before the freeze looks (dump.py, migrate/source.py); the
hand-over's SIGSTOP (a dump's leave_stopped) is sent after that dump's freeze looked, and a stopped
process is refused by `ckpt migrate` before anything (migrate/refuse.py). A process that an earlier
`dump --leave-stopped` left stopped is, for the next dump, stopped by a SIGSTOP like any other:
that dump records it (the process is stopped, and the restored one is too; `kill -CONT` runs it).
"""

from __future__ import annotations

import signal

from ckpt.ptrace.freeze import STOP_SIGNALS, Frozen

__all__ = ["STOP_SIGNALS", "job_stop", "stop_name"]


def job_stop(fz: Frozen) -> int:
    """The stop signal of the group-stop the frozen process was in (0: it was not). Every thread of a
    stopped process is in the same group-stop, with the same signal; the leader's is taken first.
    A thread that reported none (a group-stop still spreading when the freeze came) is put back
    into it by the thaw's detach all the same (the kernel reinstates the pending stop)."""
    stops = fz.group_stops
    live = set(fz.tids)
    if fz.pid in stops and fz.pid in live:
        return stops[fz.pid]
    return next((s for t, s in sorted(stops.items()) if t in live), 0)


def stop_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
