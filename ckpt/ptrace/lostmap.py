"""An injected mmap whose wait gave up (a step or a syscall-exit that outlived its timeout, a thread
"stuck, unstoppable") may have mapped all the same: the caller never learned the address, so nothing
would unmap it, and the process would keep a mapping of ckpt's (the batch's code, a scratch area).

Once the thread is in a stop again its registers tell: stopped past the ``syscall`` instruction
(rip at the call's end, orig_rax the call's number), rax holds what the call returned, an address
when it mapped. Before the call ran rip is still at the instruction; at the syscall-entry stop of
the two-stop way rax is -ENOSYS; a call the interrupt cut short returns -errno (or -ERESTART*):
none of them is taken for a mapping. Frozen.syscall asks where the thread is stopped when the
injection fails, Frozen._detach where a thread left running stops at the thaw; the mapping is
unmapped by an injected munmap (tests/test_step_leak.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ckpt import sysno as nr
from ckpt.ptrace import raw, regs

PAGE = 4096
USER_TOP = 1 << 47


@dataclass(frozen=True)
class PendingMmap:
    """An injected mmap whose result was not read: where its thread stops once it ran, and its length."""

    done_rip: int
    length: int


def pending(nr_: int, site: int, args: list[int]) -> PendingMmap | None:
    """What to look for after an injected call ``nr_`` at ``site`` failed; None: not an mmap."""
    if nr_ != nr.MMAP:
        return None
    return PendingMmap(site + 2, -(-args[1] // PAGE) * PAGE)


def mapped(tid: int, p: PendingMmap) -> tuple[int, int] | None:
    """(address, length) of the mapping the call made, read from the stopped thread; None: it made
    none (not run yet, failed, or cut short)."""
    r = raw.getregs(tid)
    addr = regs.signed64(r.rax)
    if r.rip != p.done_rip or regs.signed64(r.orig_rax) != nr.MMAP:
        return None
    if addr < 0 or addr % PAGE or addr + p.length > USER_TOP or p.length <= 0:
        return None
    return addr, p.length
