"""The ptrace() call and x86_64's ``struct user_regs_struct``: all ckpt took from python-ptrace.

python-ptrace's import (its signal names, logging helpers, CPU probes and struct definitions for
five architectures) cost 34 M instructions, 4-5% of the start of every `ckpt dump` and `ckpt
restore` of a small process (issue 9 part 3), for one libc call and one fixed kernel ABI. The
layout below is <sys/user.h>'s (the order PTRACE_GETREGS fills); tests/test_ptrace_binding.py
checks it field by field against python-ptrace's, which stays a test dependency.
"""

from __future__ import annotations

import ctypes
import os

# linux/ptrace.h requests python-ptrace defined for us (x86_64 values).
PTRACE_SINGLESTEP = 9
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_ptrace.restype = ctypes.c_long


class UserRegs(ctypes.Structure):
    """x86_64 ``struct user_regs_struct``; the annotations only tell type checkers the fields."""

    r15: int
    r14: int
    r13: int
    r12: int
    rbp: int
    rbx: int
    r11: int
    r10: int
    r9: int
    r8: int
    rax: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int
    cs: int
    eflags: int
    rsp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int
    _fields_ = tuple(
        (name, ctypes.c_ulong)
        for name in (
            "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
            "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
            "es", "fs", "gs",
        )
    )  # fmt: skip


ptrace_registers_t = UserRegs  # python-ptrace's name, which the callers kept
REGISTER_NAMES: tuple[str, ...] = tuple(f[0] for f in UserRegs._fields_)


def ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """ptrace(request, tid, addr, data) through libc; -1 raises OSError with the kernel's errno
    (ckpt makes no PEEK request through here, for which -1 could be a word read)."""
    ctypes.set_errno(0)
    r = int(_ptrace(request, tid, addr or None, data or None))
    if r == -1:
        err = ctypes.get_errno() or 5  # EIO: -1 without an errno never comes from the kernel
        raise OSError(err, f"ptrace({request:#x}) on thread {tid}: {os.strerror(err)}")
    return r
