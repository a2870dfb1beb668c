"""A tree migration that fails must continue only what ckpt stopped (ckpt/migrate/tree.py, guard.py
`decide`): a member that someone else stopped meanwhile (here the root itself, as a shell's job
control does) stays stopped, whether ckpt gives the tree back itself or its guard does after a
SIGKILL of ckpt, which walks the root's descendants again.

ckpt pauses after its first walk (CKPT_MIGRATE_TEST_PAUSE=tree-walked, ckpt/migrate/testhold.py);
the root then stops one of its children (the one the first walk saw, or one it forks now) and
waits for the stop (waitpid WUNTRACED), so the stop precedes the tree dump. ckpt goes on, and
either is held once the tree dump has stopped the tree (tree-dumped) and SIGKILLed there, or fails
at READY by itself. Every other process runs on; the stopped child is still stopped, and runs once
the test continues it (the root's end reports each child's exit). Bounded waits, on events."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_cgthrottle_guard import _exited, _guard_of
from tests.test_guard_tree_fork import _line
from tests.test_migrate import ENV, ROOT, Server, _ckpt, server
from tests.test_migrate_guard_final import WAIT, _kill

__all__ = ["server"]  # the fixture, used by name

STOPPER = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
def fork():
    c = os.fork()
    if c == 0:
        signal.sigwait({signal.SIGUSR1})
        os._exit(7)
    kids.append(c)
    return c
kids = []
print("ready", fork(), flush=True)
signal.sigwait({signal.SIGUSR2})
c = fork() if sys.argv[1] == "late" else kids[0]
os.kill(c, signal.SIGSTOP)
os.waitpid(c, os.WUNTRACED)  # (returns once it is in its stop)
print("stopped", c, flush=True)
signal.sigwait({signal.SIGUSR1})
codes = []
for c in kids:
    os.kill(c, signal.SIGUSR1)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(c, 0)[1]))
print("done", *codes, flush=True)
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("which", ["first", "late"])
@pytest.mark.parametrize("how", ["sigkill", "fails"])
def test_a_child_stopped_by_someone_else_stays_stopped(
    server: Callable[..., Server], which: str, how: str
) -> None:
    p = subprocess.Popen([sys.executable, "-c", STOPPER, which], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    s = server("--new-pids")  # over loopback the original tree holds the pids (restore/pidheld.py)
    m: subprocess.Popen[bytes] | None = None
    kids: list[int] = []
    try:
        assert p.stdout is not None
        word, first = _line(p.stdout, "ready").split()
        assert word == "ready"
        kids.append(int(first))
        hr, hw = os.pipe()
        pr, pw = os.pipe()
        env = dict(ENV, CKPT_MIGRATE_TEST_HOLD_FD=str(hw), CKPT_MIGRATE_TEST_PAUSE="tree-walked",
                   CKPT_MIGRATE_TEST_PAUSE_FD=str(pr))  # fmt: skip
        if how == "sigkill":
            env["CKPT_MIGRATE_TEST_HOLD"] = "tree-dumped"
        else:
            env["CKPT_MIGRATE_TEST_FAIL_AT_READY"] = "1"
        m = subprocess.Popen(
            _ckpt("migrate", "--pid", str(p.pid), "--to", s.addr), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env, cwd=ROOT, pass_fds=(hw, pr),
        )  # fmt: skip
        os.close(hw)
        os.close(pr)
        with os.fdopen(hr, "rb") as holds, os.fdopen(pw, "wb", buffering=0) as pause:
            assert _line(holds, "tree-walked") == "tree-walked"
            guard = _guard_of(m.pid)
            os.kill(p.pid, signal.SIGUSR2)  # the root stops a child, after the first walk
            word, stopped = _line(p.stdout, "stopped").split()
            assert word == "stopped"
            if int(stopped) not in kids:
                kids.append(int(stopped))
            pause.write(b"g")
            if how == "sigkill":
                assert _line(holds, "tree-dumped") == "tree-dumped"
                _kill(m)
            else:
                assert m.stderr is not None
                err = m.stderr.read().decode()
                assert m.wait(WAIT) == 1, err
                assert (
                    "test: failing between READY and COMMIT" in err
                    and f"the tree of pid {p.pid} runs on" in err
                )
        _exited(guard)
        assert s.proc.wait(WAIT) == 1  # no COMMIT: the destination dropped its copy
        for q in (p.pid, *kids):
            if q == int(stopped):
                assert _state(q) == "T", f"process {q}, stopped by its parent, was continued"
            else:
                assert _state(q) != "T", f"process {q} left stopped"
        os.kill(int(stopped), signal.SIGCONT)  # (as its stopper would)
        os.kill(p.pid, signal.SIGUSR1)
        assert _line(p.stdout, "the tree's end") == "done" + " 7" * len(kids)
        assert p.wait(WAIT) == 0
    finally:
        if m is not None and m.poll() is None:
            m.kill()
            m.wait()
        if p.poll() is None:
            p.kill()
            p.wait()
        for k in kids:  # (left behind by a failure: orphans of ours, the subreaper)
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(k, 0)
