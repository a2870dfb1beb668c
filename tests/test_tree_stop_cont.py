"""A tree's leave-stopped thaw (dumptree._Tree.thaw) names, before any SIGSTOP, every member that its
SIGSTOP stops: a migration keeps them (`ours`, the guard's ckpt_stopped) to continue on abort. A member
that was stopped when frozen is stopped again by the thaw when its user's SIGCONT ended that stop
meanwhile (Frozen.continued_meanwhile): it is named too, so that an abort continues it, as its user
did. The SIGCONT either still queued or taken off the thread by an injected syscall (held).

The root is this test's child (waitpid WUNTRACED shows its stops); it has one child of its own, which
runs throughout. Bounded waits, on events."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys

import pytest

from ckpt import sysno
from ckpt.dumptree import _Tree
from ckpt.ptrace.resumestop import continue_stopped

WAIT = 60.0
ROOT = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
c = os.fork()
if c == 0:
    while True:
        signal.sigwait({signal.SIGUSR1})
        print("kid", flush=True)
print("ready", c, flush=True)
for line in sys.stdin:
    print("pong", flush=True)
"""


def _line(f: object, what: str) -> str:
    assert select.select([f], [], [], WAIT)[0], f"no {what} within {WAIT}s"
    return f.readline().decode().strip()  # type: ignore[attr-defined]


@pytest.mark.parametrize("injected", [False, True], ids=["queued", "held"])
def test_a_stopped_member_continued_meanwhile_is_named(injected: bool) -> None:
    p = subprocess.Popen([sys.executable, "-c", ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    kid = 0
    try:
        assert p.stdin is not None and p.stdout is not None
        word, k = _line(p.stdout, "ready").split()
        assert word == "ready"
        kid = int(k)
        os.kill(p.pid, signal.SIGSTOP)
        _, st = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGSTOP
        tree = _Tree()
        told: list[int] = []
        try:
            tree.freeze(p.pid)
            assert set(tree.frozen) == {p.pid, kid}
            fz = tree.frozen[p.pid]
            assert fz.was_stopped and not tree.frozen[kid].was_stopped
            os.kill(p.pid, signal.SIGCONT)  # its user continues it, while frozen
            if injected:
                assert fz.syscall(sysno.GETPID) == p.pid
                assert signal.SIGCONT in fz.held_signals.get(p.pid, [])
        finally:
            tree.thaw(leave_stopped=True, before_stop=told.extend)
        assert fz.continued_meanwhile
        assert sorted(told) == sorted([p.pid, kid]), "a member the thaw stopped is not named"
        _, st = os.waitpid(p.pid, os.WUNTRACED)  # stopped again by the thaw's SIGSTOP
        assert os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGSTOP
        # An abort continues what was named (ckpt/migrate/tree.py _let_go): both run.
        assert continue_stopped(told) == []
        p.stdin.write(b"ping\n")
        p.stdin.flush()
        assert _line(p.stdout, "pong") == "pong"
        os.kill(kid, signal.SIGUSR1)
        assert _line(p.stdout, "kid") == "kid"
    finally:
        for q in (p.pid, kid):
            if q:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(q, signal.SIGKILL)
        p.wait()
        if kid:  # (reaped here if this process is its subreaper)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(kid, 0)
