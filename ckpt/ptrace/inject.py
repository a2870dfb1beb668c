"""Remote syscalls: run one ``syscall`` instruction in a stopped thread with registers we choose.

The caller (Frozen.syscall) saves the thread's registers, points rip at a ``0f 05`` and loads the
syscall number and arguments; this module runs the thread to that syscall's exit with
PTRACE_SYSCALL and sorts out what the kernel reports meanwhile. See docs/internals.md (ptrace/) and
/work/shared/KERNEL-NOTES.md.

Why each step:
- orig_rax = -1: a thread stopped inside a blocking syscall is stopped in the kernel's signal path
  with orig_rax = its syscall and rax = -ERESTARTSYS. Left as is, the restart logic would rewind rip
  by 2 and rerun *that* syscall instead of ours. The saved registers (orig_rax included) go back
  afterwards, so the interrupted syscall restarts exactly as it would have.
- PTRACE_SYSCALL, not SINGLESTEP: a syscall-entry stop, then a syscall-exit stop with the result in
  rax. Neither is a signal. A single-step trap is a SIGTRAP the kernel *forces*: where the target
  blocks or ignores SIGTRAP, forcing unblocks it in the thread's mask and resets its action to
  SIG_DFL (and a blocked, pending one becomes fatal), so every injection changed such a target.
  (Seized with PTRACE_O_TRACESYSGOOD: a syscall-stop reports SIGTRAP|0x80, apart from real SIGTRAPs.)
  The exception, step_over_syscall: a call that never blocks (the batch's code mmap and munmap, in
  every freeze) in a thread that neither blocks nor ignores SIGTRAP, where the forced signal changes
  nothing and is taken off at its stop: one stop instead of two.
- Other stops on the way: a pending PTRACE_INTERRUPT or group-stop trap (resume again); a signal
  that arrives is taken off the thread (we suppress it) and kept in the thread's ``held`` list so
  thaw can deliver it again: the target loses nothing.
- Signals are not kept out by blocking them (PTRACE_SETSIGMASK) during the step: that clears the
  kernel's restore-sigmask flag, and a thread inside ppoll/pselect/epoll_pwait/sigsuspend would keep
  the syscall's temporary mask for good.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ckpt import sysno as nr
from ckpt.errors import InjectionError, TargetExited
from ckpt.proc import read_maps
from ckpt.proc.maps import Vma
from ckpt.ptrace import raw
from ckpt.ptrace.batch import Call, Plan, Result
from ckpt.ptrace.mem import ProcMem
from ckpt.ptrace.regs import signed64
from ckpt.ptrace.tracee import TracedThread

SYSCALL_INSN = b"\x0f\x05"


PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000

KSIGACTION = struct.Struct("<QQQQ")  # x86_64 kernel struct sigaction: handler, flags, restorer, mask


@dataclass(frozen=True)
class SigAction:
    sig: int
    handler: int  # SIG_DFL = 0, SIG_IGN = 1, otherwise the handler's address
    flags: int  # SA_* (SA_SIGINFO, SA_RESTART, SA_RESTORER, ...)
    restorer: int
    mask: int  # signals blocked while the handler runs (bit n-1 = signal n)

    def to_dict(self) -> dict[str, int]:
        # dataclasses.asdict deep-copies field by field: 64 of them cost ~1.5 ms of a freeze.
        return {
            "sig": self.sig,
            "handler": self.handler,
            "flags": self.flags,
            "restorer": self.restorer,
            "mask": self.mask,
        }


class InjectionTimeout(InjectionError):
    """The injected syscall did not return in time (it blocked)."""


def find_vdso_syscall(pid: int, mem: ProcMem, vmas: Sequence[Vma] | None = None) -> int | None:
    """Address of a ``0f 05`` inside the target's [vdso], or None.

    The vdso's fallback paths (clock_gettime & co.) contain a real syscall instruction. Any two
    bytes ``0f 05`` will do, even inside a longer instruction: we jump straight to them and the CPU
    decodes from there. Using it needs no code modification at all. ``vmas``: the mappings, read
    while the process is frozen (else read here).
    """
    for vma in read_maps(pid) if vmas is None else vmas:
        if vma.path == "[vdso]":
            # Every process's [vdso] of one size is the kernel's same image: where the last search
            # found the instruction in one, its two bytes are looked at first (a debugger may have
            # patched a process's copy: then searched again).
            at = _vdso_sites.get(vma.size)
            if at is not None and mem.read(vma.start + at, len(SYSCALL_INSN)) == SYSCALL_INSN:
                return vma.start + at
            i = mem.read(vma.start, vma.size).find(SYSCALL_INSN)
            if i >= 0:
                _vdso_sites[vma.size] = i
            return vma.start + i if i >= 0 else None
    return None


_vdso_sites: dict[int, int] = {}  # [vdso]'s size -> where find_vdso_syscall last found 0f 05 in one


Waiter = Callable[[int, float], "raw.WaitResult | None"]  # (tid, timeout): raw.wait with the caller's policy


def step_syscall(pid: int, th: TracedThread, site: int, timeout: float, wait: Waiter) -> int:
    """Run the ``syscall`` at ``site`` in thread ``th`` (its registers already loaded) to its exit;
    returns its result (signed, -errno on failure).

    On return, and after an InjectionTimeout, the thread is in a ptrace-stop again, so the caller can
    restore its registers.
    """
    tid = th.tid
    done_rip = site + len(SYSCALL_INSN)
    entered = False
    # Each stop that is not ours costs one more resume; a flood of queued signals can mean hundreds.
    # Bound the whole call by time, not by a count of stops.
    deadline = time.monotonic() + timeout
    while True:
        th.resume_syscall()
        w = wait(tid, max(deadline - time.monotonic(), 0.0))
        if w is None:
            _restop(pid, th, timeout, wait)
            raise InjectionTimeout(
                f"an injected syscall in thread {tid} of process {pid} did not return within {timeout:g}s"
            )
        th.note(w)
        if w.exited:
            raise TargetExited(f"process {pid} exited during the dump")
        if w.is_syscall_stop:
            op, rip, rval = raw.syscall_info(tid)  # one request: no full register read per stop
            if rip != done_rip:
                raise InjectionError(
                    f"thread {tid} of process {pid} made a syscall at {rip - 2:#x} instead of {site:#x} "
                    "during an injected syscall"
                )
            if op == raw.SYSCALL_INFO_EXIT and entered:
                return rval
            entered = True
            continue
        if w.is_signal_stop:
            th.hold(w.sig)  # someone's signal: taken off now, given back at thaw
        # else an interrupt- or group-stop: resume again


TRAP_BRKPT = 1  # si_code of the SIGTRAP the kernel forces at a single-stepped syscall's exit (x86)
SIGTRAP_BIT = 1 << (signal.SIGTRAP - 1)


def is_step_trap(tid: int, sig: int) -> bool:
    """The stop's signal is the SIGTRAP the kernel forces at the end of a single-step (si_code
    TRAP_BRKPT), not one someone sent (or a TRAP_PERF). OSError: the thread is gone."""
    return sig == signal.SIGTRAP and raw.siginfo_code(raw.getsiginfo(tid)) == TRAP_BRKPT


def step_over_syscall(
    pid: int,
    th: TracedThread,
    site: int,
    timeout: float,
    wait: Waiter,
    started: bool = False,
    first: raw.WaitResult | None = None,
    left: float | None = None,
) -> int:
    """Like step_syscall, in one stop instead of two: PTRACE_SINGLESTEP over the ``syscall`` at
    ``site``; the kernel reports the step at the syscall's exit with a SIGTRAP it forces, and its
    signal-delivery-stop (rip just past the instruction) is where the result is read; the signal is
    suppressed there (the resume passes 0). For a call that never blocks (mmap, munmap).

    Only for a thread that neither blocks nor ignores SIGTRAP (the caller checks): forcing a SIGTRAP
    on such a thread unblocks it and resets its action to SIG_DFL. A handler the target installed is
    not run (the stop takes the signal first). A signal that stops the thread before the syscall ran
    (rip still at ``site``: queued meanwhile) is held for thaw, as step_syscall holds it, and the step
    taken again. A SIGTRAP someone else sent that merged with the forced one (a standard signal
    queues once) shows by its siginfo: it is held too, and so given back at thaw.

    Taking over from quickstops.c, which met something else than the step's end: ``started``, the
    step was taken and its stop not yet waited for; ``first``, the stop it met (the thread in it);
    ``left``: the time left to wait for the step's end (else ``timeout``, which a thread that must
    be stopped again is given in any case)."""
    tid = th.tid
    done_rip = site + len(SYSCALL_INSN)
    deadline = time.monotonic() + (timeout if left is None else left)
    w: raw.WaitResult | None
    while True:
        if first is not None:
            w, first = first, None
        else:
            if not started:
                raw.singlestep(tid)  # data 0: a signal it was stopped for is suppressed (already held)
                th.stopped = False
            started = False
            w = wait(tid, max(deadline - time.monotonic(), 0.0))
        if w is None:
            late = _restop_step(pid, th, done_rip, timeout, wait)
            if late is not None:
                return late
            raise InjectionTimeout(
                f"an injected syscall in thread {tid} of process {pid} did not return within {timeout:g}s"
            )
        th.note(w)
        if w.exited:
            raise TargetExited(f"process {pid} exited during the dump")
        if not w.is_signal_stop:
            continue  # an interrupt- or group-stop: a pending SIGTRAP still comes before any instruction
        r = raw.getregs(tid)
        if w.sig == signal.SIGTRAP and r.rip == done_rip:
            if not is_step_trap(tid, w.sig):  # a process's, a TRAP_PERF: not the step's
                th.hold(signal.SIGTRAP)
            th.own_stop = True  # (the step's trap, or the trap flag at least: Frozen.settle)
            return signed64(r.rax)
        if r.rip not in (site, done_rip):
            raise InjectionError(
                f"thread {tid} of process {pid} stopped at {r.rip:#x}, not at the injected syscall "
                f"at {site:#x}"
            )
        # Someone's signal: taken off now, given back at thaw. Before the syscall ran, the step is
        # taken again; after it (the forced SIGTRAP, synchronous, is dequeued first, so this is
        # not expected), the resume meets that SIGTRAP before any instruction runs.
        th.hold(w.sig)


def _restop(pid: int, th: TracedThread, timeout: float, wait: Waiter) -> None:
    """Bring a thread that blocked in our syscall back to a ptrace-stop so its registers can be restored.

    The interrupt makes the syscall return (-ERESTARTSYS or -EINTR); its syscall-exit stop comes
    first. Any stop will do: nothing is queued that could harm the target later (no forced SIGTRAP),
    and an interrupt-stop still pending is dropped by the detach.
    """
    try:
        raw.interrupt(th.tid)
    except ProcessLookupError:
        raise TargetExited(f"process {pid} exited during the dump") from None
    w = wait(th.tid, timeout)
    if w is None:
        raise InjectionError(f"thread {th.tid} of process {pid} is stuck in an injected syscall, unstoppable")
    th.note(w)
    if w.exited:
        raise TargetExited(f"process {pid} exited during the dump")
    if w.is_signal_stop:
        th.hold(w.sig)


def _restop_step(pid: int, th: TracedThread, done_rip: int, timeout: float, wait: Waiter) -> int | None:
    """_restop for step_over_syscall; returns the syscall's result if it ran after all, else None.

    The step's end is a SIGTRAP the kernel forces at the syscall's exit: its stop may come just
    after the wait gave up, or the interrupt-stop first with that SIGTRAP still queued. Held or
    left queued, it would be delivered after detach, where SIG_DFL kills the target. So: the step's
    own SIGTRAP stop (si_code TRAP_BRKPT, rip past the syscall) is where the result is read, as in
    the step; past the syscall with a SIGTRAP still pending, the thread is resumed to take it (a
    pending synchronous signal is dequeued before any instruction runs). The result returned, the
    caller undoes what the call did (a scratch mmap is not leaked)."""
    tid = th.tid
    deadline = time.monotonic() + timeout
    try:
        raw.interrupt(tid)
    except ProcessLookupError:
        raise TargetExited(f"process {pid} exited during the dump") from None
    while True:
        w = wait(tid, max(deadline - time.monotonic(), 0.0))
        if w is None:
            raise InjectionError(
                f"thread {tid} of process {pid} is stuck in an injected syscall, unstoppable"
            )
        th.note(w)
        if w.exited:
            raise TargetExited(f"process {pid} exited during the dump")
        r = raw.getregs(tid)
        if w.is_signal_stop:
            if r.rip == done_rip and is_step_trap(tid, w.sig):
                th.own_stop = True
                return signed64(r.rax)
            th.hold(w.sig)
        if r.rip != done_rip or not pending_signals(pid, tid) & SIGTRAP_BIT:
            th.own_stop = True  # (stepped: its trap flag is still set, whatever this stop is)
            return None  # the syscall never ran (nothing to undo), or its trap was someone's (held)
        # Past the syscall, its SIGTRAP still queued: take it at the next stop (a merged SIGTRAP of
        # someone else's shows by its si_code there and is held).
        raw.singlestep(tid)
        th.stopped = False


def pending_signals(pid: int, tid: int) -> int:
    """The thread's own pending set (SigPnd): signals queued for it and not yet taken."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for ln in f:
                if ln.startswith("SigPnd:"):
                    return int(ln.split()[1], 16)
    except OSError:
        pass
    return 0


