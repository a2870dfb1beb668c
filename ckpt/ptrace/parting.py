"""Letting a stopped thread go straight back into the blocking syscall it was stopped in.

A thread stopped while asleep in pause, read, futex, nanosleep... (a dump's freeze, a restore) holds
the kernel's restart code in rax (-ERESTARTSYS and kin, the syscall in orig_rax). Let go by
PTRACE_DETACH, the kernel rewinds rip over the `syscall` instruction and returns to USER mode: the
thread enters the syscall again from there. A signal that comes after the rewind and before the
`syscall` (the thread preempted on its way out, likely under load) runs its handler first; the
handler returns to the `syscall` instruction and pause() sleeps for ever where, never stopped, it
would have returned EINTR. The target noticed.

So such a thread makes that trip while still traced: resumed with PTRACE_SYSCALL from a stop inside
get_signal (an interrupt-stop; where the kernel's restart logic runs once get_signal finds nothing),
it is caught at its syscall-enter-stop (the expected syscall checked; PTRACE_GET_SYSCALL_INFO tells
the stop from a real SIGTRAP). A signal that comes first is reported to us (a signal-delivery-stop):
the registers go back to the in-syscall ones and the thread is let go delivering it, so the kernel
applies the syscall's restart rules (handler: EINTR; SA_RESTART: the syscall again). An ignored one
is dropped, as the kernel would, and the trip goes on.

From the enter-stop, PTRACE_DETACH would undo it all: the kernel sets TIF_SIGPENDING on every tracee
it detaches from a stop (__ptrace_unlink -> ptrace_signal_wake_up, kernel/ptrace.c), so the syscall
returns at once with its restart code and the thread makes the same trip through user mode again,
untraced. Only a tracer that *exits* lets a tracee go without that wake-up, when the tracee is not
in a stop (exit_ptrace -> __ptrace_unlink wakes only a TASK_TRACED tracee or one with a group stop
pending). So the thread is resumed past its enter-stop (PTRACE_SYSCALL: no wake-up, into its
syscall) without PTRACE_O_EXITKILL, and stays traced until the tracing thread exits, which must be
at once (`in_exiting_thread`: a thread that ends with its function, whose end in the kernel the
caller waits for). Any stop the thread reaches meanwhile is a real event that the kernel then takes
with the original's rules: a signal-delivery-stop keeps its signal (exit_code) and delivers it; a
syscall-exit-stop's code, SIGTRAP|0x80 under TRACESYSGOOD, is no valid signal and is dropped
(ptrace_report_syscall's send_sig).

PTRACE_LISTEN is no way out: it only applies to a group-stop, and the tracee stays traced.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

from ckpt import sysno as nr
from ckpt.errors import CkptError
from ckpt.proc.stat import read_status
from ckpt.ptrace import raw, sigchld
from ckpt.ptrace.batch import DEFAULT_IGNORED
from ckpt.ptrace.regs import MASK64, dict_to_regs, signed64
from ckpt.ptrace.seccomp import PTRACE_SETOPTIONS
from ckpt.ptrace.sigchld import PIDFD_THREAD
from ckpt.threadpool import start as start_thread

RESTARTS = {nr.ERESTARTSYS, nr.ERESTARTNOINTR, nr.ERESTARTNOHAND, nr.ERESTART_RESTARTBLOCK}
MAX_STOPS = 64
GONE_TIMEOUT = 30.0  # s for a thread that returned to be gone from the kernel too
T = TypeVar("T")
_local = threading.local()  # .exits: this thread ends once it has let its tracees go


class PartingError(CkptError):
    """A thread could not be brought back into its syscall (it died, or went elsewhere)."""


def exits_after() -> None:
    """Say that the calling thread ends right after it lets its tracees go, and that its caller waits
    for that end (wait_gone) before anything is reported: into_syscall then leaves threads traced
    inside their syscalls (module docstring)."""
    _local.exits = True


def tracer_exits() -> bool:
    """Whether the calling thread said exits_after()."""
    return bool(getattr(_local, "exits", False))


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


def in_exiting_thread(fn: Callable[[], T], meanwhile: Callable[[], None] | None = None) -> T:
    """fn() run in a thread of its own that says exits_after() and ends when fn returns; its result
    or exception, once that thread has ended in the kernel. `meanwhile()` runs in the caller while
    it waits, and must return once fn has (restore/parent.py serves the restore's forks so). Run
    inside such a thread already: just fn()."""
    if tracer_exits():
        return fn()
    out: list[T] = []
    err: list[BaseException] = []
    fds: list[int] = []

    def run() -> None:
        exits_after()
        fds.append(thread_pidfd())
        try:
            out.append(fn())
        except BaseException as e:  # re-raised in the caller
            err.append(e)
        finally:
            sigchld.close_thread_fd()

    with sigchld.blocked():  # ours stays blocked: the thread's waits get every SIGCHLD
        t = threading.Thread(target=run, name="ckpt-tracer")
        start_thread(t)
        if meanwhile is not None:
            meanwhile()
        t.join()
    if fds:
        wait_gone(fds[0])
    if err:
        raise err[0]
    return out[0]


def restarting(regs: Mapping[str, int]) -> int | None:
    """The syscall a thread with registers `regs` (stopped inside it) goes back into, or None."""
    n = signed64(regs.get("orig_rax", MASK64))
    if n < 0 or -signed64(regs.get("rax", 0)) not in RESTARTS:
        return None
    return n


def ignored(tid: int, sig: int) -> bool:
    """Would the kernel discard `sig` for thread `tid` (SIG_IGN, or not caught and ignored by default)?"""
    try:
        st = read_status(tid)
        ign, cgt = int(st["SigIgn"], 16), int(st["SigCgt"], 16)
    except (CkptError, OSError, KeyError, ValueError):
        return False  # delivered then: the kernel decides, as it would have
    bit = 1 << (sig - 1)
    return bool(ign & bit) or (not cgt & bit and bool(DEFAULT_IGNORED & bit))


def into_syscall(
    tid: int,
    in_syscall: Mapping[str, int],
    want: set[int],
    *,
    options: int = raw.PTRACE_O_TRACESYSGOOD,
    timeout: float = 10.0,
    shared: bool | None = None,
    before_go: Callable[[], None] | None = None,
    started: bool = False,
    first: raw.WaitResult | None = None,
) -> None:
    """Let thread `tid` go once it is back inside one of the syscalls `want` (module docstring).
    It is in a stop inside get_signal (an interrupt- or signal-delivery-stop) with the registers it
    was stopped with in its syscall loaded; `in_syscall` are those, put back when a signal comes
    first. `options`: its ptrace options while it makes the trip (TRACESYSGOOD added). Detached from
    its enter-stop unless the calling thread exits right after (tracer_exits()), then resumed past
    it, traced until then. `shared`: as raw.wait's (None: found out at each wait). `before_go()`
    is called at the last stop, right before the thread is let run by itself (a restored thread
    given its own scheduling policy back there: ckpt/restore/lastsched.py). `started`: start_into()
    was called for it already (a thaw of many threads sends them all on their way before it waits
    for the first: Frozen._start_parting). `first`: a stop of it already waited for (quickstops.c's,
    which met something else than the enter-stop), the thread in it. Raises OSError or PartingError."""
    go = before_go or (lambda: None)
    if not started:
        start_into(tid, options)
    for _ in range(MAX_STOPS):
        if first is not None:
            w: raw.WaitResult | None = first
            first = None
        else:
            w = raw.wait(tid, timeout, keep_exit=True, shared=shared)
        if w is None:
            raise PartingError(f"thread {tid} did not go back into syscall {min(want)}")
        if w.exited:
            raise PartingError(f"thread {tid} died as it was let go")
        if w.is_event_stop:
            if w.sig != signal.SIGTRAP:
                # A group-stop (a SIGSTOP came): detached, it stays in it as job control wants, and
                # SIGCONT wakes it into the kernel's restart as for any stopped process.
                go()
                raw.detach(tid, 0)
                return
            raw.resume_syscall(tid, 0)
            continue  # an interrupt-stop is nothing the thread sees
        if raw.syscall_info_op(tid) == raw.SYSCALL_INFO_ENTRY:
            got = raw.getregs(tid).orig_rax
            if got not in want:
                raise PartingError(f"thread {tid} entered syscall {got}, not {min(want)}")
            go()
            if tracer_exits():
                raw.call(PTRACE_SETOPTIONS, tid, 0, raw.PTRACE_O_TRACESYSGOOD)  # ours ends: not it
                raw.resume_syscall(tid, 0)
            else:
                raw.detach(tid, 0)
            return
        # A signal-delivery-stop: the signal came before the syscall. Taken from inside it.
        raw.setregs(tid, dict_to_regs(dict(in_syscall)))
        if not ignored(tid, w.sig):
            go()
            raw.detach(tid, w.sig)
            return
        raw.resume_syscall(tid, 0)  # (dropped, as the kernel would: on into the syscall)
    raise PartingError(f"thread {tid} kept stopping before its syscall {min(want)}")


def start_into(tid: int, options: int = raw.PTRACE_O_TRACESYSGOOD) -> None:
    """into_syscall's first step: thread `tid`, in a stop inside get_signal with the registers it was
    stopped with in its syscall, resumed to its syscall-enter-stop, which into_syscall(started=True)
    then waits for."""
    # PTRACE_GET_SYSCALL_INFO names a syscall-stop only under TRACESYSGOOD. This also ends
    # PTRACE_O_SUSPEND_SECCOMP: the syscall the thread re-enters passes its filters, as it did.
    raw.call(PTRACE_SETOPTIONS, tid, 0, options | raw.PTRACE_O_TRACESYSGOOD)
    raw.resume_syscall(tid, 0)  # from a stop inside get_signal: the kernel does its restart


def kernel_restart_targets(regs: Mapping[str, int]) -> set[int]:
    """The syscalls a thread stopped inside one (`regs`, as the kernel left them) enters again when
    the kernel restarts it: the same, or restart_syscall for -ERESTART_RESTARTBLOCK (nanosleep,
    poll and futex waits with a timeout continue from the task's restart_block). Empty: none."""
    n = restarting(regs)
    if n is None:
        return set()
    if -signed64(regs["rax"]) == nr.ERESTART_RESTARTBLOCK:
        return {nr.RESTART_SYSCALL}
    return {n}
