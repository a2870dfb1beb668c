"""The stops of a freeze in C when they go as expected (ckpt/ptrace/quickstops.c).

The first stop of each thread a freeze seized (Frozen._first_stops), a single-stepped syscall
(Frozen.syscall(quick=True)), a blob's run (Frozen._run_blobs) and the two stops of a thread the
thaw lets go back into its blocking syscall (Frozen._start_parting, _parted: ckpt/ptrace/parting.py)
each take one call here in place of several ptrace requests and a wait made from Python. The C code
does only what the Python code does when the stop expected comes; anything else (someone's signal,
a group stop, an exit, a timeout) comes back as a ``Job`` whose ``kind`` says where the thread is,
and the Python loop that would have met it (inject.step_over_syscall, Frozen._wait_blob,
Frozen._back_in_get_signal, parting.into_syscall) takes over from there: one place decides what
a stray stop means.

Without the library (not built, another ABI, CKPT_QUICKSTOPS=0) every stop goes through Python, as
before. Where another thread of ckpt may take SIGCHLD (Frozen._shared_sigchld) the C wait would
not be woken: those freezes use Python's too.
"""

from __future__ import annotations

import ctypes
import os
import threading
from ctypes import c_int32, c_int64, c_uint64
from pathlib import Path

from ckpt.cbuf import array_type, vector, warm
from ckpt.clib import Library
from ckpt.ptrace.binding import UserRegs

ABI = 9
HERE = Path(__file__).resolve().parent
BUILD = HERE / "_quickstops.so"

OK, STOPPED, RUNNING, ERRNO = 0, 1, 2, 3
# The seize's tid and status arrays (Frozen._first_stops, cbuf.vector's lengths), made at import.
warm(c_int32, 1, 2, 4, 8, 16, 32)
warm(c_uint64, 1, 2, 4, 8, 16, 32)  # (and the registers' and masks' of a batch's threads: read_own)
warm(UserRegs, 1, 2, 4, 8, 16, 32)
warm(c_int64, 1, 2, 4, 8, 16, 32)


class Job(ctypes.Structure):
    """quickstops.c's struct job: one stop's work and what came of it."""

    _fields_ = (
        ("tid", c_int32),
        ("pid", c_int32),
        ("sfd", c_int32),
        ("timeout_ms", c_int32),
        ("leader_check", c_int32),
        ("sig", c_int32),
        ("tgid", c_int32),
        ("pad0", c_int32),
        ("done_rip", c_uint64),
        ("call", UserRegs),
        ("own", UserRegs),
        ("kind", c_int32),
        ("status", c_int32),
        ("err", c_int32),
        ("timed_out", c_int32),
        ("result", c_int64),
        ("want", c_int64),
        ("fault_rip", c_uint64),
        ("unmapped", c_int32),
        ("pad1", c_int32),
    )


def _setup(so: ctypes.CDLL) -> bool:
    for fn in (so.ckpt_qs_step, so.ckpt_qs_start, so.ckpt_qs_end, so.ckpt_qs_part, so.ckpt_qs_enter):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(Job)]
    so.ckpt_qs_regs.restype = ctypes.c_int
    ids, regs, masks = ctypes.POINTER(c_int32), ctypes.POINTER(UserRegs), ctypes.POINTER(c_uint64)
    so.ckpt_qs_regs.argtypes = [ids, c_int32, regs, masks, ctypes.POINTER(c_int32)]
    so.ckpt_qs_threads.restype = ctypes.c_int
    p32, p64 = ctypes.POINTER(c_int32), ctypes.POINTER(c_int64)
    so.ckpt_qs_threads.argtypes = [p32, c_int32, ctypes.c_void_p, c_int64, p64, ctypes.c_void_p, p32, p32]
    so.ckpt_qs_seize.restype = c_int32
    so.ckpt_qs_seize.argtypes = [p32, c_int32, c_int64, p32, p32]
    so.ckpt_qs_stops.restype = ctypes.c_int
    so.ckpt_qs_stops.argtypes = [
        ctypes.POINTER(Job), p32, c_int32, p32, regs, masks, p32,
    ]  # fmt: skip
    return True


_LIB = Library("CKPT_QUICKSTOPS", (BUILD,), "ckpt_quickstops_abi", ABI, _setup)


def lib() -> ctypes.CDLL | None:
    """The library, loaded on first use; None where it is not built, is of another version, or
    CKPT_QUICKSTOPS=0 is set."""
    return _LIB.get()


