"""`ckpt serve --pidns`'s plain-text line (not --json) after a migration into a new pid namespace:
it names the copy's pid outside (ckpt's number, the one to signal from here) and its pid inside the
new namespace (the one the copy sees), and which process is that namespace's init (issue 12).

The migrated process is tests/test_pidns_inner.py's contained target: pid 2 under a `sh` in a
namespace the test made, or that namespace's init itself (pid 1). Each line's numbers are checked
against /proc's NSpid, and the copy checks its own ids itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_migrate import migrate
from tests.test_pidns_inner import Contained, _inner
from tests.test_restore_tree import ENV
from tests.util import ROOT, LineChannel

LINE = re.compile(
    r"restored as pid (\d+) outside, pid (\d+) inside its new pid namespace(.*); layers in (.+)"
)


class TextServe:
    """`ckpt serve --once --pidns` without --json; the copy shares its stdout."""

    def __init__(self, d: Path) -> None:
        cmd = ["serve", "--listen", "127.0.0.1:0", "-D", str(d), "--once", "--pidns"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt", *cmd],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
        )  # fmt: skip
        self.chan = LineChannel(self.proc, 120)
        first = self.chan.readline()
        m = re.fullmatch(r"listening on (\S+), storing into (.+)", first)
        assert m, first
        self.addr = m.group(1)

    def restored_line(self) -> tuple[str, list[str]]:
        """serve's `restored as` line, and the copy's lines read before it."""
        other = []
        while True:
            line = self.chan.readline()
            if line.startswith("restored as"):
                return line, other
            if not line.startswith("  received"):
                other.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.fixture
def serve_text(tmp_path: Path, subreaper: list[int]) -> Iterator[Callable[[], TextServe]]:
    made: list[TextServe] = []

    def start() -> TextServe:
        made.append(TextServe(tmp_path / f"dst{len(made)}"))
        return made[-1]

    try:
        yield start
    finally:
        for s in made:
            s.close()


@pytest.mark.parametrize("init", [False, True], ids=["below-init", "init"])
def test_serve_text_names_both_pids(
    init: bool, serve_text: Callable[[], TextServe], subreaper: list[int]
) -> None:
    c = Contained(init=init)
    try:
        pid, ppid, tid = c.seen
        assert (pid, ppid) == ((1, 0) if init else (2, 1))
        s = serve_text()
        rc, lines, err = migrate(c.outer, s.addr)
        assert rc == 0, err
        line, got = s.restored_line()
        m = LINE.fullmatch(line)
        assert m, line
        outer, inside, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        ns_init = lines[-1]["init_pid"]
        assert isinstance(ns_init, int)
        subreaper.insert(0, ns_init)  # serve's orphan, so ours; killing it ends the namespace
        assert inside == pid and _inner(outer) == pid
        if init:
            assert rest == ": its init" and ns_init == outer, line
        else:
            assert rest == f", whose init is pid {ns_init} outside" and _inner(ns_init) == 1, line
        assert s.proc.wait(60) == 0
        os.kill(outer, signal.SIGUSR1)
        while len(got) < 2:
            got.append(s.chan.readline())
        assert sorted(got) == [f"root ok {pid} {ppid} {pid} {ppid} ", f"root-thread ok {tid} {tid}"]
        _, status = os.waitpid(ns_init, 0)
        subreaper.remove(ns_init)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    finally:
        with contextlib.suppress(Exception):
            c.kill()
