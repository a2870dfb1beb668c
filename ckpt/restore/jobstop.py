"""A process dumped in a job-control stop comes back stopped the same way (ckpt/jobstop.py).

The stop is a real group-stop made by the kernel: the layer's stop signal is sent to the restored
process while every thread of it is still held under ptrace, after its pending signals (CRIU sends
its stop_signo the same way). The first thread let go takes it before it returns to user mode (a
thread let go inside its syscall takes it from there: resume.py), so no instruction of the process
runs before the group-stop; its parent's waitpid(WUNTRACED) reports it with that signal, and
SIGCONT continues it (its SIGCONT handler, if any, runs then, as it would have for the original).

Two rules of the kernel shape what can be given back:
- SIGTSTP, SIGTTIN and SIGTTOU are discarded, not acted on, in an orphaned process group (no member
  has a parent in another group of the same session). Where the restored process's group is one,
  it is stopped with SIGSTOP instead (its parent then sees SIGSTOP), and the restore says so.
- Of the signals pending at once the kernel takes a thread's own queue first, then the process's
  shared one, each lowest-numbered first. A signal pending for the stopped original and not blocked
  (a SIGUSR1 sent while it was stopped) is taken by the restored process before the stop, where the
  original takes it after SIGCONT, if it is a thread's own (any number), or shared and numbered
  below the stop signal (which is shared): the restore says so (a warning naming it).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ckpt.errors import CkptError, RestoreError
from ckpt.image.format import PendingSignal, ThreadRecord
from ckpt.jobstop import stop_name
from ckpt.proc.tree import read_ids
from ckpt.restore import caller

if TYPE_CHECKING:
    from ckpt.restore.plan import RestorePlan
    from ckpt.restore.restorer import RestoredProcess

__all__ = [
    "early_signals",
    "exiting_after",
    "orphaned_group",
    "stop_as_dumped",
    "stop_restored",
    "stopped_lines",
]

_DISCARDED_WHEN_ORPHANED = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def orphaned_group(pid: int, leaving: int = 0) -> bool:
    """Is the process group of `pid` orphaned, as the kernel's will_become_orphaned_pgrp() sees it:
    no member has a parent outside the group but inside the same session (init does not count).
    `leaving`: a process about to exit (ckpt): not counted, nor its children (reparented then)."""
    me = read_ids(pid)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            m = read_ids(int(name))
        except (CkptError, OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if m.pgid != me.pgid or m.state in ("Z", "X") or m.ppid <= 1:
            continue
        if leaving and leaving in (m.pid, m.ppid):
            continue
        try:
            parent = read_ids(m.ppid)
        except (CkptError, OSError, IndexError, ValueError):
            continue
        if parent.pgid != me.pgid and parent.sid == me.sid:
            return False
    return True


def early_signals(stop: int, pending: Iterable[PendingSignal], threads: Iterable[ThreadRecord]) -> list[int]:
    """Pending signals the restored process takes before its stop (module docstring): not blocked
    by the thread that holds it, whatever its number (the thread's own queue is dequeued before the
    shared one, where the stop signal is); a shared one numbered below the stop signal and not
    blocked by every thread. SIGCONT cannot be pending in a stopped process; SIGKILL ends it anyway."""
    masks = {t.tid: t.sigmask for t in threads}
    out: set[int] = set()
    for p in pending:
        if (p.shared and p.sig >= stop) or p.sig in (signal.SIGKILL, signal.SIGCONT):
            continue
        bit = 1 << (p.sig - 1)
        if p.shared:
            if any(not m & bit for m in masks.values()):
                out.add(p.sig)
        elif not masks.get(p.tid, 0) & bit:
            out.add(p.sig)
    return sorted(out)


# The pid of a ckpt that exits once its restores are made (0: none). A plain global, not a
# ContextVar: a tree's restores run in threads of their own.
_leaving = [0]


@contextlib.contextmanager
def exiting_after(yes: bool = True) -> Iterator[None]:
    """Restores made inside: ckpt exits once they are made (`ckpt restore --detach`), so a group is
    judged orphaned or not as it will be then; a SIGTSTP that the group holds only through ckpt
    would be discarded once ckpt is gone, before the process took it."""
    before, _leaving[0] = _leaving[0], caller.pid() if yes else 0
    try:
        yield
    finally:
        _leaving[0] = before


def stop_restored(pid: int, stop: int) -> tuple[int, str]:
    """Queue the stop signal `stop` to the restored process `pid` (every thread still held under
    ptrace). Returns the signal sent and a note ("" when it is the dumped one)."""
    sig, note = stop, ""
    if stop in _DISCARDED_WHEN_ORPHANED:
        try:
            orphaned = orphaned_group(pid, leaving=_leaving[0])
        except (CkptError, OSError, IndexError, ValueError) as e:
            raise RestoreError(f"cannot read the process group of restored process {pid}: {e}") from None
        if orphaned:
            sig = signal.SIGSTOP
            note = (
                f"process {pid} is stopped with SIGSTOP, not {stop_name(stop)} as dumped: its process "
                f"group is orphaned here, where the kernel discards {stop_name(stop)}"
            )
    try:
        os.kill(pid, sig)
    except OSError as e:
        raise RestoreError(f"cannot stop restored process {pid} ({stop_name(sig)}): {e.strerror}") from None
    return sig, note


def stop_as_dumped(pid: int, plan: RestorePlan) -> tuple[int, list[str]]:
    """The restore's hook, after the pending signals are queued and before any thread is let go:
    the stop signal sent (0: the process was dumped running) and what the restore must say."""
    stop = plan.task.stop
    if not stop:
        return 0, []
    sig, note = stop_restored(pid, stop)
    notes = [note] if note else []
    early = early_signals(sig, plan.task.pending, [plan.thread, *plan.threads])
    if early:
        names = ", ".join(stop_name(s) for s in early)
        notes.append(
            f"process {pid} takes its pending {names} before it stops again: the kernel delivers "
            f"a thread's own signals, then lower-numbered ones, first (the original, stopped, takes "
            f"them at SIGCONT)"
        )
    return sig, notes


def stopped_lines(rp: RestoredProcess, detach: bool = False) -> list[str]:
    """What `ckpt restore` says of each restored process it left stopped (the root, a tree's
    members): one line each. `detach`: ckpt exits next; a stopped process whose group that exit
    leaves orphaned is sent SIGHUP and SIGCONT by the kernel (POSIX job control), which it says."""
    stops = [(m["pid"], m.get("stopped", 0)) for m in rp.tree] if rp.tree else [(rp.pid, rp.stopped)]
    out = []
    for pid, sig in stops:
        if not sig:
            continue
        name = stop_name(sig)
        line = f"process {pid} left stopped ({name}), as it was dumped: kill -CONT {pid} continues it"
        with contextlib.suppress(CkptError, OSError, IndexError, ValueError):
            if detach and orphaned_group(pid, leaving=caller.pid()):
                line += (
                    "; warning: ckpt's exit leaves its process group orphaned (unless a subreaper in "
                    "its session adopts it), and the kernel sends such a group, with a stopped process "
                    "in it, SIGHUP and SIGCONT: restore without --detach to keep it stopped"
                )
        out.append(line)
    return out