def reset(enabled: bool) -> None:
    """Load again, honouring CKPT_QUICKSTOPS as set now (the tests compare both paths)."""
    _LIB.reset(enabled)


def timeout_ms(seconds: float) -> int:
    return max(0, min(int(seconds * 1000 + 0.999), 2**31 - 1))


def error(job: Job, what: str) -> OSError:
    """A ptrace request of the C code that failed, as raw.call raises it (ESRCH: ProcessLookupError,
    which Frozen._guard takes for the target's death)."""
    return OSError(job.err, f"{what}: {os.strerror(job.err)}")


def seize(tids: list[int], options: int) -> dict[int, tuple[int, int]] | None:
    """Each of ``tids`` seized with ``options`` and interrupted, in one call (ckpt_qs_seize): per
    thread (the seize's errno, the interrupt's errno), 0 where it worked; a thread whose seize
    failed is not seized. None without the library."""
    so = lib()
    if so is None or not tids:
        return None
    ids = vector(c_int32, tids)
    n = len(ids)
    errs = array_type(c_int32, n)()
    ierrs = array_type(c_int32, n)()
    so.ckpt_qs_seize(ids, len(tids), options, errs, ierrs)
    return {t: (int(errs[i]), int(ierrs[i])) for i, t in enumerate(tids)}


def read_own(tids: list[int]) -> dict[int, tuple[UserRegs, int]]:
    """Each of ``tids`` (stopped tracees of this thread): its registers and signal mask, in one
    call (ckpt_qs_regs); a thread whose requests failed is left out (asked again from Python,
    where the error is told). Empty without the library."""
    so = lib()
    if so is None or not tids:
        return {}
    ids = vector(c_int32, tids)
    n = len(ids)
    regs = array_type(UserRegs, n)()
    masks = array_type(c_uint64, n)()
    errs = array_type(c_int32, n)()
    so.ckpt_qs_regs(ids, len(tids), regs, masks, errs)
    return {t: (regs[i], int(masks[i])) for i, t in enumerate(tids) if not errs[i]}


XCAP = 16 << 10  # bytes of XSAVE image a thread may have in read_threads (AMX's is ~11 KiB)
RSEQ_ROW = 32
# read_threads' buffers, kept for the next freeze (each dump's freeze runs in a thread of its own,
# a tree's several at once): a fresh one is ~16 KiB a thread zeroed, and its array type (made once
# per size: ckpt/cbuf.py; n is a power of two) would be made again after every collection.
_spare: list[ctypes.Array[ctypes.c_char]] = []
_spare_lock = threading.Lock()


def _threads_buffer(n: int) -> ctypes.Array[ctypes.c_char]:
    size = n * (XCAP + RSEQ_ROW)
    with _spare_lock:
        for i, b in enumerate(_spare):
            if len(b) >= size:
                return _spare.pop(i)
    buf: ctypes.Array[ctypes.c_char] = array_type(ctypes.c_char, size)()
    return buf


def _threads_buffer_back(buf: ctypes.Array[ctypes.c_char]) -> None:
    with _spare_lock:
        if len(_spare) < 4:
            _spare.append(buf)


def read_threads(tids: list[int]) -> dict[int, tuple[bytes | None, bytes | int]]:
    """Each of ``tids`` (stopped tracees of this thread): its XSAVE image (None where the request
    failed, or the image may not have fit XCAP: asked again from Python) and its rseq registration
    (PTRACE_GET_RSEQ_CONFIGURATION's 24 bytes, or the request's errno), in one call
    (ckpt_qs_threads). Empty without the library."""
    so = lib()
    if so is None or not tids:
        return {}
    ids = vector(c_int32, tids)
    n = len(ids)
    buf = _threads_buffer(n)
    rseq_at = n * XCAP
    xlens = array_type(c_int64, n)()
    errs = array_type(c_int32, n)()
    rerr = array_type(c_int32, n)()
    base = ctypes.addressof(buf)
    try:
        so.ckpt_qs_threads(ids, len(tids), base, XCAP, xlens, base + rseq_at, errs, rerr)
        out: dict[int, tuple[bytes | None, bytes | int]] = {}
        for i, t in enumerate(tids):
            ln = int(xlens[i])
            xsave = None if errs[i] or ln <= 0 or ln >= XCAP else ctypes.string_at(base + i * XCAP, ln)
            at = base + rseq_at + i * RSEQ_ROW
            out[t] = (xsave, int(rerr[i]) if rerr[i] else ctypes.string_at(at, 24))
        return out
    finally:
        _threads_buffer_back(buf)
