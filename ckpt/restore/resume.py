"""Letting a restored thread go back into the syscall it was dumped in, before anyone sees it run.

A thread dumped inside a blocking syscall (pause, read, futex, nanosleep...) is restored with the
kernel's restart marker in rax (-ERESTARTSYS and kin, the syscall in orig_rax; task.resume_regs
turns -ERESTART_RESTARTBLOCK into a re-issue). Let go, the kernel rewinds rip over the `syscall`
instruction and returns to USER mode: the thread enters the syscall again from there. A signal that
comes after the rewind and before the `syscall` (the thread preempted on its way out, which a
loaded machine makes likely) runs the handler first; the handler returns to the `syscall`
instruction and pause() sleeps for ever, where the original, asleep in the kernel, would have
returned EINTR. A different process (tests/test_restore_tree.py hung on it).

So such a thread makes that trip while still traced (the mechanism, shared with the dump's thaw:
ckpt/ptrace/parting.py): resumed with PTRACE_SYSCALL, it is caught at
its syscall-enter-stop (the expected syscall checked; PTRACE_GET_SYSCALL_INFO tells the stop from a
real SIGTRAP). A signal that comes first is reported to us (a signal-delivery-stop): the registers go
back to the dumped in-syscall state and the thread is let go delivering it, so the kernel applies
the original's restart rules (handler: EINTR; SA_RESTART: the syscall again; a stop signal: the
syscall again at SIGCONT, as for the original). An ignored one is dropped, as the kernel would, and
the thread resumed towards its syscall as before. -ERESTART_RESTARTBLOCK is put back as
-ERESTARTNOHAND: the same rules, with the re-issue the restore chose over restart_syscall.

From the syscall-enter-stop, PTRACE_DETACH would undo it all: the kernel sets TIF_SIGPENDING on
every tracee it detaches from a stop (__ptrace_unlink -> ptrace_signal_wake_up), so the syscall
returns at once with its restart code and the thread makes the same trip through user mode again,
untraced (a nanosleep restored so is found in restart_syscall). Only a tracer that *exits* lets a
tracee go without that wake-up, when the tracee is not in a stop (exit_ptrace). So every restore
runs in a thread of its own that ends with it (`in_tracer_thread`: restorer.restore_process, hence
`ckpt restore` with or without --detach, the API, trees and `ckpt serve`'s cold restore; the warm
restore's own thread ends after its final restore, migrate/warm.py): such a thread is resumed past
the enter-stop (PTRACE_SYSCALL: no wake-up, into its syscall) with EXITKILL cleared, and stays
traced until that thread exits, which the caller waits for (wait_gone) before it reports the
process running; any stop it reaches meanwhile is a real event (a signal), which the kernel then
takes with the original's rules (a signal-delivery-stop keeps its signal; a syscall-exit-stop's
code, SIGTRAP|0x80 under TRACESYSGOOD, is no valid signal and is dropped). Only a thread that did
not say so (exits_after) detaches from the enter-stop (one untraced trip, as after a plain detach).
The restored process is a child of the thread that called the restore, or of ckpt's long-lived
parent thread (parent.py), never of the thread that ends, so a parent-death signal it asked for
comes only when that thread ends (for `ckpt restore` and `ckpt serve`: their main thread, with ckpt).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.ptrace import raw
from ckpt.ptrace.parting import (
    PartingError,
    exits_after,
    in_exiting_thread,
    into_syscall,
    restarting,
    thread_pidfd,
    tracer_exits,
    wait_gone,
)
from ckpt.ptrace.regs import MASK64, signed64
from ckpt.restore import cancel, parent
from ckpt.restore.helper import PTRACE_O_EXITKILL

ENTER_TIMEOUT = 10.0
T = TypeVar("T")

__all__ = [
    "exits_after",
    "in_tracer_thread",
    "let_run",
    "restarting",
    "thread_pidfd",
    "tracer_exits",
    "wait_gone",
]


def _in_syscall(regs: Mapping[str, int]) -> dict[str, int]:
    """The dumped in-syscall registers, to take a signal from (module docstring)."""
    r = dict(regs)
    if -signed64(r["rax"]) == nr.ERESTART_RESTARTBLOCK:
        r["rax"] = -nr.ERESTARTNOHAND & MASK64
    return r


def let_run(tid: int, regs: Mapping[str, int] | None, before_go: Callable[[], None] | None = None) -> None:
    """Detach restored thread `tid`, stopped with its dumped registers `regs` loaded; one dumped in
    a restartable syscall is detached only once it is back inside that syscall (ptrace/parting.py).
    `before_go()`: at its last stop, right before it runs by itself."""
    want = restarting(regs) if regs is not None else None
    try:
        if want is None:
            if before_go is not None:
                before_go()
            raw.detach(tid, 0)
            return
        assert regs is not None
        into_syscall(tid, _in_syscall(regs), {want}, options=PTRACE_O_EXITKILL, timeout=ENTER_TIMEOUT,
                     before_go=before_go)  # fmt: skip
    except PartingError as e:
        raise RestoreError(f"restored {e}") from None
    except OSError as e:
        raise RestoreError(f"cannot let restored thread {tid} run: {e.strerror}") from None


def in_tracer_thread(fn: Callable[[], T]) -> T:
    """fn() run in a thread of its own that ends when it returns, so that every restored thread left
    traced inside its syscall is let go by the kernel without a wake-up (module docstring). Its
    result or exception, once that thread has ended in the kernel. Run inside such a thread already:
    just fn(). The restored process's parent is not that thread but the caller's (parent.py), which
    forks the helper for it meanwhile: a parent-death signal comes when the caller's thread ends."""
    if tracer_exits():
        return fn()
    jobs = parent.Jobs()
    stop = cancel.Cancel()

    def run() -> T:
        parent.parent_is(jobs)  # the helper is forked by the caller, which outlives this thread
        cancel.attach(stop)
        try:
            return fn()
        finally:
            jobs.put(None)

    def serve() -> None:
        # A Ctrl-C (KeyboardInterrupt, raised in this thread) cancels the restore, which stops
        # before its process runs and kills it (restore/cancel.py); this thread goes on serving its
        # forks until it ends, and its KeyboardInterrupt is what in_exiting_thread raises then.
        while True:
            try:
                parent.serve(jobs)
                return
            except KeyboardInterrupt:
                stop.set()

    try:
        return in_exiting_thread(run, serve)
    finally:
        jobs.close()
