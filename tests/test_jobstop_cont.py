"""The job-control stop a dump records agrees with what the kernel has when the freeze ends
(ckpt/jobstop.py): a SIGCONT that comes while ckpt holds a stopped process frozen ends its
group-stop, and waits pending; the record says running, not stopped with a SIGCONT pending (restored
so, the stop signal would flush that SIGCONT and its handler would never run)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable

from ckpt.jobstop import stop_record
from ckpt.proc.props import queued_signals
from ckpt.ptrace import Frozen
from tests.util import Target


def _stopped(spawn: Callable[..., Target]) -> Target:
    t = spawn("jobstop", "7", process_group=0, stderr=subprocess.DEVNULL)
    assert t.cmd(f"stop {int(signal.SIGSTOP)}") == "stopping"
    _, st = os.waitpid(t.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGSTOP
    return t


def test_a_sigcont_while_frozen_ends_the_recorded_stop(spawn: Callable[..., Target]) -> None:
    t = _stopped(spawn)
    with Frozen(t.pid) as fz:
        assert fz.was_stopped
        before = stop_record(fz, None, False, queued_signals(fz.tids))
        os.kill(t.pid, signal.SIGCONT)  # queued, and the group-stop ended, before kill() returns
        pending = queued_signals(fz.tids)
        assert signal.SIGCONT in {p["sig"] for p in pending}
        after = stop_record(fz, None, False, pending)
        mark = stop_record(fz, None, True, pending)
    assert before == {"stop": signal.SIGSTOP, "ckpt_stopped": False}
    assert after == {"stop": 0, "ckpt_stopped": False}
    assert mark["stop"] == 0
    # The original runs on, its SIGCONT handler run once, as the record says.
    assert t.chan.readline() == "resumed conts 1 value 7"
    assert t.cmd("ping") == "pong conts 1 value 7"


def test_was_stopped_is_what_the_seize_saw(spawn: Callable[..., Target]) -> None:
    """Stopped between the /proc read (prepare) and the seize: the freeze says stopped, as the
    group-stop it met; the thaw leaves it stopped, with no SIGSTOP of its own queued."""
    t = spawn("jobstop", "9", process_group=0, stderr=subprocess.DEVNULL)
    assert t.cmd("ping") == "pong conts 0 value 9"
    fz = Frozen(t.pid)
    fz.prepare()
    os.kill(t.pid, signal.SIGSTOP)
    _, st = os.waitpid(t.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(st)
    with fz:
        assert fz.was_stopped
        assert fz.group_stops
        assert stop_record(fz, None, True, ()) == {"stop": signal.SIGSTOP, "ckpt_stopped": False}
    with open(f"/proc/{t.pid}/status") as f:
        shd = next(ln for ln in f if ln.startswith("ShdPnd:"))
    assert int(shd.split()[1], 16) == 0  # no extra SIGSTOP left pending
    os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("ping") == "pong conts 1 value 9"
