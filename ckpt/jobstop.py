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
hand-over's SIGSTOP (a dump's leave_stopped) is sent after that dump's freeze looked; a migration
continues only that one, never a stop of someone else's (ptrace/freeze.thaw_all, docs/migrate.md).
A dump that leaves the process stopped with ckpt's own SIGSTOP (`--leave-stopped`, the process
running when it came) says so in its layer (task.ckpt_stopped): the next dump of that chain that
finds it in a SIGSTOP stop takes the stop for ckpt's, records the process as running, and passes the
mark on while the stop lasts. (A SIGCONT and a new SIGSTOP of someone else's in between cannot be
told from it; nor can a dump without that parent layer, a new chain, which records the SIGSTOP it
finds.)
A SIGCONT sent while a --leave-stopped dump holds the process frozen does not let it run on: the
user asked for it stopped at the end, so the SIGCONT is taken as sent just before the thaw's
SIGSTOP, which discards it (Frozen._drop_sigcont), and the dump warns that it came.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping
from typing import Any

from ckpt.image.format import TaskRecord
from ckpt.ptrace.freeze import STOP_SIGNALS, Frozen

__all__ = ["STOP_SIGNALS", "job_stop", "stop_name", "stop_record"]


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


def stop_record(
    fz: Frozen, parent: TaskRecord | None, leaves_stopped: bool, pending: Iterable[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The layer's `stop` and `ckpt_stopped` (module docstring). `parent`: the task record of the
    chain's layer below, if any; `leaves_stopped`: this dump's thaw leaves the process stopped;
    `pending`: the layer's pending signals (dicts with "sig"), read in this freeze."""
    stop = job_stop(fz)
    if stop and any(p["sig"] == signal.SIGCONT for p in pending):
        # A SIGCONT that came while the process was frozen ended its group-stop in the kernel and
        # waits, pending, for a thread to run. A layer saying both would be restored stopped, the
        # stop signal flushing that SIGCONT: its handler would never run. The process is running.
        stop = 0
    ours = parent is not None and parent.ckpt_stopped and stop == signal.SIGSTOP
    if ours:
        stop = 0
    # The thaw sends its SIGSTOP only to a process that was not stopped (Frozen._release).
    return {"stop": stop, "ckpt_stopped": ours or (leaves_stopped and not stop)}
