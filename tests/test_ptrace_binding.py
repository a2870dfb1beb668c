"""ckpt.ptrace.binding, the ptrace() call and register struct that replaced python-ptrace at run time
(issue 9 part 3): the layout against python-ptrace's and against what the kernel itself reports."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.ptrace import Frozen
from ckpt.ptrace.binding import PTRACE_CONT, REGISTER_NAMES, UserRegs, ptrace
from tests.util import Target

Spawn = Callable[..., Target]


def test_layout_is_python_ptrace_s() -> None:
    func = pytest.importorskip("ptrace.binding.func")
    theirs = func.ptrace_registers_t
    assert ctypes.sizeof(UserRegs) == ctypes.sizeof(theirs) == 27 * 8
    assert tuple(func.REGISTER_NAMES) == REGISTER_NAMES
    for name in REGISTER_NAMES:
        assert getattr(UserRegs, name).offset == getattr(theirs, name).offset, name


def test_registers_are_what_the_kernel_reports(spawn: Spawn) -> None:
    """/proc/PID/syscall of the stopped thread: the stack pointer and the program counter as the
    kernel has them and, when the stop came inside a syscall (read(0) of the target's loop), its
    number and six arguments; GETREGS must agree with each."""
    t = spawn("memtarget", "16")
    with Frozen(t.pid) as f:
        r = f.get_regs(f.tids[0])
        words = Path(f"/proc/{t.pid}/syscall").read_text().split()
    sp, pc = int(words[-2], 16), int(words[-1], 16)
    assert (sp, pc) == (r["rsp"], r["rip"])
    if words[0] != "-1":  # not stopped in user space between two commands
        args = [int(w, 16) for w in words[1:7]]
        assert int(words[0]) == r["orig_rax"]
        assert args == [r["rdi"], r["rsi"], r["rdx"], r["r10"], r["r8"], r["r9"]]
    assert t.cmd("sum").startswith("sum")


def test_failure_is_an_oserror_with_the_kernel_s_errno(spawn: Spawn) -> None:
    t = spawn("memtarget", "16")
    with pytest.raises(ProcessLookupError):  # ESRCH: not traced by us
        ptrace(PTRACE_CONT, t.pid)
    assert t.cmd("sum").startswith("sum")
