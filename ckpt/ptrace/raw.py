"""Raw ptrace requests and waits, one thin function each; no policy here.

binding.py gives us the ptrace() call itself and the x86_64 ``user_regs_struct`` layout; we add
the requests it does not define (SEIZE, INTERRUPT, GETSIGMASK/SETSIGMASK, GET_SYSCALL_INFO) and the
signal syscalls Python's ``os`` module lacks (tgkill, rt_tgsigqueueinfo).

Every failure is an ``OSError`` carrying the kernel's errno, so ESRCH arrives as ProcessLookupError
and EPERM as PermissionError; freeze.py turns those into ckpt errors with sentences.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ckpt.cbuf import char_buffer, warm
from ckpt.ptrace import sigchld
from ckpt.ptrace.binding import (
    PTRACE_CONT,
    PTRACE_DETACH,
    PTRACE_GETREGS,
    PTRACE_GETREGSET,
    PTRACE_GETSIGINFO,
    PTRACE_SETREGS,
    PTRACE_SETREGSET,
    PTRACE_SETSIGINFO,
    PTRACE_SINGLESTEP,
    ptrace_registers_t,
)
from ckpt.ptrace.binding import ptrace as _ptrace

# Requests binding.py does not define (linux/ptrace.h, Linux >= 3.4 / 3.11).
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B

PTRACE_SYSCALL = 24
PTRACE_GET_SYSCALL_INFO = 0x420E  # Linux >= 5.3
PTRACE_O_TRACESYSGOOD = 1  # syscall-stops report SIGTRAP | 0x80, unlike a real SIGTRAP
SYSCALL_INFO_ENTRY, SYSCALL_INFO_EXIT = 1, 2

PTRACE_EVENT_STOP = 128  # status >> 16 of an interrupt-stop or a group-stop of a SEIZEd tracee

NT_PRFPREG = 2
NT_X86_XSTATE = 0x202

WALL = 0x40000000  # __WALL: wait for clone children (threads) too; os does not export it

SIGINFO_SIZE = 128  # sizeof(siginfo_t) on every Linux ABI
SIGSET_SIZE = 8  # the kernel's sigset_t for rt_* syscalls and GETSIGMASK on x86_64
SYSCALL_INFO_SIZE = 88  # sizeof(struct ptrace_syscall_info)
# The buffers of the requests below made at import, not in a freeze (ckpt/cbuf.py).
warm(ctypes.c_char, SYSCALL_INFO_SIZE, SIGINFO_SIZE)

_SYS_TGKILL = 234
_SYS_RT_TGSIGQUEUEINFO = 297
SI_TKILL = -6

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


def _oserror(err: int | None, what: str) -> OSError:
    code = err or errno_mod.EIO
    return OSError(code, f"{what}: {os.strerror(code)}")


# A stopped tracee's registers and signal mask as this thread of ckpt last read or set them, for
# known_regs / known_mask: a freeze reads each thread's registers at its batch, in its collect and
# at its thaw, and its mask at the batch and in the collect (~15 us a request here, 3 per thread of
# a freeze). Only a thread that runs changes either, and every way ckpt lets one run is a request
# that forgets it (any request not in _KEEPS: a resume, a detach, a seize, a set) or a call of
# quickstops.c (Frozen._quick forgets). Per tracer thread: ptrace itself is, and a thread of ckpt
# that ends takes its tracees' entries with it.
_known = threading.local()
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_GETEVENTMSG = 0x4201
_KEEPS = frozenset(
    {
        PTRACE_GETREGS,
        PTRACE_GETREGSET,
        PTRACE_GETSIGMASK,
        PTRACE_GETSIGINFO,
        PTRACE_PEEKSIGINFO,
        PTRACE_GET_SYSCALL_INFO,
        PTRACE_GET_RSEQ_CONFIGURATION,
        PTRACE_GETEVENTMSG,
        0x420C,  # PTRACE_SECCOMP_GET_FILTER
        0x420D,  # PTRACE_SECCOMP_GET_METADATA
    }
)


@dataclass(slots=True)
class _Kept:
    """What this thread of ckpt knows of one stopped tracee (None: not known)."""

    regs: ptrace_registers_t | None = None
    mask: int | None = None
    xsave: bytes | None = None  # quickstops.read_threads'
    rseq: bytes | int | None = None  # its 24 bytes, or the request's errno


def _kept() -> dict[int, _Kept]:
    try:
        d: dict[int, _Kept] = _known.d
    except AttributeError:
        d = _known.d = {}
    return d


def _entry(tid: int) -> _Kept:
    d = _kept()
    e = d.get(tid)
    if e is None:
        e = d[tid] = _Kept()
    return e


def forget(tid: int) -> None:
    """``tid`` may run (or has run) by a way other than a request through here: all that is kept
    of it is dropped."""
    _kept().pop(tid, None)


def know_more(tid: int, xsave: bytes | None, rseq: bytes | int) -> None:
    """``tid``'s XSAVE image (None: not known) and rseq registration (24 bytes, or the errno of its
    request), read while it is stopped (quickstops.read_threads)."""
    e = _entry(tid)
    e.xsave, e.rseq = xsave, rseq


def known_xsave(tid: int) -> bytes | None:
    e = _kept().get(tid)
    return None if e is None else e.xsave


def known_rseq(tid: int) -> bytes | int | None:
    """know_more's rseq answer for ``tid`` (bytes, or an errno), or None: ask."""
    e = _kept().get(tid)
    return None if e is None else e.rseq


