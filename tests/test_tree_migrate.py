"""`ckpt migrate` of a process with children (issue 12 B3): the whole tree in one stop-and-copy
(ckpt/migrate/tree.py), restored by `ckpt serve` and let go only on the source's commit; the
original tree is killed once the copy runs. Over loopback the original's pids are still in use when
the copy is built, so the copy has new ones: the processes check themselves by what they can know
(their memory, a pipe between them, the parent waiting for its child), not by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.test_migrate import Server, migrate, server  # noqa: F401 (a fixture)

TREE = """
import os, signal, sys
data = bytes(range(256)) * 256
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
r, w = os.pipe()
c = os.fork()
if c == 0:
    os.close(r)
    mine = bytes(reversed(data))
    signal.sigwait({signal.SIGUSR1})
    os.write(w, b"hello from the child")
    os._exit(0 if mine == bytes(reversed(data)) else 3)
os.close(w)
print("ready", c, flush=True)
signal.sigwait({signal.SIGUSR1})
msg = os.read(r, 100).decode()
pid, st = os.wait()
ok = data == bytes(range(256)) * 256
print("parent", os.getpid(), pid, os.waitstatus_to_exitcode(st), ok, msg, flush=True)
"""


def _children(pid: int) -> list[int]:
    return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_tree_migrates(tmp_path: Path, server: Callable[..., Server]) -> None:  # noqa: F811
    p = subprocess.Popen(
        [sys.executable, "-c", TREE],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    s = server("--new-pids")  # over loopback the original tree holds the pids: new ones (restore/pidheld.py)
    kids: list[int] = []
    try:
        assert p.stdout is not None
        word, child = p.stdout.readline().split()
        assert word == b"ready"
        rc, lines, err = migrate(p.pid, s.addr, "--max-rounds", "3")
        assert rc == 0, err
        done = lines[-1]
        assert done["source_pid"] == p.pid and done["policy"] == "tree", done
        # Options for live rounds are named as not used, not dropped without a word.
        assert any("--max-rounds 3: not used" in w for w in done["warnings"]), done  # type: ignore[attr-defined]
        assert p.wait(30) == -signal.SIGKILL  # the original, once the copy ran
        with contextlib.suppress(ChildProcessError):
            os.waitpid(int(child), 0)  # its child, killed too: an orphan, ours (subreaper)
        new = s.done()
        assert s.last["layers"] == ["layer-0001.ckpt"], s.last
        member = [x.relative_to(s.dir) for x in s.dir.glob("tree/*/layer-0001.ckpt")]
        assert [str(m).split("-")[0] for m in member] == [f"tree/{child.decode()}"], member
        kids = _children(new)
        assert len(kids) == 1
        os.kill(kids[0], signal.SIGUSR1)
        os.kill(new, signal.SIGUSR1)
        line = s.other[0] if s.other else s.chan.readline()
        assert line == f"parent {new} {kids[0]} 0 True hello from the child", line
        _, status = os.waitpid(new, 0)  # serve's orphan, so ours
        s.pid = None
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        p.kill()
        p.wait()
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)


def test_tree_that_cannot_be_restored_runs_on(tmp_path: Path, server: Callable[..., Server]) -> None:  # noqa: F811
    """A tree the destination could not restore (an eventfd shared by parent and child): refused
    before anything is sent as final; the original tree is let go (SIGCONT) and runs on."""
    code = (
        "import os, signal, sys\n"
        "e = os.eventfd(3)\n"
        "c = os.fork()\n"
        "if c == 0:\n"
        "    signal.pause()\n"
        "print('ready', c, flush=True)\n"
        "sys.stdin.readline(); print('still here', flush=True)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    s = server("--new-pids")  # over loopback the original tree holds the pids: new ones (restore/pidheld.py)
    child = 0
    try:
        assert p.stdout is not None and p.stdin is not None
        _, c = p.stdout.readline().split()
        child = int(c)
        rc, _, err = migrate(p.pid, s.addr)
        assert rc == 1 and "one open anon_inode:[eventfd]" in err and "runs on" in err, err
        assert len(err.strip().splitlines()) == 1, err
        for x in (p.pid, child):
            state = Path(f"/proc/{x}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert state in "SR", (x, state)
        p.stdin.write(b"\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"still here\n"
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)
