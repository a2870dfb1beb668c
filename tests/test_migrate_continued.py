"""A SIGCONT of someone else's during the hand-over (issue 10): after the final dump the original is
held in ckpt's own SIGSTOP while the destination builds its copy. Continued by someone else then (a
shell's `fg`, `kill -CONT`), it runs on: committing would kill it and lose what it did since the
dump, and for a moment two copies would run. The source looks right before it sends COMMIT
(source.continued): the migration is abandoned the ordinary way (the destination kills its copy),
the original runs on untracked, and the message says why.

Deterministic: ckpt pauses once READY came, before its COMMIT (CKPT_MIGRATE_TEST_PAUSE=ready,
ckpt/migrate/testhold.py); the test waits for the original's hand-over stop (waitid WSTOPPED|WNOWAIT:
it is the test's child), continues it, and lets ckpt go on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.test_cgthrottle_guard import _children
from tests.test_migrate import Server, _rounds, _state, _uffds, server
from tests.test_migrate_guard_final import WAIT
from tests.test_migrate_stopped import _line, _waitstop, migrating
from tests.test_tree_migrate import TREE
from tests.util import Target

__all__ = ["migrating", "server"]  # the fixtures, used by name


def _continued(pid: int) -> None:
    """The test's child `pid`, in its group-stop, continued; returned once the kernel says so."""
    _waitstop(pid)
    os.kill(pid, signal.SIGCONT)
    assert os.waitid(os.P_PID, pid, os.WCONTINUED | os.WNOHANG | os.WNOWAIT) is not None


def _only_running(ours: list[int], before: set[int]) -> None:
    """Of the test's children, only `ours` are alive: a copy the destination killed and left to its
    parent's end is a zombie here (the test is a subreaper, tests/test_migrate.py), reaped now.
    Children that were there `before` the test are not its own (the worker's session-wide ones, such
    as the VM session of tests/vm, started by another test of this worker)."""
    for k in _children(os.getpid()):
        if k not in ours and k not in before:
            assert _state(k) == "Z", f"{k} runs: {Path(f'/proc/{k}/cmdline').read_bytes()!r}"
            with contextlib.suppress(ChildProcessError):
                os.waitpid(k, 0)
    assert set(ours) <= set(_children(os.getpid()))


def _abandoned(m: subprocess.Popen[bytes], s: Server, pid: int) -> tuple[str, dict[str, object]]:
    """The migration failed with the one line, its --json end object saying so; the destination
    dropped its copy (exit 1, nothing of it left: the test is a subreaper, an orphan would be ours)."""
    assert m.wait(WAIT) == 1
    assert m.stderr is not None and m.stdout is not None
    err = m.stderr.read().decode()
    line = (
        f"ckpt: the original process {pid} was continued by someone else (SIGCONT) during the "
        "hand-over; its writes since the final dump would be lost: migration abandoned; "
    )
    assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err, err
    end = json.loads(m.stdout.read().decode().splitlines()[-1])
    assert end["failed"] == "continued" and end["error"] == err[len("ckpt: ") :].strip(), end
    assert s.proc.wait(WAIT) == 1, s.stderr()  # no COMMIT: its copy killed
    return err, end


def test_sigcont_before_commit_abandons(
    spawn: Callable[..., Target], server: Callable[..., Server], migrating: Callable[..., tuple]
) -> None:
    before = set(_children(os.getpid()))
    t, ref = _rounds(spawn, "512"), _rounds(spawn, "512")
    assert t.cmd("round") == ref.cmd("round")
    s = server()
    m, holds, pause = migrating(t.pid, s.addr, "--policy", "rounds:1", CKPT_MIGRATE_TEST_PAUSE="ready")
    assert _line(holds) == "ready"  # the copy built and held there; no COMMIT yet
    _continued(t.pid)  # ckpt's hand-over stop, ended by someone else
    pause.write(b"g")
    err, end = _abandoned(m, s, t.pid)
    assert err.endswith(f"; the original process {t.pid} runs on (untracked)\n"), err
    assert end["source_pid"] == t.pid
    # Exactly one copy: the original, running, untracked, its memory right.
    assert t.proc.poll() is None and t.tracer() == 0 and _uffds(t.pid) == 0
    assert t.state() != "T"
    _only_running([t.pid, ref.pid], before)
    for _ in range(2):
        assert t.cmd("round") == ref.cmd("round")


def test_tree_sigcont_before_commit_abandons(
    server: Callable[..., Server], migrating: Callable[..., tuple]
) -> None:
    """The same for a tree (tree.py commits through the same committer): its root continued by
    someone else; the tree runs on, whole (the root reads its child's word and reaps it)."""
    before = set(_children(os.getpid()))
    p = subprocess.Popen(
        [sys.executable, "-c", TREE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    child = 0
    try:
        assert p.stdout is not None
        word, c = p.stdout.readline().split()
        assert word == b"ready"
        child = int(c)
        s = server("--new-pids")
        m, holds, pause = migrating(p.pid, s.addr, CKPT_MIGRATE_TEST_PAUSE="ready")
        assert _line(holds) == "ready"
        _continued(p.pid)
        pause.write(b"g")
        err, _ = _abandoned(m, s, p.pid)
        assert err.endswith(f"; the tree of pid {p.pid} runs on\n"), err
        _only_running([p.pid], before)
        # Its child was continued by ckpt (its stop was ckpt's): both run, and talk.
        os.kill(child, signal.SIGUSR1)
        os.kill(p.pid, signal.SIGUSR1)
        line = p.stdout.readline().decode().strip()
        assert line == f"parent {p.pid} {child} 0 True hello from the child", line
        assert p.wait(WAIT) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
