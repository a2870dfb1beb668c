"""Threads dumped inside restart_syscall: which syscall the kernel was going to continue.

A timed wait (futex with a timeout, nanosleep, poll...) interrupted by a stop returns
-ERESTART_RESTARTBLOCK; when the thread runs on, the kernel calls restart_syscall, which continues
from the task's restart_block. A restore re-issues the original syscall instead (restore/task.py
resume_regs). But a thread that was already in restart_syscall when it was dumped (it was stopped
before: by the freeze of an earlier dump of the same chain, a debugger, SIGSTOP) shows only
restart_syscall in orig_rax: the original number is gone from its registers, and a restart_syscall
issued in the new process returns EINTR (its restart_block is empty).

An earlier layer of the chain often still holds the thread as it was at the first interruption:
same instruction pointer, same argument registers, the real syscall in orig_rax. That one is
re-issued. Otherwise the thread resumes with EINTR, as CRIU's restore always does here, and the
restore says so (a warning): never a silent difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ckpt import sysno as nr
from ckpt.image.format import ThreadRecord
from ckpt.ptrace.regs import signed64

ARGS = ("rip", "rdi", "rsi", "rdx", "r10", "r8", "r9")


def _restarting(th: ThreadRecord) -> bool:
    r = th.regs
    return signed64(r.get("rax", 0)) == -nr.ERESTART_RESTARTBLOCK and r.get("orig_rax") == nr.RESTART_SYSCALL


def _original(th: ThreadRecord, older: Sequence[Sequence[ThreadRecord]]) -> int | None:
    """The syscall `th` was in when first interrupted, from the newest older layer that saw it."""
    want = tuple(th.regs.get(k) for k in ARGS)
    for threads in older:
        o = next((x for x in threads if x.tid == th.tid), None)
        if o is None or tuple(o.regs.get(k) for k in ARGS) != want:
            return None  # the thread was elsewhere then: this interruption came later
        if signed64(o.regs.get("rax", 0)) != -nr.ERESTART_RESTARTBLOCK:
            return None
        n = signed64(o.regs.get("orig_rax", -1))
        if n >= 0 and n != nr.RESTART_SYSCALL:
            return n
    return None


def resolve_restarts(
    threads: Sequence[ThreadRecord], older: Sequence[Sequence[ThreadRecord]]
) -> tuple[list[ThreadRecord], list[str]]:
    """`threads` with each restart_syscall replaced by the syscall it continues where an older
    layer's threads (`older`, newest first) tell it; warnings for those that will see EINTR."""
    out: list[ThreadRecord] = []
    warnings: list[str] = []
    for th in threads:
        if not _restarting(th):
            out.append(th)
            continue
        n = _original(th, older)
        if n is None:
            warnings.append(
                f"thread {th.tid} was stopped inside an interrupted timed wait (restart_syscall) before "
                "this chain's first dump saw it: it resumes with EINTR from that wait, as after a CRIU "
                "restore"
            )
            out.append(th)
        else:
            out.append(replace(th, regs={**th.regs, "orig_rax": n}))
    return out, warnings
