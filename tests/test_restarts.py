"""resolve_restarts: the syscall a thread dumped inside restart_syscall continues (restore/restarts.py).

The end-to-end case is tests/test_restore_threads.py::test_thread_blocked_in_read_of_a_pipe (a timed
futex across two back-to-back dumps); these cover the rules on records."""

from __future__ import annotations

from ckpt import sysno as nr
from ckpt.image.format import ThreadRecord
from ckpt.ptrace.regs import MASK64
from ckpt.restore.restarts import resolve_restarts

RESTART = -nr.ERESTART_RESTARTBLOCK & MASK64
ARGS = {"rip": 0x401000, "rdi": 1, "rsi": 2, "rdx": 3, "r10": 4, "r8": 5, "r9": 6}


def th(tid: int, orig: int, rax: int = RESTART, **over: int) -> ThreadRecord:
    return ThreadRecord(tid, {**ARGS, "rax": rax, "orig_rax": orig, **over}, b"", 0, "S")


def test_original_syscall_from_an_older_layer() -> None:
    top = [th(10, nr.RESTART_SYSCALL), th(11, nr.RESTART_SYSCALL)]
    older = [[th(10, nr.RESTART_SYSCALL), th(11, nr.RESTART_SYSCALL)], [th(10, 202), th(11, 230)]]
    out, warnings = resolve_restarts(top, older)
    assert [t.regs["orig_rax"] for t in out] == [202, 230] and warnings == []


def test_moved_thread_or_no_older_layer_warns() -> None:
    top = [th(10, nr.RESTART_SYSCALL), th(11, nr.RESTART_SYSCALL), th(12, 0, rax=7)]
    older = [[th(10, 202, rip=0x402000), th(12, 0, rax=7)]]  # 10 was elsewhere; 11 is new
    out, warnings = resolve_restarts(top, older)
    assert [t.regs["orig_rax"] for t in out] == [nr.RESTART_SYSCALL, nr.RESTART_SYSCALL, 0]
    assert len(warnings) == 2 and all("EINTR" in w for w in warnings)
    assert "thread 10" in warnings[0] and "thread 11" in warnings[1]
