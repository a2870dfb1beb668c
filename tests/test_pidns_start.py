"""The --pidns namespace's init is let go before the restore's last word (a migration's commit), so
that a failure to start it leaves no process and, in a migration, the original running: past the
commit the copy is the only one (restore/pidrestore.py, restore/tree.py). `ckpt migrate` to a
`ckpt serve --pidns` says which process is the copy's init (`init_pid` in its final JSON object).

The failure is made by CKPT_RESTORE_TEST_FAIL_INIT_START=1 (restore/pidns.py): the init's last
step fails once every process of the namespace is built and still stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.restore.pidns import nspid
from tests.test_migrate import Server, migrate, server  # noqa: F401 (a fixture)
from tests.test_restore_tree import ENV, _dump
from tests.util import ROOT

# Answers each line on stdin with the line and its pid; forks a child first with "tree".
ECHO = """
import os, sys
if "tree" in sys.argv and os.fork() == 0:
    os.read(0, 0)
    import signal
    signal.pause()
for line in sys.stdin:
    print(line.strip(), os.getpid(), flush=True)
"""


class Echo:
    def __init__(self, *args: str) -> None:
        self.token = uuid.uuid4().hex  # in its command line: how its copies are found
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO, self.token, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.ask("hello") == f"hello {self.proc.pid}"

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip()

    def copies(self) -> list[int]:
        """Processes running it (by its token), the original and its children left out."""
        out = []
        for n in os.listdir("/proc"):
            if n.isdigit():
                with contextlib.suppress(OSError):
                    if self.token.encode() in Path(f"/proc/{n}/cmdline").read_bytes():
                        out.append(int(n))
        ours = {self.proc.pid, *_children(self.proc.pid)}
        return sorted(set(out) - ours)


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for t in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(k) for k in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    return out


@pytest.fixture
def echo(subreaper: list[int]) -> Iterator[Callable[..., Echo]]:
    made: list[Echo] = []

    def make(*args: str) -> Echo:
        e = Echo(*args)
        made.append(e)
        subreaper.extend(_children(e.proc.pid))
        return e

    try:
        yield make
    finally:
        for e in made:
            for c in e.copies():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c, signal.SIGKILL)
            e.proc.kill()
            e.proc.wait()


@pytest.mark.parametrize("what", ["process", "tree"])
def test_failed_init_start_in_migrate_leaves_the_original(
    what: str,
    echo: Callable[..., Echo],
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """The init fails to start: the copy (and its namespace) is gone before any commit, the
    migration fails saying so, the original answers as before; nothing of the copy is left."""
    e = echo(*(["tree"] if what == "tree" else []))
    s = server("--pidns", env=dict(ENV, CKPT_RESTORE_TEST_FAIL_INIT_START="1"))
    before = set(_children(os.getpid())) - {s.proc.pid}  # (an earlier test's unreaped children too)
    rc, _, err = migrate(e.proc.pid, s.addr)
    assert rc == 1 and "could not be let go" in err, err
    who = f"the original process {e.proc.pid}" if what == "process" else f"the tree of pid {e.proc.pid}"
    assert f"{who} runs on" in err, err
    assert s.proc.wait(60) == 1
    assert e.ask("again") == f"again {e.proc.pid}"
    assert e.copies() == []
    left = set(_children(os.getpid())) - before
    assert not left, f"processes of the copy were left (ours as a subreaper): {left}"


@pytest.mark.parametrize("what", ["process", "tree"])
def test_failed_init_start_in_restore(what: str, tmp_path: Path, echo: Callable[..., Echo]) -> None:
    """`ckpt restore --pidns` whose init fails to start: one line, and no process left."""
    e = echo(*(["tree"] if what == "tree" else []))
    out = _dump(e.proc.pid, tmp_path / "d")
    before = set(_children(os.getpid()))
    r = subprocess.run(
        [sys.executable, "-m", "ckpt", "restore", str(out["layer"]), "--pidns", "--detach"],
        capture_output=True, cwd=ROOT, timeout=120, stdin=subprocess.DEVNULL,
        env=dict(ENV, CKPT_RESTORE_TEST_FAIL_INIT_START="1"),
    )  # fmt: skip
    assert r.returncode == 1, r
    assert r.stderr.decode() == "ckpt: test: the init of the new pid namespace could not be let go\n"
    assert e.copies() == []
    assert not set(_children(os.getpid())) - before, "the init or a process of the copy was left"
    assert e.ask("again") == f"again {e.proc.pid}"


def test_migrate_says_which_is_the_init(
    echo: Callable[..., Echo],
    server: Callable[..., Server],  # noqa: F811
    subreaper: list[int],
) -> None:
    """`ckpt migrate` to `ckpt serve --pidns`: its final JSON object names the copy's init."""
    e = echo()
    s = server("--pidns")
    rc, lines, err = migrate(e.proc.pid, s.addr)
    assert rc == 0, err
    new = s.done()
    init = lines[-1]["init_pid"]
    assert isinstance(init, int) and init == s.last["init_pid"], (lines[-1], s.last)
    subreaper.insert(0, init)  # serve's orphan, so ours; killing it ends the namespace
    assert nspid(f"/proc/{init}/status")[-1] == 1 and nspid(f"/proc/{new}/status")[-1] == e.proc.pid
    assert e.proc.wait(30) == -signal.SIGKILL  # the original, once the copy ran
