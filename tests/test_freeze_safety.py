"""A dump must leave its target exactly as it was: its signal state, its stop state, its fd numbers.

Each case compares the target's /proc/PID/status signal fields and state letter before and after,
and checks the target still answers (or, stopped, answers after SIGCONT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.dump import dump
from ckpt.errors import FreezeError
from ckpt.track.uffdwp import fd_floor
from tests.test_ptrace import wait_for
from tests.util import ROOT, Target, run_ckpt

Spawn = Callable[..., Target]
SIG_FIELDS = ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt", "State", "TracerPid")


def sigstate(pid: int) -> dict[int, dict[str, str]]:
    out = {}
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            fields = dict(ln.rstrip("\n").split(":\t", 1) for ln in f if ":\t" in ln)
        out[tid] = {k: fields[k] for k in SIG_FIELDS}
    return out


def settled(t: Target) -> dict[int, dict[str, str]]:
    """The state once the target is back in its read() (it may still be running after an answer)."""
    assert wait_for(lambda: t.state() == "S")
    return sigstate(t.pid)


@pytest.mark.parametrize("sig", ["SIGTRAP", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE"])
def test_pending_blocked_synchronous_signal_is_refused_untouched(
    spawn: Spawn, tmp_path: Path, sig: str
) -> None:
    t = spawn("sigstate")
    num = int(signal.Signals[sig])
    assert t.cmd(f"pend {num}") == f"pending {num}"
    before = settled(t)
    with pytest.raises(FreezeError, match=rf"{sig} pending and blocked"):
        dump(t.pid, tmp_path)
    p = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "cli"))
    assert p.returncode != 0 and p.stderr.startswith("ckpt: ") and len(p.stderr.splitlines()) == 1
    after = sigstate(t.pid)
    assert after == before
    assert t.cmd("ping") == "pong"


@pytest.mark.parametrize("how", ["block", "ignore"])
def test_blocked_or_ignored_sigtrap_is_left_as_it_was(spawn: Spawn, tmp_path: Path, how: str) -> None:
    """Injected syscalls run to syscall-stops, not single-step traps: a forced SIGTRAP would unblock
    a blocked one and reset an ignored one to SIG_DFL at every dump."""
    t = spawn("sigstate")
    done = {"block": "blocked", "ignore": "ignored"}[how]
    assert t.cmd(f"{how} {int(signal.SIGTRAP)}") == f"{done} {int(signal.SIGTRAP)}"
    before = settled(t)
    dump(t.pid, tmp_path)
    dump(t.pid, tmp_path, incremental=True)
    assert settled(t) == before
    assert t.cmd("ping") == "pong"


def test_group_stopped_target_stays_stopped_with_its_masks(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("sigstate")
    assert t.cmd(f"pend {int(signal.SIGUSR1)}") == f"pending {int(signal.SIGUSR1)}"
    settled(t)
    os.kill(t.pid, signal.SIGSTOP)
    assert wait_for(lambda: t.state() == "T")
    before = sigstate(t.pid)
    dump(t.pid, tmp_path)
    dump(t.pid, tmp_path, incremental=True)
    assert wait_for(lambda: sigstate(t.pid) == before), (sigstate(t.pid), before)
    os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("ping") == "pong"


def test_sigstop_pending_at_the_freeze_still_stops(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("sigstate")
    before = settled(t)
    os.kill(t.pid, signal.SIGSTOP)  # no wait: it may still be pending when the freeze begins
    dump(t.pid, tmp_path)
    stopped = {tid: dict(v, State="T (stopped)") for tid, v in before.items()}
    assert wait_for(lambda: sigstate(t.pid) == stopped), (sigstate(t.pid), stopped)
    os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("ping") == "pong"


def test_target_traced_by_another_tracer_is_refused_untouched(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("sigstate")
    code = (
        "import sys; from ckpt.ptrace import Frozen; f = Frozen(int(sys.argv[1])); f.freeze();"
        " print('frozen', flush=True); sys.stdin.read(); f.thaw()"
    )
    tracer = subprocess.Popen(
        [sys.executable, "-c", code, str(t.pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert tracer.stdout is not None and tracer.stdout.readline() == b"frozen\n"
        before = sigstate(t.pid)
        assert before[t.pid]["State"].startswith("t")
        with pytest.raises(FreezeError, match=rf"already being traced by pid {tracer.pid}"):
            dump(t.pid, tmp_path)
        assert sigstate(t.pid) == before
    finally:
        assert tracer.stdin is not None
        tracer.stdin.close()
        tracer.wait(timeout=30)
    assert t.cmd("ping") == "pong"


def test_vfork_parent_is_refused_at_once_untouched(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("vforker")

    def in_vfork() -> bool:
        # State D alone is not enough: before the vfork the target can sit in D for a moment (a page
        # fault waiting on a locked page cache folio, under load), and a dump started then finds it
        # running, seizes it and waits out its timeout once it enters vfork (failed once that way).
        # Nor is a child with the parent in D: between creating the child and waiting for it the
        # parent can sit in D inside kernel_clone (an allocation, a lock), and a dump then found it
        # sharing its memory with a child but not yet in vfork's wait (failed once that way). The
        # wait itself shows as wchan kernel_clone, which is what ckpt looks for.
        with open(f"/proc/{t.pid}/task/{t.pid}/children") as f:
            if not f.read().split() or t.state() != "D":
                return False
        with open(f"/proc/{t.pid}/task/{t.pid}/wchan") as f:
            return f.read().strip() == "kernel_clone"

    assert wait_for(in_vfork)
    before = sigstate(t.pid)
    with pytest.raises(FreezeError, match=r"is in vfork\(\)"):
        dump(t.pid, tmp_path)
    assert sigstate(t.pid) == before
    assert t.proc.stdin is not None
    t.proc.stdin.write(b"go\n")
    assert t.readline() == "done"
    assert t.cmd("ping") == "pong"
    assert sigstate(t.pid)[t.pid]["TracerPid"] == "0"


def test_injected_userfaultfd_sits_high(spawn: Spawn, tmp_path: Path) -> None:
    """The target's next open() gets the number it would have got without the dump."""
    t = spawn("sigstate")
    expected = t.cmd("open")
    r = dump(t.pid, tmp_path, track="uffd-wp")
    assert t.cmd("open") == expected
    links = {int(n): os.readlink(f"/proc/{t.pid}/fd/{n}") for n in os.listdir(f"/proc/{t.pid}/fd")}
    uffd = [n for n, target in links.items() if target == "anon_inode:[userfaultfd]"]
    assert len(uffd) == 1 and uffd[0] >= fd_floor(t.pid) > 2
    show = run_ckpt("show", r.layer, check=True).stdout
    assert f"uffd-wp (fd {uffd[0]} in the target)" in show
    dump(t.pid, tmp_path, incremental=True)  # the tracker works from its high fd
    assert t.cmd("open") == expected
