"""Many syscalls in one injection: a few bytes of code run in a stopped thread, as CRIU's parasite does.

One injected syscall costs two syscall-stops and a dozen ptrace requests (~0.1-0.25 ms here); a dump
asks the target ~25 questions (prctl state, itimers, timers, membarrier, signal actions, per thread
sigaltstack and clear_child_tid). A blob does them all in one run:

    for each call:  mov rax, nr; mov rdi..r9, args; syscall; mov [result slot], rax
    tail:           tgkill(tgid, tid, SIG)      -> a signal-delivery-stop right after this syscall

The thread runs the blob under PTRACE_CONT (no stop per syscall) and reports the end with a signal it
sends to itself; the tracer sees the signal-delivery-stop, checks it is that one (number, the
siginfo's sender and code, the instruction pointer) and suppresses it. Nothing is left queued: the
signal is taken off by that very stop. Why each choice:
- A real-time signal the thread does not block: it always stops the tracee (even when ignored: a
  tracee's signals are never dropped as ignored), queues without merging into anything the target was
  sent, and has no side effect when sent (SIGSTOP would flush a pending SIGCONT). If the thread blocks
  every real-time signal, or the real uid's queue (RLIMIT_SIGPENDING, SigQ in status) is full, the
  calls go one by one instead (Frozen.syscall). Should tgkill still fail (the queue filled meanwhile),
  the blob falls back to SIGSTOP, recognised by where it stops.
- Rather, where the process has one the thread does not block, a *quiet* signal (quiet_signals: one
  it ignores, or leaves at a default of "ignore" without catching it: SIGURG in most processes).
  Between the end's stop and the tracer's wait for it, the signal is that stop's code: a death of
  ckpt in that moment has the kernel deliver it (SIG_DFL of a real-time signal kills the process),
  a quiet one to no effect. (Once waited for, the stop holds no signal: the wait takes its code.)
  A standard quiet signal can merge with one of the same number sent to the thread by name during
  the run (merged_end); merged or not, the target loses nothing it would have seen, since it
  ignores both.
- No int3 / single-step: those raise a *forced* SIGTRAP, which unblocks and resets SIGTRAP in a target
  that blocks or ignores it.
- The code lives in a private anonymous PROT_READ|PROT_EXEC mapping made for the run (written through
  /proc/PID/mem, which may write a page the process cannot; never writable and executable at once, so
  allowed under PR_SET_MDWE) and unmapped after it.
- Results and output buffers live on the thread's own stack below its red zone, in a writable mapping
  (checked: a fault there would be a forced SIGSEGV), saved before and put back after the run, as
  Frozen.scratch does.
- rsp is the thread's own: sigaltstack() answers SS_ONSTACK by where the stack pointer is.
- A freeze's code (assemble_sp) finds that area from rsp at run time (rbx, which syscalls keep) and
  asks gettid()/getpid() whom to signal: it is the same bytes for every thread that asks the same
  calls, written once and assembled once per ckpt process (a new `ckpt dump` assembled one blob per
  thread inside its freeze, ~60 us each). assemble() keeps absolute addresses for the restore's
  helper (restore/blob.py), whose area is not on a stack.
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckpt.proc.maps import Vma
    from ckpt.ptrace.freeze import Frozen

SYS_TGKILL = 234
SI_TKILL = -6
SIGRTMIN, SIGRTMAX = 34, 64  # the kernel's; glibc keeps 32 and 33 for itself
MAX_CALLS = 96  # per run: bounds the code and the stack area
MAX_DATA = 2048  # bytes of stack area per run (results and output buffers)
ALIGN = 16

# mov r64, imm64 (REX.W B8+r): rax, rdi, rsi, rdx, r10, r8, r9
_MOV = (b"\x48\xb8", b"\x48\xbf", b"\x48\xbe", b"\x48\xba", b"\x49\xba", b"\x49\xb8", b"\x49\xb9")
_SYSCALL = b"\x0f\x05"
_STORE_RAX = b"\x48\xa3"  # mov moffs64, rax
_LOAD_RAX = b"\x48\xa1"  # mov rax, moffs64
# mov r64, rax: rdi, rsi, rdx, r10, r8, r9
_FROM_RAX = (
    b"\x48\x89\xc7", b"\x48\x89\xc6", b"\x48\x89\xc2", b"\x49\x89\xc2", b"\x49\x89\xc0", b"\x49\x89\xc1",
)  # fmt: skip
_TEST_RAX = b"\x48\x85\xc0"
_SPIN = b"\xeb\xfe"  # jmp . (never reached: a sent signal stops the thread before the next instruction)
_Q = struct.Struct("<Q")
# One call without Refs, packed at once: six argument movs, the number's mov, syscall, the store.
_PLAIN = struct.Struct("<" + "2sQ" * 7 + "2s2sQ")


@dataclass(frozen=True)
class Ref:
    """An argument that is the result of an earlier call of the same run (by its index)."""

    index: int


@dataclass(frozen=True)
class Call:
    """One syscall; ``out`` > 0 or ``inp``: argument ``out_arg`` is replaced by the address of a
    buffer holding ``inp``, of which the first ``out`` bytes come back with the result."""

    nr: int
    args: tuple[int | Ref, ...] = ()
    out: int = 0
    out_arg: int = 0
    inp: bytes = b""  # what the buffer holds before the call (an ioctl's argument struct)
    # Bytes of buffer the call gets (0: none), aligned. Made with the call: a freeze's batch asks it
    # ~6 times per call (sizes, inputs, code, results), and a cached_property's first answer (its
    # lock) cost ~3 us per call of every freeze.
    buf: int = field(init=False, repr=False, compare=False)
    # Whether it may change its thread's signal mask (Frozen.batch then keeps no mask it read).
    masks: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "buf", -(-max(self.out, len(self.inp)) // ALIGN) * ALIGN)
        object.__setattr__(self, "masks", _changes_mask(self))


# Calls that change the calling thread's signal mask (rt_sigprocmask, rt_sigreturn, rt_sigsuspend,
# execve, execveat).
_MASK_CALLS = frozenset({14, 15, 130, 59, 322})


def _changes_mask(c: Call) -> bool:
    """Whether ``c`` may change its thread's signal mask (an rt_sigprocmask without a new set only
    asks)."""
    if c.nr == 14 and len(c.args) > 1 and c.args[1] == 0 and c.out_arg != 1:
        return False
    return c.nr in _MASK_CALLS


@dataclass(slots=True)  # not frozen: a freeze makes ~30, and a frozen one costs ~1.4 us more each
class Result:
    ret: int  # rax, signed: -errno on failure
    data: bytes = b""


def _imm(v: int) -> bytes:
    return _Q.pack(v & 0xFFFFFFFFFFFFFFFF)


def data_size(calls: Sequence[Call]) -> int:
    """Bytes of stack area a run of ``calls`` needs: a result slot each, then the output buffers."""
    return 8 * len(calls) + sum(c.buf for c in calls)


def inputs(calls: Sequence[Call], data_at: int) -> list[tuple[int, bytes]]:
    """(address, bytes) to write before a run whose stack area is at ``data_at``."""
    out = []
    at = data_at + 8 * len(calls)
    for c in calls:
        if c.inp:
            out.append((at, c.inp))
        at += c.buf
    return out


def chunks(calls: Sequence[Call]) -> list[list[Call]]:
    """``calls`` split into runs that fit MAX_CALLS and MAX_DATA (a single call never exceeds it).
    A call and the earlier one it Refs stay in one run (a run sees only its own results), their
    Ref made an index within it."""
    n = len(calls)
    if n <= MAX_CALLS and data_size(calls) <= MAX_DATA:
        # One run holds them all (a freeze's batch, every time): no cut, so no Ref to re-count.
        return [list(calls)]
    barred = [False] * (n + 1)  # barred[k]: no cut before call k (a later call Refs one before it)
    pre = [0] * (n + 1)  # data_size of calls[:k]: kept as sums, recomputing per call was quadratic
    for j, c in enumerate(calls):
        pre[j + 1] = pre[j] + 8 + c.buf
        for a in c.args:
            if isinstance(a, Ref) and 0 <= a.index < j:
                for k in range(a.index + 1, j + 1):
                    barred[k] = True
    out: list[list[Call]] = []
    start = 0
    for i in range(n):
        while i > start and (i + 1 - start > MAX_CALLS or pre[i + 1] - pre[start] > MAX_DATA):
            cut = next((k for k in range(i, start, -1) if not barred[k]), None)
            if cut is None:
                raise ValueError(f"calls {start}..{i} refer to each other but do not fit in one run")
            out.append([_shifted(c, start) for c in calls[start:cut]])
            start = cut
    if n > start:
        out.append([_shifted(c, start) for c in calls[start:]])
    return out


def _shifted(c: Call, start: int) -> Call:
    """``c`` in a run that begins at call ``start``: its Refs counted from there."""
    if not start or not any(isinstance(a, Ref) for a in c.args):
        return c
    return replace(c, args=tuple(Ref(a.index - start) if isinstance(a, Ref) else a for a in c.args))


def _plain(args: Sequence[int | Ref]) -> tuple[int, int, int, int, int, int] | None:
    """The six arguments as unsigned 64-bit words; None where one is a Ref (it has no `&`)."""
    m = 0xFFFFFFFFFFFFFFFF
    try:
        return (
            args[0] & m, args[1] & m, args[2] & m,  # type: ignore[operator]
            args[3] & m, args[4] & m, args[5] & m,  # type: ignore[operator]
        )  # fmt: skip
    except TypeError:
        return None


def code_size(ncalls: int) -> int:
    return ncalls * (7 * 10 + 6 * 3 + 2 + 10) + 2 * (4 * 10 + 2) + len(_TEST_RAX) + 2 + 2 * len(_SPIN)


@dataclass(frozen=True)
class Blob:
    code: bytes
    at: int  # where the code starts
    done_rip: int  # where the thread stops after sending `sig` to itself
    stop_rip: int  # where it stops after the SIGSTOP fallback
    # Where its munmap of its own code returns to, and faults (assemble_sp's ``unmap``); 0: none.
    fault_rip: int = 0


# The blobs assembled lately, by thread, and what each was made of: the dumps of one process ask the
# same questions with the same code and stack addresses each time (a migration's rounds, an
# incremental chain), and a blob is a function of those alone. Compared by value (Call is frozen):
# ~25 us less per thread and freeze. Bounded: a new process's blobs replace them all.
_made: dict[tuple[int, int, int, int, int], tuple[list[Call], Blob]] = {}
MADE_MAX = 256


def assemble(calls: Sequence[Call], code_at: int, data_at: int, tgid: int, tid: int, sig: int) -> Blob:
    """The code for ``calls`` at address ``code_at``, results at ``data_at`` (see data_size)."""
    key = (code_at, data_at, tgid, tid, sig)
    made = _made.get(key)
    if made is not None and made[0] == calls:
        return made[1]
    blob = _assemble(calls, code_at, data_at, tgid, tid, sig)
    if len(_made) >= MADE_MAX:
        _made.clear()
    _made[key] = (list(calls), blob)
    return blob


def _assemble(calls: Sequence[Call], code_at: int, data_at: int, tgid: int, tid: int, sig: int) -> Blob:
    buf_at = data_at + 8 * len(calls)
    out = bytearray()
    m = 0xFFFFFFFFFFFFFFFF
    mv = _MOV
    for i, c in enumerate(calls):
        args: list[int | Ref] = list(c.args) + [0] * (6 - len(c.args))
        if c.buf:
            args[c.out_arg] = buf_at
            buf_at += c.buf
        # The same bytes as the loop below, in one pack (assembled inside every freeze, ~25 calls:
        # a third of the time).
        plain = _plain(args)
        if plain is not None:
            a0, a1, a2, a3, a4, a5 = plain
            out += _PLAIN.pack(
                mv[1], a0, mv[2], a1, mv[3], a2, mv[4], a3, mv[5], a4, mv[6], a5,
                mv[0], c.nr & m, _SYSCALL, _STORE_RAX, (data_at + 8 * i) & m,
            )  # fmt: skip
            continue
        for j, a in enumerate(args[:6]):
            if isinstance(a, Ref):  # the earlier result, through rax (loaded with nr below)
                if not 0 <= a.index < i:
                    raise ValueError(f"call {i} refers to the result of call {a.index}")
                out += _LOAD_RAX + _imm(data_at + 8 * a.index) + _FROM_RAX[j]
            else:
                out += _MOV[j + 1] + _imm(a)
        out += _MOV[0] + _imm(c.nr)
        out += _SYSCALL + _STORE_RAX + _imm(data_at + 8 * i)

    def tgkill(s: int) -> bytes:
        regs = zip(_MOV, (SYS_TGKILL, tgid, tid, s), strict=False)
        return b"".join(m + _imm(v) for m, v in regs) + _SYSCALL

    out += tgkill(sig)
    done = code_at + len(out)
    out += _TEST_RAX + b"\x78" + bytes([len(_SPIN)])  # js over the spin: tgkill failed
    out += _SPIN
    out += tgkill(signal.SIGSTOP)
    stop = code_at + len(out)
    out += _SPIN
    return Blob(bytes(out), code_at, done, stop)


# The stack area's place below a thread's stack pointer (Frozen._stack_area computes the same).
RED_ZONE = 128  # x86_64 SysV ABI: the 128 bytes below rsp belong to the function running there
SCRATCH_ALIGN = 64
SYS_GETPID, SYS_GETTID = 39, 186
# rbx = (rsp - K) & -SCRATCH_ALIGN: the stack area's base, which every syscall keeps
_BASE_FROM_RSP = b"\x48\x89\xe3"  # mov rbx, rsp
_SUB_RBX = b"\x48\x81\xeb"  # sub rbx, imm32
_ALIGN_RBX = b"\x48\x83\xe3" + bytes([(-SCRATCH_ALIGN) & 0xFF])  # and rbx, -64
_STORE_AT_RBX = b"\x48\x89\x83"  # mov [rbx + disp32], rax
_LOAD_AT_RBX = b"\x48\x8b\x83"  # mov rax, [rbx + disp32]
# lea r64, [rbx + disp32]: rdi, rsi, rdx, r10, r8, r9
_LEA_AT_RBX = (
    b"\x48\x8d\xbb", b"\x48\x8d\xb3", b"\x48\x8d\x93", b"\x4c\x8d\x93", b"\x4c\x8d\x83", b"\x4c\x8d\x8b",
)  # fmt: skip
_R12_FROM_RAX = b"\x49\x89\xc4"  # mov r12, rax
_RSI_FROM_R12 = b"\x4c\x89\xe6"  # mov rsi, r12
_D32 = struct.Struct("<i")
# assemble_sp's call without a buffer or Ref: six argument movs, the number's, syscall, the store.
_PLAIN_SP = struct.Struct("<" + "2sQ" * 7 + "2s3si")


def code_size_sp(ncalls: int) -> int:
    """An upper bound on assemble_sp's code for ``ncalls`` calls (its ``unmap`` tail included)."""
    return ncalls * 80 + 160


