"""A traced thread's seccomp filters, read as CRIU does (PTRACE_SECCOMP_GET_FILTER), and what in
them a restore could not give back.

Both requests need CAP_SYS_ADMIN in the tracer and a tracee in a ptrace-stop. Filter 0 is the most
recently installed; the list returned here is oldest first, the order to install them again.
"""

from __future__ import annotations

import ctypes
import errno
import struct

from ckpt import sysno as nr
from ckpt.cbuf import char_buffer, warm
from ckpt.ptrace import raw

PTRACE_SETOPTIONS = 0x4200
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
PTRACE_O_SUSPEND_SECCOMP = 1 << 21
MAX_FILTERS = 512
BPF_MAXINSNS = 4096
INSN = struct.Struct("<HBBI")  # struct sock_filter: code, jt, jf, k
METADATA = struct.Struct("<QQ")  # struct seccomp_metadata: filter_off, flags
warm(ctypes.c_char, METADATA.size)  # (made at import, not in a freeze: ckpt/cbuf.py)
BPF_CLASS_RET = 0x06
BPF_RVAL_MASK = 0x18
BPF_K, BPF_A = 0x00, 0x10
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
# Flags a filter can be installed with that seccomp() takes again. The metadata reports FLAG_LOG only.
RESTORABLE_FLAGS = nr.SECCOMP_FILTER_FLAG_LOG


def read_filters(tid: int) -> list[tuple[bytes, int]]:
    """(program, flags) of every filter of a stopped tracee, oldest first; raises OSError (EPERM or
    EACCES without CAP_SYS_ADMIN, EMEDIUMTYPE when ckpt itself runs under seccomp)."""
    out: list[tuple[bytes, int]] = []
    for i in range(MAX_FILTERS + 1):
        try:
            n = raw.call(PTRACE_SECCOMP_GET_FILTER, tid, i, 0)
        except OSError as e:
            if e.errno == errno.ENOENT:  # past the oldest filter
                break
            raise
        if i == MAX_FILTERS:
            raise OSError(errno.E2BIG, f"more than {MAX_FILTERS} seccomp filters")
        if not 0 < n <= BPF_MAXINSNS:
            raise OSError(errno.EINVAL, f"a seccomp filter of {n} instructions")
        buf = char_buffer(n * INSN.size)
        got = raw.call(PTRACE_SECCOMP_GET_FILTER, tid, i, ctypes.addressof(buf))
        meta = char_buffer(METADATA.size, METADATA.pack(i, 0))
        raw.call(PTRACE_SECCOMP_GET_METADATA, tid, METADATA.size, ctypes.addressof(meta))
        out.append((buf.raw[: got * INSN.size], METADATA.unpack(meta.raw)[1]))
    out.reverse()
    return out


def filter_problem(prog: bytes, flags: int) -> str | None:
    """Why the filter could not be installed again to the same effect, or None."""
    if flags & ~RESTORABLE_FLAGS:
        return f"installed with flags {flags:#x}"
    for code, _, _, k in INSN.iter_unpack(prog):
        if code & 0x07 != BPF_CLASS_RET:
            continue
        if code & BPF_RVAL_MASK == BPF_A:
            # A computed action might be a user notification, whose listener fd is not ours.
            return "returns a computed action (possibly SECCOMP_RET_USER_NOTIF)"
        if code & BPF_RVAL_MASK == BPF_K and k & SECCOMP_RET_ACTION_FULL == SECCOMP_RET_USER_NOTIF:
            return "returns SECCOMP_RET_USER_NOTIF (its listener is another process's)"
    return None


def suspend(pid: int, options: int) -> None:
    """Stop the tracee's seccomp filters from applying to the syscalls we inject (they apply again
    when it is detached); `options` are the others to keep. Needs CAP_SYS_ADMIN."""
    raw.call(PTRACE_SETOPTIONS, pid, 0, options | PTRACE_O_SUSPEND_SECCOMP)