def known_regs(tid: int) -> ptrace_registers_t | None:
    """A copy of the registers this thread last read or set of ``tid`` (getregs, setregs,
    know_regs) if it has not been let run since, else None: ask getregs. Only while ``tid`` is a
    stopped tracee of this thread (a tracee's registers change only while it runs)."""
    e = _kept().get(tid)
    r = None if e is None else e.regs
    return None if r is None else ptrace_registers_t.from_buffer_copy(r)


def know_regs(tid: int, regs: ptrace_registers_t) -> None:
    """``tid``'s registers are ``regs`` now (put back by quickstops.c), and it is stopped."""
    _entry(tid).regs = ptrace_registers_t.from_buffer_copy(regs)


def is_known(tid: int) -> bool:
    """Whether both ``tid``'s registers and mask are kept (known_regs, known_mask)."""
    e = _kept().get(tid)
    return e is not None and e.regs is not None and e.mask is not None


def known_mask(tid: int) -> int | None:
    """The signal mask this thread last read or set of ``tid`` if it has not run since, or None."""
    e = _kept().get(tid)
    return None if e is None else e.mask


def know_mask(tid: int, mask: int) -> None:
    """``tid``'s signal mask is ``mask``: it ran only code of ckpt's that changes no mask."""
    _entry(tid).mask = mask


