"""A process tree whose root forks after the migration's first walk (ckpt/migrate/tree.py): the
tree dump stops the new process with the others, and a SIGKILL of `ckpt migrate` before the
members as dumped are told to the guard must not leave it stopped. The guard, continuing a tree,
walks the root's descendants again (guard.py `descendants`).

ckpt pauses after its first walk (CKPT_MIGRATE_TEST_PAUSE=tree-walked, ckpt/migrate/testhold.py),
the root forks then, ckpt goes on and is held once the tree dump has stopped the tree (tree-dumped)
and killed there. Every process of the tree must run on: the root signals each child, which exits,
and reports their exit statuses (a stopped child would never exit). Bounded waits, on events."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable

from tests.test_cgthrottle_guard import _exited, _guard_of
from tests.test_migrate import ENV, ROOT, Server, _ckpt, server
from tests.test_migrate_guard_final import WAIT, _kill

__all__ = ["server"]  # the fixture, used by name

FORKER = """
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
def child():
    signal.sigwait({signal.SIGUSR1})
    os._exit(7)
kids = []
def fork():
    c = os.fork()
    if c == 0:
        child()
    kids.append(c)
    return c
print("ready", fork(), flush=True)
while signal.sigwait({signal.SIGUSR1, signal.SIGUSR2}) == signal.SIGUSR2:
    print("forked", fork(), flush=True)
codes = []
for c in kids:
    os.kill(c, signal.SIGUSR1)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(c, 0)[1]))
print("done", *codes, flush=True)
"""


def _line(f: object, what: str) -> str:
    assert select.select([f], [], [], WAIT)[0], f"no {what} within {WAIT}s"
    return f.readline().decode().strip()  # type: ignore[attr-defined]


def test_a_process_forked_after_the_first_walk_is_continued(server: Callable[..., Server]) -> None:
    p = subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    s = server()
    m: subprocess.Popen[bytes] | None = None
    kids: list[int] = []
    try:
        assert p.stdout is not None
        word, first = _line(p.stdout, "ready").split()
        assert word == "ready"
        kids.append(int(first))
        hr, hw = os.pipe()
        pr, pw = os.pipe()
        env = dict(ENV, CKPT_MIGRATE_TEST_HOLD="tree-dumped", CKPT_MIGRATE_TEST_HOLD_FD=str(hw),
                   CKPT_MIGRATE_TEST_PAUSE="tree-walked", CKPT_MIGRATE_TEST_PAUSE_FD=str(pr))  # fmt: skip
        m = subprocess.Popen(
            _ckpt("migrate", "--pid", str(p.pid), "--to", s.addr), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=env, cwd=ROOT, pass_fds=(hw, pr),
        )  # fmt: skip
        os.close(hw)
        os.close(pr)
        with os.fdopen(hr, "rb") as holds, os.fdopen(pw, "wb", buffering=0) as pause:
            assert _line(holds, "tree-walked") == "tree-walked"
            guard = _guard_of(m.pid)
            os.kill(p.pid, signal.SIGUSR2)  # the root forks, after the first walk
            word, late = _line(p.stdout, "forked").split()
            assert word == "forked"
            kids.append(int(late))
            pause.write(b"g")
            assert _line(holds, "tree-dumped") == "tree-dumped"
        _kill(m)
        _exited(guard)
        assert s.proc.wait(WAIT) == 1  # no COMMIT: the destination dropped its copy
        for q in (p.pid, int(first), int(late)):
            with open(f"/proc/{q}/stat") as f:
                assert f.read().rsplit(")", 1)[1].split()[0] != "T", f"process {q} left stopped"
        os.kill(p.pid, signal.SIGUSR1)
        assert _line(p.stdout, "the tree's end") == "done 7 7"
        assert p.wait(WAIT) == 0
    finally:
        if m is not None and m.poll() is None:
            m.kill()
            m.wait()
        if p.poll() is None:
            p.kill()
            p.wait()
        for k in kids:  # (left stopped by a failure: orphans of ours, the subreaper)
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(k, 0)