def ask_sigactions(plan: Plan, signals: Iterable[int] | None = None) -> set[int]:
    """rt_sigaction(sig, NULL, &old, 8) for each of ``signals`` (None: all) added to ``plan``; returns
    the signals asked about, for sigactions_from."""
    global _asked
    wanted = set(_QUERIED if signals is None else signals) & _QUERIED_SET
    key = tuple(sorted(wanted))
    # (a local: another thread's ask may replace the global between the check and the zip)
    last = _asked
    if last is None or last[0] != key:  # (the same frozen calls as last time: made once)
        size = raw.SIGSET_SIZE
        calls = [Call(nr.RT_SIGACTION, (s, 0, 0, size), out=KSIGACTION.size, out_arg=2) for s in key]
        last = _asked = (key, calls)
    for sig, call in zip(key, last[1], strict=True):
        plan.add(("sigaction", sig), call)
    return wanted


_asked: tuple[tuple[int, ...], list[Call]] | None = None


def sigactions_from(pid: int, wanted: set[int], ans: Mapping[Hashable, Result]) -> list[SigAction]:
    """Every signal's action from the answers; those not asked about are SIG_DFL with no flags."""
    return [SigAction(**d) for d in sigaction_dicts(pid, wanted, ans)]


def sigaction_dicts(pid: int, wanted: set[int], ans: Mapping[Hashable, Result]) -> list[dict[str, int]]:
    """[a.to_dict() for a in sigactions_from(...)], without the 62 records in between (built
    inside every freeze: ~0.1 ms of it)."""
    out = []
    for sig in _QUERIED:
        if sig not in wanted:
            out.append({"sig": sig, "handler": 0, "flags": 0, "restorer": 0, "mask": 0})
            continue
        r = ans[("sigaction", sig)]
        if r.ret < 0:
            if sig in (32, 33):
                continue
            err = os.strerror(-r.ret)
            raise InjectionError(f"injected rt_sigaction({sig}) in process {pid} failed: {err}")
        handler, flags, restorer, mask = KSIGACTION.unpack_from(r.data)
        out.append({"sig": sig, "handler": handler, "flags": flags, "restorer": restorer, "mask": mask})
    return out


def signals_to_query() -> list[int]:
    """1..64 without SIGKILL and SIGSTOP, whose actions cannot be set or asked for a change."""
    return list(_QUERIED)


# (made once: asked twice inside every freeze, and SIGKILL's `in` test is an enum's comparison)
_QUERIED = tuple(s for s in range(1, 65) if s not in (signal.SIGKILL, signal.SIGSTOP))
_QUERIED_SET = frozenset(_QUERIED)