def call(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """ptrace(request, tid, addr, data); raises OSError(errno) on failure."""
    if request not in _KEEPS:
        forget(tid)
    return _ptrace(request, tid, addr, data)


def seize(tid: int, options: int = 0) -> None:
    call(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    call(PTRACE_INTERRUPT, tid)


def detach(tid: int, sig: int = 0) -> None:
    call(PTRACE_DETACH, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    call(PTRACE_SINGLESTEP, tid, 0, sig)


def resume_syscall(tid: int, sig: int = 0) -> None:
    """PTRACE_SYSCALL: run to the next syscall-entry or syscall-exit stop."""
    call(PTRACE_SYSCALL, tid, 0, sig)


def syscall_info_op(tid: int) -> int:
    """At a syscall-stop: SYSCALL_INFO_ENTRY or SYSCALL_INFO_EXIT (PTRACE_GET_SYSCALL_INFO's op)."""
    buf = char_buffer(SYSCALL_INFO_SIZE)
    call(PTRACE_GET_SYSCALL_INFO, tid, SYSCALL_INFO_SIZE, ctypes.addressof(buf))
    return buf.raw[0]


_SYSCALL_INFO = struct.Struct("<B3xIQQq")  # op, arch, instruction_pointer, stack_pointer, exit.rval


def syscall_info(tid: int) -> tuple[int, int, int]:
    """At a syscall-stop, in one request: (op, instruction pointer, return value if op is EXIT)."""
    buf = char_buffer(SYSCALL_INFO_SIZE)
    call(PTRACE_GET_SYSCALL_INFO, tid, SYSCALL_INFO_SIZE, ctypes.addressof(buf))
    op, _, rip, _, rval = _SYSCALL_INFO.unpack_from(buf.raw)
    return op, rip, rval


def cont(tid: int, sig: int = 0) -> None:
    call(PTRACE_CONT, tid, 0, sig)


def getregs(tid: int) -> ptrace_registers_t:
    regs = ptrace_registers_t()
    call(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    know_regs(tid, regs)
    return regs


def setregs(tid: int, regs: ptrace_registers_t) -> None:
    call(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))
    know_regs(tid, regs)


# getregset's buffer, kept (under its lock: tree dumps freeze in several threads): the xstate
# regset is asked with 64 KiB of room for every thread of every freeze (a dump's freeze runs in a
# thread of its own, so no per-thread buffer would last), and a fresh zeroed one cost more than the
# request.
_regset_lock = threading.Lock()
_regset_buf = ctypes.create_string_buffer(0)


def getregset(tid: int, note: int, maxsize: int) -> bytes:
    """PTRACE_GETREGSET: the kernel shrinks iov_len to the regset's real size, which we return."""
    global _regset_buf
    with _regset_lock:
        if len(_regset_buf) < maxsize:
            _regset_buf = char_buffer(maxsize)
        return _getregset(tid, note, maxsize, _regset_buf)


def _getregset(tid: int, note: int, maxsize: int, buf: ctypes.Array[ctypes.c_char]) -> bytes:
    iov = _Iovec(ctypes.addressof(buf), maxsize)
    call(PTRACE_GETREGSET, tid, note, ctypes.addressof(iov))
    return ctypes.string_at(buf, min(iov.len, maxsize))  # (not buf.raw: a copy of all 64 KiB asked for)


def setregset(tid: int, note: int, data: bytes) -> None:
    buf = char_buffer(len(data), data)
    iov = _Iovec(ctypes.addressof(buf), len(data))
    call(PTRACE_SETREGSET, tid, note, ctypes.addressof(iov))


def getsigmask(tid: int) -> int:
    mask = ctypes.c_uint64()
    call(PTRACE_GETSIGMASK, tid, SIGSET_SIZE, ctypes.addressof(mask))
    _entry(tid).mask = mask.value
    return mask.value


def setsigmask(tid: int, mask: int) -> None:
    m = ctypes.c_uint64(mask & (2**64 - 1))
    call(PTRACE_SETSIGMASK, tid, SIGSET_SIZE, ctypes.addressof(m))
    _entry(tid).mask = m.value


def getsiginfo(tid: int) -> bytes:
    buf = char_buffer(SIGINFO_SIZE)
    call(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return buf.raw


def setsiginfo(tid: int, info: bytes) -> None:
    buf = char_buffer(SIGINFO_SIZE, info)
    call(PTRACE_SETSIGINFO, tid, 0, ctypes.addressof(buf))


def siginfo_code(info: bytes) -> int:
    # siginfo_t starts with int si_signo, int si_errno, int si_code.
    return int.from_bytes(info[8:12], "little", signed=True)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    # Every argument as a long: ctypes passes bare ints to a variadic function as 32-bit int.
    if (
        _libc.syscall(ctypes.c_long(_SYS_TGKILL), ctypes.c_long(tgid), ctypes.c_long(tid), ctypes.c_long(sig))
        != 0
    ):
        raise _oserror(ctypes.get_errno(), f"tgkill({tgid}, {tid}, {sig})")


def requeue_signal(tgid: int, tid: int, sig: int, info: bytes) -> None:
    """Put a signal we took off a thread back on its queue, keeping as much of its siginfo as allowed.

    The kernel lets another process queue a siginfo only with a negative si_code other than SI_TKILL
    (sigqueue, timers, AIO): those keep their si_value. kill()- and kernel-sent signals go back with
    tgkill, which keeps the number but names us as the sender.
    """
    code = siginfo_code(info)
    if code < 0 and code != SI_TKILL:
        buf = char_buffer(SIGINFO_SIZE, info)
        args = (_SYS_RT_TGSIGQUEUEINFO, tgid, tid, sig, ctypes.addressof(buf))
        if _libc.syscall(*(ctypes.c_long(a) for a in args)) == 0:
            return
    tgkill(tgid, tid, sig)


@dataclass(frozen=True)
class WaitResult:
    """One waitpid() report for a thread, or ``gone`` when the kernel says it is not ours to wait for."""

    tid: int
    status: int = 0
    gone: bool = False  # ECHILD: already reaped (or never our tracee)

    @property
    def exited(self) -> bool:
        return self.gone or os.WIFEXITED(self.status) or os.WIFSIGNALED(self.status)

    @property
    def stopped(self) -> bool:
        return not self.gone and os.WIFSTOPPED(self.status)

    @property
    def sig(self) -> int:
        return os.WSTOPSIG(self.status) if self.stopped else 0

    @property
    def event(self) -> int:
        return (self.status >> 16) & 0xFF if self.stopped else 0

    @property
    def is_event_stop(self) -> bool:
        """Interrupt-stop or group-stop (SEIZE reports both as PTRACE_EVENT_STOP)."""
        return self.event == PTRACE_EVENT_STOP

    @property
    def is_syscall_stop(self) -> bool:
        """Syscall-entry or -exit stop (under PTRACE_O_TRACESYSGOOD)."""
        return self.stopped and self.event == 0 and os.WSTOPSIG(self.status) == 0x80 | 5

    @property
    def is_signal_stop(self) -> bool:
        """Signal-delivery-stop: the thread is about to take signal ``sig``."""
        return self.stopped and self.event == 0 and not self.is_syscall_stop


def take_stop(tid: int) -> WaitResult | None:
    """Consume a stop report of ``tid`` if it has one, never an exit (waitid without WEXITED)."""
    r = os.waitid(os.P_PID, tid, os.WSTOPPED | os.WNOHANG | WALL)
    if r is None or r.si_pid == 0:
        return None
    # waitpid's status for a stop: the stop's exit_code (event << 8 | signal) above 0x7f.
    return WaitResult(tid, (r.si_status << 8) | 0x7F)


def exited(tid: int) -> bool:
    """``tid`` has an exit to report (looked at with WNOWAIT: it stays to be reaped). A tracer's
    waitid reports a tracee's stops even without WSTOPPED: those are not exits."""
    r = os.waitid(os.P_PID, tid, os.WEXITED | os.WNOHANG | os.WNOWAIT | WALL)
    return r is not None and r.si_pid != 0 and r.si_code in (os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED)


def wait(
    tid: int,
    timeout: float,
    dead: Callable[[], bool] | None = None,
    keep_exit: bool = False,
    shared: bool | None = None,
) -> WaitResult | None:
    """waitpid(tid, __WALL) with a deadline; None when it passed.

    A plain blocking waitpid would hang the dumper forever on a thread that never reaches a stop
    (uninterruptible sleep, a vfork parent). Tracers get SIGCHLD for every tracee stop and exit, so we
    poll with WNOHANG and, between polls, wait for the next SIGCHLD on a signalfd (sigchld.py), with
    the time left as its timeout: each wait ends when the event happens. SIGCHLD is blocked first, so
    one that lands between the poll and the wait stays pending and ends the wait at once.

    ``dead`` is asked after every empty poll: a killed leader is not reported while other threads of
    its group are unreaped zombies (ours to reap, later), so its exit must be seen in /proc instead
    (a traced leader's exit still sends us SIGCHLD, which wakes the wait to look).
    Then the result is ``gone`` and the thread is left for the caller to reap.

    ``keep_exit``: report an exit as ``gone`` without ever reaping it. For the leader of a process
    that is also our child: reaping it here would take the exit status from the parent's own wait
    (subprocess.Popen's, which then reports exit status 0 for a process killed by a signal). Stops
    are taken with waitid(WSTOPPED) alone, which cannot consume an exit; a peek with WNOWAIT first,
    then a waitpid, could (the process may exit between the two).

    ``shared``: another thread of ours may take SIGCHLD (sigchld.unblocked_threads()): wait with
    sigchld.watch() instead, which needs no signal. None: find out now (a caller that waits often
    finds out once and says).
    """
    deadline = time.monotonic() + timeout
    if shared is None:
        shared = bool(sigchld.unblocked_threads())
    with sigchld.blocked():
        while True:
            try:
                if keep_exit:
                    got = take_stop(tid)
                    if got is not None:
                        return got
                    if exited(tid):
                        return WaitResult(tid, gone=True)
                else:
                    wpid, status = os.waitpid(tid, os.WNOHANG | WALL)
                    if wpid:
                        return WaitResult(tid, status)
            except ChildProcessError:
                return WaitResult(tid, gone=True)
            if dead is not None and dead():
                return WaitResult(tid, gone=True)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if shared:
                sigchld.watch(tid, left)
            else:
                sigchld.wait_event(left)
