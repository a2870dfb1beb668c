"""A `ckpt dump` SIGKILLed inside its freeze (issue 10 leftover): the signals its injected calls took
off the target's threads must not be lost with it.

The target (tests/targets/sigtarget.c, counting SIGUSR1 and summing sigqueue'd SIGRTMIN values) is
stopped by the test (SIGSTOP) and sent both signals, which stay pending in its group-stop. The dump
seizes it; its first injected call resumes a thread, which dequeues them (signal-delivery-stops:
ckpt holds them for the thaw). The dump is held before its copy (CKPT_DUMP_TEST_HOLD=copy: frozen,
its injections done) and SIGKILLed there: the kernel detaches the threads, the process stays in its
group-stop, and a SIGCONT must let it take both signals, each once."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.util import ROOT, Target

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
WAIT = 60.0
_libc = ctypes.CDLL(None, use_errno=True)


def _sigqueue(pid: int, sig: int, value: int) -> None:
    class _Val(ctypes.Union):
        _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]

    if _libc.sigqueue(pid, sig, _Val(i=value)) != 0:
        raise OSError(ctypes.get_errno(), "sigqueue")


def _pending(pid: int) -> int:
    """The signals pending on the process (shared) and on any of its threads."""
    out = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith(("SigPnd:", "ShdPnd:")):
                out |= int(line.split()[1], 16)
    return out


def _killed_in_its_freeze(t: Target, d: Path) -> None:
    """`ckpt dump` of the target held before its copy (frozen, its injected calls done), then
    SIGKILLed there: the kernel, not ckpt, lets the target's threads go."""
    r, w = os.pipe()
    env = dict(ENV, CKPT_DUMP_TEST_HOLD="copy", CKPT_DUMP_TEST_HOLD_FD=str(w))
    env["CKPT_DUMP_TEST_HOLD_ANY_THREAD"] = "1"  # (the freezing thread: only a SIGKILL ends it)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "dump", "--pid", str(t.pid), "-D", str(d)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, pass_fds=(w,),
    )  # fmt: skip
    os.close(w)
    try:
        with os.fdopen(r, "rb") as hold:
            assert hold.readline() == b"copy\n", p.communicate(timeout=WAIT)
        p.kill()
        p.communicate(timeout=WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
    assert p.returncode == -signal.SIGKILL
    assert t.tracer() == 0


def test_a_killed_dump_leaves_its_target_unharmed(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """A running target: the dump's last injected calls (a single-step's forced SIGTRAP, a batch's
    end signal) had left its threads in stops for ckpt's own signals, which the kernel's detach
    delivered at ckpt's death (SIGTRAP, SIG_DFL: the target was killed). Now it runs on, as it was."""
    t = spawn("sigtarget")
    _killed_in_its_freeze(t, tmp_path / "d")
    assert t.cmd("count") == "usr1 0 code 0 pid 0 rt 0 sum 0"
    assert t.proc.poll() is None


def test_signals_held_by_a_killed_dump_are_not_lost(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = spawn("sigtarget")
    os.kill(t.pid, signal.SIGSTOP)
    assert os.waitid(os.P_PID, t.pid, os.WSTOPPED | os.WNOWAIT) is not None
    os.kill(t.pid, signal.SIGUSR1)
    _sigqueue(t.pid, signal.SIGRTMIN, 77)
    bits = 1 << (signal.SIGUSR1 - 1) | 1 << (signal.SIGRTMIN - 1)
    assert _pending(t.pid) & bits == bits
    _killed_in_its_freeze(t, tmp_path / "d")
    assert _pending(t.pid) & bits == bits  # back on the kernel's queues, not in a dead ckpt
    os.kill(t.pid, signal.SIGCONT)
    # Each taken once; SIGUSR1 with its own siginfo (kill(): SI_USER, this test's pid), SIGRTMIN with
    # its sigqueue value.
    assert t.cmd("count") == f"usr1 1 code 0 pid {os.getpid()} rt 1 sum 77"