# assemble_sp's code lately made (calls, signal, unmap, code, offsets of its stops): a function of
# the calls, the signal and the unmap alone, compared by value. The threads of a freeze but its main
# one ask the same calls: one assembly for all of them, and none in the next freeze of this ckpt process.
_sp_made: list[tuple[list[Call], int, int, bytes, int, int, int]] = []
SP_MADE_MAX = 16
SYS_MUNMAP = 11
_LEA_RDI_RIP = b"\x48\x8d\x3d"  # lea rdi, [rip + disp32]


def assemble_sp(calls: Sequence[Call], code_at: int, sig: int, unmap: int = 0) -> Blob:
    """The code for ``calls`` at ``code_at`` as any thread of the process can run it: the results
    go to the stack area below the running thread's own red zone, (rsp - RED_ZONE - data_size) &
    -SCRATCH_ALIGN, found at run time in rbx (kept by every syscall); the end signal goes to the
    running thread, whose ids gettid() and getpid() give inside its pid namespace. So the threads of
    one freeze that ask the same calls share one copy of it.

    ``unmap``: the code is the first of a mapping of that many bytes, which its last call unmaps,
    so that the return from that munmap faults on the page just unmapped (Blob.fault_rip): the run
    ends there in a SIGSEGV's signal-delivery-stop instead of its end signal's, and nothing of
    ckpt's is left to unmap in another stop (Frozen.batch's ``release``). Should the munmap fail,
    the run goes on to its end signal as without it."""
    for made in _sp_made:
        if made[1] == sig and made[2] == unmap and made[0] == calls:
            code, done, stop, fault = made[3], made[4], made[5], made[6]
            break
    else:
        code, done, stop, fault = _assemble_sp(calls, sig, unmap)
        if len(_sp_made) >= SP_MADE_MAX:
            del _sp_made[0]
        _sp_made.append((list(calls), sig, unmap, code, done, stop, fault))
    return Blob(code, code_at, code_at + done, code_at + stop, code_at + fault if unmap else 0)


