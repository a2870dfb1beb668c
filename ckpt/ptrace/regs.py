"""Thread register state: general registers by name, the FPU/vector state, the signal mask.

The general registers are x86_64's ``user_regs_struct`` (binding.py: with fs_base, gs_base and
orig_rax) turned into a plain dict so images and callers never depend on ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import struct

from ckpt.cbuf import warm
from ckpt.ptrace import raw
from ckpt.ptrace.binding import REGISTER_NAMES, ptrace_registers_t

REG_NAMES: tuple[str, ...] = tuple(REGISTER_NAMES)
MASK64 = 2**64 - 1

# NT_X86_XSTATE is as large as the CPU's XSAVE area (2.7 KiB with AVX-512, about 11 KiB with AMX).
# Ask for more than any CPU has; the kernel trims iov_len to the real size. Must be a multiple of 8.
XSTATE_MAX = 64 * 1024
FXSAVE_SIZE = 512  # NT_PRFPREG: the legacy FXSAVE image, available on every x86_64
# raw.getregset's buffer type, made at import, not in a freeze (its buffer: once per process).
warm(ctypes.c_char, XSTATE_MAX, FXSAVE_SIZE)


# The struct's bytes as unsigned 64-bit words, in REG_NAMES' order (its fields' own): one unpack
# where a getattr per register took ~8 us a thread in every freeze.
_WORDS = struct.Struct(f"<{len(REG_NAMES)}Q")
assert _WORDS.size == ctypes.sizeof(ptrace_registers_t)


def regs_to_dict(regs: ptrace_registers_t) -> dict[str, int]:
    return dict(zip(REG_NAMES, _WORDS.unpack(bytes(regs)), strict=True))


def dict_to_regs(values: dict[str, int], base: ptrace_registers_t | None = None) -> ptrace_registers_t:
    """A struct from ``values``; names missing from it keep ``base``'s value. Negative ints are
    taken as two's complement, so ``orig_rax=-1`` works."""
    unknown = set(values) - set(REG_NAMES)
    if unknown:
        raise KeyError(f"unknown register name(s): {', '.join(sorted(unknown))}")
    out = ptrace_registers_t()
    for name in REG_NAMES:
        v = values[name] if name in values else (getattr(base, name) if base is not None else 0)
        setattr(out, name, int(v) & MASK64)
    return out


def get_regs(tid: int) -> dict[str, int]:
    return regs_to_dict(raw.getregs(tid))


def set_regs(tid: int, values: dict[str, int]) -> None:
    base = None if set(values) >= set(REG_NAMES) else raw.getregs(tid)
    raw.setregs(tid, dict_to_regs(values, base))


def get_xsave(tid: int) -> bytes:
    """The XSAVE image (NT_X86_XSTATE), or the 512-byte FXSAVE image if the kernel has no xstate regset."""
    try:
        return raw.getregset(tid, raw.NT_X86_XSTATE, XSTATE_MAX)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENODEV, errno.EIO):
            raise
    return raw.getregset(tid, raw.NT_PRFPREG, FXSAVE_SIZE)


def set_xsave(tid: int, data: bytes) -> None:
    note = raw.NT_PRFPREG if len(data) == FXSAVE_SIZE else raw.NT_X86_XSTATE
    raw.setregset(tid, note, data)


def signed64(v: int) -> int:
    v &= MASK64
    return v - 2**64 if v >= 2**63 else v
