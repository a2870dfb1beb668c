"""Short freezes whose thaw lets every thread go straight back into its syscall, and the SIGCONT of a
process that a dump left stopped.

A thread that the thaw of a freeze (or the SIGCONT of a group-stop) lets go from inside a blocking
syscall re-enters it through user mode, where a signal that comes first runs its handler before the
restarted call, which then sleeps on (ptrace/parting.py). `ckpt dump` thaws from a thread that ends
for that reason (dump.run_handed_over); so do the other freezes of a live process here.

A process left stopped (`--leave-stopped`, a migration's final round) is in its group-stop inside
get_signal, its restart code still in its registers: the stop itself needed no trip through user
mode. A plain SIGCONT would make that trip untraced. `continue_stopped` instead seizes every thread
(a seized thread in group-stop is held in a ptrace-stop, PTRACE_SEIZE of a stopped task), sends the
SIGCONT while all are held (Frozen.end_group_stop: the group-stop ends, the parent is told
CLD_CONTINUED as ever, and the SIGCONT is delivered or dropped as the process's disposition says),
then thaws from a thread that ends: each thread goes back into its syscall traced.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable
from typing import TypeVar

from ckpt.errors import CkptError, TargetExited
from ckpt.ptrace.freeze import Frozen
from ckpt.ptrace.parting import in_exiting_thread
from ckpt.ptrace.signals import deferred_signals

T = TypeVar("T")


def frozen_briefly(pid: int, fn: Callable[[Frozen], T]) -> T:
    """fn(frozen) with process `pid` frozen, in a thread that ends right after the thaw (Ctrl-C
    deferred meanwhile). Its result or exception."""

    def run() -> T:
        with Frozen(pid) as fz:
            return fn(fz)

    with deferred_signals():
        return in_exiting_thread(run)


def continue_stopped(pids: Iterable[int]) -> list[str]:
    """SIGCONT to each of `pids` (stopped, or maybe stopped: a running one just gets its SIGCONT),
    each thread left inside the syscall it was stopped in (module docstring). A process that cannot
    be frozen gets a plain SIGCONT, so that none stays stopped; returns what went so, one line each.
    Processes that are gone are skipped."""
    order = list(dict.fromkeys(pids))

    def run() -> list[str]:
        held: list[Frozen] = []
        notes: list[str] = []
        try:
            for p in order:
                fz = Frozen(p)
                try:
                    fz.freeze()
                except TargetExited:
                    continue
                except CkptError as e:
                    notes.append(f"process {p} was sent a plain SIGCONT ({e})")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGCONT)
                    continue
                held.append(fz)
            # All held before any goes on: the processes continue together, as from one kill(-pgid).
            for fz in held:
                with contextlib.suppress(TargetExited, ProcessLookupError):
                    fz.end_group_stop()
        finally:
            for fz in held:
                try:
                    fz.thaw()
                except CkptError as e:
                    notes.append(f"process {fz.pid}: {e}")
                if fz.was_stopped:  # not reached (a failure above): it must not stay stopped
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(fz.pid, signal.SIGCONT)
        return notes

    with deferred_signals():
        return in_exiting_thread(run)


__all__ = ["continue_stopped", "frozen_briefly"]