def _assemble_sp(calls: Sequence[Call], sig: int, unmap: int = 0) -> tuple[bytes, int, int, int]:
    size = data_size(calls)
    out = bytearray(_BASE_FROM_RSP + _SUB_RBX + _D32.pack(RED_ZONE + size) + _ALIGN_RBX)
    buf_off = 8 * len(calls)
    m = 0xFFFFFFFFFFFFFFFF
    mv = _MOV
    for i, c in enumerate(calls):
        args: list[int | Ref] = list(c.args) + [0] * (6 - len(c.args))
        # The same bytes as the loop below, in one pack (most calls have no buffer and no Ref: the
        # loop's cost, a new process's first freeze paid per argument).
        plain = None if c.buf else _plain(args)
        if plain is not None:
            a0, a1, a2, a3, a4, a5 = plain
            out += _PLAIN_SP.pack(
                mv[1], a0, mv[2], a1, mv[3], a2, mv[4], a3, mv[5], a4, mv[6], a5,
                mv[0], c.nr & m, _SYSCALL, _STORE_AT_RBX, 8 * i,
            )  # fmt: skip
            continue
        buf_arg = c.out_arg if c.buf else -1
        for j, a in enumerate(args[:6]):
            if j == buf_arg:
                out += _LEA_AT_RBX[j] + _D32.pack(buf_off)
            elif isinstance(a, Ref):  # the earlier result, through rax (loaded with nr below)
                if not 0 <= a.index < i:
                    raise ValueError(f"call {i} refers to the result of call {a.index}")
                out += _LOAD_AT_RBX + _D32.pack(8 * a.index) + _FROM_RAX[j]
            else:
                out += _MOV[j + 1] + _imm(a)
        buf_off += c.buf
        out += _MOV[0] + _imm(c.nr) + _SYSCALL + _STORE_AT_RBX + _D32.pack(8 * i)

    def tgkill(s: int) -> bytes:  # rdi (tgid) and rsi (tid) are set, and kept by syscalls
        return _MOV[3] + _imm(s) + _MOV[0] + _imm(SYS_TGKILL) + _SYSCALL

    fault = 0
    if unmap:
        # munmap(the code's own start, unmap): rdi from rip, position-independent as the rest.
        out += _LEA_RDI_RIP + _D32.pack(-(len(out) + len(_LEA_RDI_RIP) + 4))
        out += _MOV[2] + _imm(unmap) + _MOV[0] + _imm(SYS_MUNMAP) + _SYSCALL
        fault = len(out)
    out += _MOV[0] + _imm(SYS_GETTID) + _SYSCALL + _R12_FROM_RAX
    out += _MOV[0] + _imm(SYS_GETPID) + _SYSCALL + _FROM_RAX[0] + _RSI_FROM_R12
    out += tgkill(sig)
    done = len(out)
    out += _TEST_RAX + b"\x78" + bytes([len(_SPIN)])  # js over the spin: tgkill failed
    out += _SPIN
    out += tgkill(signal.SIGSTOP)
    stop = len(out)
    out += _SPIN
    return bytes(out), done, stop, fault


