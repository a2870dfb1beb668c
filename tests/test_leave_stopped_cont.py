"""`dump --leave-stopped` (Frozen.thaw(leave_stopped=True)) with a SIGCONT sent to the target while it
is frozen: the user asked for the process stopped at the end, so it is left stopped, and the freeze
says a SIGCONT came (Frozen.continued_meanwhile; the dump warns). The SIGCONT counts as sent just before
the dump's stop: the SIGSTOP discards it, as the kernel discards a pending SIGCONT at any stop signal,
whether it was still queued or taken off a thread by an injected syscall (held for the thaw). A later
SIGCONT continues the process and runs its handler once."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable

import pytest

from ckpt import sysno
from ckpt.ptrace import Frozen
from tests.util import Target

Spawn = Callable[..., Target]


def _target(spawn: Spawn, stopped: bool) -> Target:
    t = spawn("jobstop", "5", process_group=0, stderr=subprocess.DEVNULL)
    if stopped:
        assert t.cmd(f"stop {int(signal.SIGSTOP)}") == "stopping"
        _, st = os.waitpid(t.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGSTOP
    else:
        assert t.cmd("ping") == "pong conts 0 value 5"
    return t


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
@pytest.mark.parametrize("injected", [False, True], ids=["queued", "held"])
def test_left_stopped_despite_a_sigcont_in_the_freeze(spawn: Spawn, stopped: bool, injected: bool) -> None:
    t = _target(spawn, stopped)
    with Frozen(t.pid) as fz:
        assert fz.was_stopped == stopped
        os.kill(t.pid, signal.SIGCONT)
        if injected:  # the thread takes the SIGCONT at its resume: held, given back at an ordinary thaw
            assert fz.syscall(sysno.GETPID) > 0
            assert signal.SIGCONT in fz.held_signals.get(t.pid, [])
        fz.thaw(leave_stopped=True)
        assert fz.continued_meanwhile
    assert t.stopped_state() == "T"
    _, st = os.waitpid(t.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGSTOP
    os.kill(t.pid, signal.SIGCONT)
    if stopped:  # raise() returns: the handler ran once, for this SIGCONT (the freeze's was discarded)
        assert t.readline() == "resumed conts 1 value 5"
    assert t.cmd("ping") == "pong conts 1 value 5"


def test_no_sigcont_no_word(spawn: Spawn) -> None:
    t = _target(spawn, False)
    with Frozen(t.pid) as fz:
        fz.thaw(leave_stopped=True)
        assert not fz.continued_meanwhile
    assert t.stopped_state() == "T"
    os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("ping") == "pong conts 1 value 5"
