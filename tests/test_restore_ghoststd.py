"""Deleted files on fds 0, 1 and 2 (issue 12): a program whose stdin, stdout or stderr is a deleted
file, as pytest's capture files are (unnamed files made with O_TMPFILE, whose fdinfo flags keep
O_TMPFILE and the O_DIRECTORY it is made of: reopened with them, such a file was ENOTDIR).

tests/targets/ghoststd.c makes each fd it is given a deleted file with bytes and an offset of its
own, and checks them itself (contents, size, offset, access mode and O_APPEND, nlink 0, the link's
" (deleted)"); its commands come through FIFOs above those fds. Each test: a full dump, the files
grown and their offsets moved, an incremental dump, another with --kill (the files unchanged:
inherited from the layer below), a restore of the chain's top.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_restore import Restored, dump, restored  # noqa: F401 (a fixture)
from tests.util import build_c


class Ghosts:
    """tests/targets/ghoststd.c, spoken to through the FIFOs DIR/cmd and DIR/ans (the test holds
    both open read-write: neither side's open blocks, and a restore finds them as they were)."""

    def __init__(self, d: Path, fds: str, method: str, *more: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        os.mkfifo(d / "cmd")
        os.mkfifo(d / "ans")
        self.cmd_fd = os.open(d / "cmd", os.O_RDWR | os.O_CLOEXEC)
        self.ans_fd = os.open(d / "ans", os.O_RDWR | os.O_CLOEXEC)
        self.buf = b""
        self.proc = subprocess.Popen(
            [str(build_c("ghoststd")), str(d), fds, method, *more],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = self.proc.pid
        assert self.readline() == "ready"

    def readline(self) -> str:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buf:
            r, _, _ = select.select([self.ans_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                raise TimeoutError(f"no answer within {self.timeout}s")
            self.buf += os.read(self.ans_fd, 4096)
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def cmd(self, line: str) -> str:
        os.write(self.cmd_fd, line.encode() + b"\n")
        return self.readline()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)
        for fd in (self.cmd_fd, self.ans_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def ghosts(tmp_path: Path) -> Iterator[Callable[..., Ghosts]]:
    made: list[Ghosts] = []

    def _start(fds: str, method: str, *more: str) -> Ghosts:
        d = tmp_path / f"g{len(made)}"
        d.mkdir()
        g = Ghosts(d, fds, method, *more)
        made.append(g)
        return g

    yield _start
    for g in made:
        g.close()


def _chain(g: Ghosts, d: Path) -> Path:
    """A full layer, the files changed, an incremental one, and one with --kill over unchanged files."""
    assert g.cmd("check") == "ok"
    dump(g.pid, d)
    assert g.cmd("check") == "ok"  # the dump left the files as they were
    assert g.cmd("write") == "written"
    dump(g.pid, d, "--incremental")
    out = dump(g.pid, d, "--incremental", "--kill")
    assert out["restorable"], out["not_restorable"]
    assert g.proc.wait(30) == -signal.SIGKILL
    return Path(str(out["layer"]))


def _restore(r: Restored) -> dict[str, object]:
    out: dict[str, object] = json.loads(r.readline())
    r.set_pid(int(str(out["pid"])))
    assert r.wait() == 0, r.stderr_now()
    return out


@pytest.mark.parametrize(
    ("fds", "method"),
    [
        ("0", "tmpfile"),
        ("1", "tmpfile"),
        ("2", "tmpfile"),
        ("0,1,2", "tmpfile"),
        ("5", "tmpfile"),
        ("0,1,2,5", "tmpfile"),
        ("0,1,2,5", "named"),
    ],
)
def test_deleted_files_on_stdio_are_restored(
    fds: str,
    method: str,
    tmp_path: Path,
    ghosts: Callable[..., Ghosts],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    g = ghosts(fds, method)
    layer = _chain(g, tmp_path / "d")
    r = restored(layer, "--detach", "--json")
    _restore(r)
    assert g.cmd("check") == "ok"
    assert g.cmd("write") == "written"  # the restored files take writes as before
    assert g.cmd("check") == "ok"


def test_deleted_stderr_in_a_pid_namespace(
    tmp_path: Path,
    ghosts: Callable[..., Ghosts],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    g = ghosts("0,1,2,5", "tmpfile")
    layer = _chain(g, tmp_path / "d")
    r = restored(layer, "--pidns", "--detach", "--json")
    out = _restore(r)
    init = int(str(out["init_pid"]))
    try:
        assert g.cmd("check") == "ok"
    finally:
        os.kill(init, signal.SIGKILL)  # and the namespace with it
        os.waitpid(init, 0)


def test_deleted_stdio_shared_in_a_tree(
    tmp_path: Path,
    ghosts: Callable[..., Ghosts],
    restored: Callable[..., Restored],  # noqa: F811
    subreaper: list[int],
) -> None:
    """A parent and its child share each deleted file (one open file description, one offset): the
    tree restore opens each once, from the file it made, and gives it to both."""
    g = ghosts("0,1,2,5", "tmpfile", "fork")
    child = int(g.cmd("child"))
    subreaper.append(child)
    layer = _chain(g, tmp_path / "d")
    r = restored(layer, "--detach", "--json", "--new-pids")  # (the original tree still holds the pids)
    out = _restore(r)
    tree: list[dict[str, object]] = out["tree"]  # type: ignore[assignment]
    kids = [int(str(m["pid"])) for m in tree if m["dumped_pid"] == child]
    subreaper.extend(kids)
    assert len(kids) == 1
    assert g.cmd("check") == "ok"
    for fd in (0, 1, 2, 5):  # the child's fds are the parent's open files, offsets shared
        assert os.readlink(f"/proc/{kids[0]}/fd/{fd}").endswith(" (deleted)")
        mine = Path(f"/proc/{out['pid']}/fdinfo/{fd}").read_text().split()[1]
        theirs = Path(f"/proc/{kids[0]}/fdinfo/{fd}").read_text().split()[1]
        assert mine == theirs
    assert g.cmd("write") == "written"  # moves the offsets: the child's move with them
    for fd in (0, 1, 2, 5):
        mine = Path(f"/proc/{out['pid']}/fdinfo/{fd}").read_text().split()[1]
        assert Path(f"/proc/{kids[0]}/fdinfo/{fd}").read_text().split()[1] == mine
    assert g.cmd("check") == "ok"