def parse(calls: Sequence[Call], data: bytes) -> list[Result]:
    """The results a run left in its stack area."""
    res = []
    off = 8 * len(calls)
    # The result slots, signed, in one unpack (a freeze parses ~30).
    for ret, c in zip(struct.unpack_from(f"<{len(calls)}q", data), calls, strict=True):
        res.append(Result(ret, data[off : off + c.out]))
        off += c.buf
    return res


def _bit(sig: int) -> int:
    return 1 << (sig - 1)


# Left at SIG_DFL these do nothing when delivered (SIGCONT among them, which acts when sent).
DEFAULT_IGNORED = _bit(signal.SIGCHLD) | _bit(signal.SIGCONT) | _bit(signal.SIGURG) | _bit(signal.SIGWINCH)
# Sending these acts whatever their disposition (the kernel's prepare_signal: a stop signal flushes
# a pending SIGCONT, SIGCONT flushes the stop signals and continues a stopped process).
ACT_WHEN_SENT = sum(
    _bit(s)
    for s in (signal.SIGKILL, signal.SIGCONT, signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
)
GLIBC_OWN = _bit(32) | _bit(33)  # (glibc's thread cancellation and set*id broadcast: never ours)
RT = ((1 << SIGRTMAX) - 1) & ~((1 << (SIGRTMIN - 1)) - 1)  # SIGRTMIN..SIGRTMAX
# A quiet end signal's preference after the real-time ones: the default-ignored that are least
# likely sent to a thread by name, then any ignored standard one, SIGCHLD last.
_FIRST, _LAST = (signal.SIGURG, signal.SIGWINCH), (signal.SIGCHLD,)
_QUIET_ORDER = (*_FIRST, *(s for s in range(1, 32) if s not in (*_FIRST, *_LAST)), *_LAST)


def quiet_signals(ignored: int, caught: int) -> int:
    """The signals whose delivery changes nothing in a process with these dispositions (status's
    SigIgn, SigCgt): ignored, or left at a default of "ignore", and without an effect when sent. A
    blob that ends with one leaves its thread in a stop that a death of ckpt makes harmless even
    before the tracer has waited for it: the kernel's detach delivers that signal, and the process
    ignores it."""
    return (ignored | (DEFAULT_IGNORED & ~caught)) & ~ACT_WHEN_SENT & ~GLIBC_OWN & ((1 << SIGRTMAX) - 1)


def pick_signal(blocked: int, quiet: int = 0, room: bool = True) -> int | None:
    """The blob's end signal for a thread that blocks ``blocked``: a ``quiet`` one (quiet_signals)
    the thread does not block if there is one, real-time first (they queue apart from anything the
    target was sent), else a real-time signal the thread does not block (the highest: the least
    likely in use). ``room``: the real uid's queue has room for one more (queue_has_room): without
    it only a standard quiet signal will do (the kernel sets it pending without its siginfo)."""
    free = quiet & ~blocked
    if room and free & RT:
        return (free & RT).bit_length()  # (a mask's highest bit is its highest signal)
    for s in _QUIET_ORDER if free else ():
        if free >> (s - 1) & 1:
            return int(s)
    if room and ~blocked & RT:
        return (~blocked & RT).bit_length()
    return None


def is_ours(info: bytes, sig: int, tgid: int) -> bool:
    """The siginfo of a stop is the signal the blob sent: its number, sent by tkill from the target
    itself (no other sender can name the target's own pid: every thread of it is held)."""
    signo, _errno, code = struct.unpack_from("<iii", info, 0)
    (pid,) = struct.unpack_from("<i", info, 16)
    return signo == sig and code == SI_TKILL and pid == tgid


SEGV_MAPERR = 1


def is_own_fault(info: bytes, rip: int) -> bool:
    """The siginfo of a stop is the fault of a blob's return from the munmap of its own code
    (assemble_sp's ``unmap``): SIGSEGV, SEGV_MAPERR, at the instruction's own address. A SIGSEGV
    that someone sends has another si_code (SI_USER, SI_TKILL, SI_QUEUE: zero or less)."""
    signo, _errno, code = struct.unpack_from("<iii", info, 0)
    (addr,) = struct.unpack_from("<Q", info, 16)
    return signo == signal.SIGSEGV and code == SEGV_MAPERR and addr == rip


def merged_end(sig: int, quiet: int) -> bool:
    """A stop for ``sig`` right after the blob's tgkill, with a siginfo not the blob's, is still its
    end when ``sig`` is a quiet standard signal: a standard signal already pending is not queued
    again (the kernel's legacy_queue: the blob's merged into someone's, sent to the thread by name
    a moment before), nor is its siginfo kept when the queue is full. A real-time one queues apart:
    the blob's own stop follows."""
    return sig < SIGRTMIN and bool(quiet >> (sig - 1) & 1)


def queue_has_room(status_sigq: str, need: int) -> bool:
    """SigQ: "queued/limit" for the target's real uid: room for one signal per thread run."""
    try:
        used, limit = (int(x) for x in status_sigq.split("/"))
    except ValueError:
        return False
    return used + need < limit


class Plan:
    """Questions for a frozen process gathered from several places, asked in one Frozen.batch()."""

    def __init__(self) -> None:
        self._calls: dict[int | None, list[tuple[Hashable, Call]]] = {}

    def add(self, key: Hashable, call: Call, tid: int | None = None) -> int:
        """``tid`` None: the leader (process-wide questions). Returns the call's index among those
        added for the same ``tid``: a Ref to it is right when that thread gets no calls added under
        another name (its tid and None both)."""
        calls = self._calls.setdefault(tid, [])
        calls.append((key, call))
        return len(calls) - 1

    def count(self, tid: int | None = None) -> int:
        """How many calls were added for ``tid`` (None: the leader's process-wide ones): the index
        the next one gets."""
        return len(self._calls.get(tid, ()))

    def by_thread(self, lead: int) -> dict[int, list[Call]]:
        """The calls each thread runs (``lead`` takes those without a thread), as run() hands them
        to Frozen.batch."""
        work: dict[int, list[Call]] = {}
        for tid, calls in self._calls.items():
            work.setdefault(lead if tid is None else tid, []).extend(c for _, c in calls)
        return work

    def run(
        self,
        fz: Frozen,
        vmas: Sequence[Vma] | None = None,
        sigq: str | None = None,
        meanwhile: Callable[[], None] | None = None,
        release: bool = False,
        ended: Callable[[], None] | None = None,
    ) -> dict[Hashable, Result]:
        """``sigq``: the SigQ field of a status read in this freeze; ``meanwhile``: work of the
        caller's done while the threads run their calls; ``release``: the caller releases the code
        right after; ``ended``: called once every run has ended, before their results are read
        (all four: Frozen.batch)."""
        lead = fz.pid if fz.pid in fz.tids else (fz.tids or [fz.pid])[0]
        work: dict[int, list[tuple[Hashable, Call]]] = {}
        for tid, calls in self._calls.items():
            work.setdefault(lead if tid is None else tid, []).extend(calls)
        per_tid = {tid: [c for _, c in kc] for tid, kc in work.items()}
        got = fz.batch(per_tid, vmas, sigq, meanwhile, release, ended)
        out: dict[Hashable, Result] = {}
        for tid, kc in work.items():
            for (key, _), r in zip(kc, got[tid], strict=True):
                out[key] = r
        return out
