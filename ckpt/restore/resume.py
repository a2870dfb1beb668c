"""Letting a restored thread go back into the syscall it was dumped in, before anyone sees it run.

A thread dumped inside a blocking syscall (pause, read, futex, nanosleep...) is restored with the
kernel's restart marker in rax (-ERESTARTSYS and kin, the syscall in orig_rax; task.resume_regs
turns -ERESTART_RESTARTBLOCK into a re-issue). Let go, the kernel rewinds rip over the `syscall`
instruction and returns to USER mode: the thread enters the syscall again from there. A signal that
comes after the rewind and before the `syscall` (the thread preempted on its way out, which a
loaded machine makes likely) runs the handler first; the handler returns to the `syscall`
instruction and pause() sleeps for ever, where the original, asleep in the kernel, would have
returned EINTR. A different process (tests/test_restore_tree.py hung on it).

So such a thread makes that trip while still traced: resumed with PTRACE_SYSCALL, it is caught at
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

import os
import queue
import select
import signal
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

from ckpt import sysno as nr
from ckpt.errors import CkptError, RestoreError
from ckpt.proc.stat import read_status
from ckpt.ptrace import raw, sigchld
from ckpt.ptrace.regs import MASK64, dict_to_regs, signed64
from ckpt.ptrace.seccomp import PTRACE_SETOPTIONS
from ckpt.ptrace.sigchld import PIDFD_THREAD
from ckpt.restore import parent
from ckpt.restore.helper import PTRACE_O_EXITKILL

RESTARTS = {nr.ERESTARTSYS, nr.ERESTARTNOINTR, nr.ERESTARTNOHAND, nr.ERESTART_RESTARTBLOCK}
ENTER_TIMEOUT = 10.0
MAX_STOPS = 64
GONE_TIMEOUT = 30.0  # s for a tracer thread that returned to be gone from the kernel too
_tracer = threading.local()  # .exits: this thread ends once the restore has let its process go
T = TypeVar("T")
DEFAULT_IGNORED = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH}


def restarting(regs: Mapping[str, int]) -> int | None:
    """The syscall a thread with dumped `regs` goes back into when it runs, or None."""
    n = signed64(regs.get("orig_rax", MASK64))
    if n < 0 or -signed64(regs.get("rax", 0)) not in RESTARTS:
        return None
    return n


def _in_syscall(regs: Mapping[str, int]) -> dict[str, int]:
    """The dumped in-syscall registers, to take a signal from (module docstring)."""
    r = dict(regs)
    if -signed64(r["rax"]) == nr.ERESTART_RESTARTBLOCK:
        r["rax"] = -nr.ERESTARTNOHAND & MASK64
    return r


def _ignored(tid: int, sig: int) -> bool:
    """Would the kernel discard `sig` for thread `tid` (SIG_IGN, or not caught and ignored by default)?"""
    try:
        st = read_status(tid)
        ign, cgt = int(st["SigIgn"], 16), int(st["SigCgt"], 16)
    except (CkptError, OSError, KeyError, ValueError):
        return False  # delivered then: the kernel decides, as it would have
    bit = 1 << (sig - 1)
    return bool(ign & bit) or (not cgt & bit and sig in DEFAULT_IGNORED)


def let_run(tid: int, regs: Mapping[str, int] | None) -> None:
    """Detach restored thread `tid`, stopped with its dumped registers `regs` loaded; one dumped in
    a restartable syscall is detached only once it is back inside that syscall."""
    want = restarting(regs) if regs is not None else None
    try:
        if want is None:
            raw.detach(tid, 0)
            return
        assert regs is not None
        # PTRACE_GET_SYSCALL_INFO names a syscall-stop only under TRACESYSGOOD. This also ends
        # PTRACE_O_SUSPEND_SECCOMP (creds.py): the syscall the thread re-enters passes its filters,
        # as the original's did; no syscall of ours follows.
        raw.call(PTRACE_SETOPTIONS, tid, 0, PTRACE_O_EXITKILL | raw.PTRACE_O_TRACESYSGOOD)
        for _ in range(MAX_STOPS):
            raw.resume_syscall(tid, 0)  # from a signal-delivery-stop: the kernel does its restart
            w = raw.wait(tid, ENTER_TIMEOUT, keep_exit=True)
            if w is None:
                raise RestoreError(f"restored thread {tid} did not go back into syscall {want}")
            if w.exited:
                raise RestoreError(f"restored thread {tid} died as it was let go")
            if w.is_event_stop:
                continue  # an interrupt-stop is nothing the thread sees
            if raw.syscall_info_op(tid) == raw.SYSCALL_INFO_ENTRY:
                got = raw.getregs(tid).orig_rax
                if got != want:
                    raise RestoreError(f"restored thread {tid} entered syscall {got}, not {want}")
                if tracer_exits():
                    raw.call(PTRACE_SETOPTIONS, tid, 0, raw.PTRACE_O_TRACESYSGOOD)  # ours ends: not it
                    raw.resume_syscall(tid, 0)
                else:
                    raw.detach(tid, 0)
                return
            # A signal-delivery-stop: the signal came before the syscall. Taken from inside it.
            raw.setregs(tid, dict_to_regs(_in_syscall(regs)))
            if not _ignored(tid, w.sig):
                raw.detach(tid, w.sig)
                return
        raise RestoreError(f"restored thread {tid} kept stopping before its syscall {want}")
    except OSError as e:
        raise RestoreError(f"cannot let restored thread {tid} run: {e.strerror}") from None


def exits_after() -> None:
    """Say that the calling thread ends once the restore it runs has let its process go, and that
    nothing reports the process running before it has ended (wait_gone): let_run then leaves such
    threads traced inside their syscalls (module docstring). For a thread ckpt made for a restore
    (in_tracer_thread, the warm restore's own thread)."""
    _tracer.exits = True


def tracer_exits() -> bool:
    """Whether the calling thread said exits_after()."""
    return bool(getattr(_tracer, "exits", False))


def thread_pidfd(tid: int | None = None) -> int:
    """A pidfd of our thread `tid` (the caller's by default; PIDFD_THREAD: readable once that
    thread, not its process, has exited), or -1 where the kernel has none (before 6.9)."""
    try:
        return os.pidfd_open(threading.get_native_id() if tid is None else tid, PIDFD_THREAD)
    except OSError:
        return -1


def wait_gone(pidfd: int, timeout: float = GONE_TIMEOUT) -> None:
    """Return once the thread of `pidfd` (thread_pidfd()) has exited in the kernel, and close it.
    Thread.join() is not enough: Python lets a join return when the thread's state is freed, and
    even glibc's pthread_join when the kernel clears the tid (exit_mm), both before do_exit reaches
    exit_notify, where exit_ptrace lets the tracees go; a thread pidfd turns readable after that
    (exit_notify sets exit_state after forget_original_parent)."""
    if pidfd < 0:
        return
    try:
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        p.poll(int(timeout * 1000))  # it has returned from Python: its exit is under way
    finally:
        os.close(pidfd)


def in_tracer_thread(fn: Callable[[], T]) -> T:
    """fn() run in a thread of its own that ends when it returns, so that every restored thread left
    traced inside its syscall is let go by the kernel without a wake-up (module docstring). Its
    result or exception, once that thread has ended in the kernel. Run inside such a thread already:
    just fn(). The restored process's parent is not that thread but the caller's (parent.py), which
    forks the helper for it meanwhile: a parent-death signal comes when the caller's thread ends."""
    if tracer_exits():
        return fn()
    out: list[T] = []
    err: list[BaseException] = []
    fds: list[int] = []
    jobs: parent.Jobs = queue.SimpleQueue()

    def run() -> None:
        exits_after()
        parent.parent_is(jobs)  # the helper is forked by the caller, which outlives this thread
        fds.append(thread_pidfd())
        try:
            out.append(fn())
        except BaseException as e:  # re-raised in the caller
            err.append(e)
        finally:
            jobs.put(None)

    with sigchld.blocked():  # ours stays blocked: the tracer thread's waits get every SIGCHLD
        t = threading.Thread(target=run, name="ckpt-restore")
        t.start()
        parent.serve(jobs)
        t.join()
    if fds:
        wait_gone(fds[0])
    if err:
        raise err[0]
    return out[0]
