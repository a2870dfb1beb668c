"""Bad input on the command line and odd files (issue 13 items 7 and 11): one line on stderr, a
non-zero exit, never a traceback and never a hang. Real processes, the CLI as a user runs it."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from ckpt.api import open_layer
from ckpt.errors import LayerError
from tests.util import Target, run_ckpt

NOBODY = 65534


def _err(p: subprocess.CompletedProcess[str], rc: int, words: str) -> None:
    assert p.returncode == rc, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in p.stderr, p.stderr


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a forked child that dropped to uid/gid nobody (the venv's interpreter need not
    be executable by nobody, so no exec); stderr comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 98
        try:
            # The CLI imports each command's modules lazily, and this interpreter's standard library
            # may sit where nobody cannot read (a pyenv under /root): load them while still root.
            import concurrent.futures  # noqa: F401
            import resource  # noqa: F401

            import ckpt.diff
            import ckpt.dump
            import ckpt.show  # noqa: F401

            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.dup2(w, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
            from ckpt.cli import main

            code = main(list(args))
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(list(args), os.waitstatus_to_exitcode(status), "", err)


@pytest.fixture
def sleeper() -> Target:
    t = Target([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"])
    yield t  # type: ignore[misc]
    t.close()


def test_level_out_of_range(sleeper: Target, tmp_path: Path) -> None:
    d = str(tmp_path / "d")
    _err(run_ckpt("dump", "-t", str(sleeper.pid), "-D", d, "--level", "23"), 2, "out of range")
    assert not (tmp_path / "d").exists()


def test_failed_dump_leaves_no_new_directory(sleeper: Target, tmp_path: Path) -> None:
    d = tmp_path / "new"
    _err(run_ckpt("dump", "-t", str(sleeper.pid), "-D", str(d), "--incremental"), 1, "no earlier layer")
    assert not d.exists()
    # A directory that was there before stays.
    d.mkdir()
    _err(run_ckpt("dump", "-t", str(sleeper.pid), "-D", str(d), "--incremental"), 1, "no earlier layer")
    assert d.is_dir()


def test_parent_fifo_and_parent_of_another_process(sleeper: Target, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = tmp_path / "d"
    args = ("dump", "-t", str(sleeper.pid), "-D", str(d), "--incremental", "--track", "hash")
    _err(run_ckpt(*args, "--parent", str(fifo)), 1, "it is a FIFO, not a regular file")
    other = Target([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"])
    try:
        run_ckpt("dump", "-t", str(other.pid), "-D", str(tmp_path / "o"), "--track", "hash", check=True)
    finally:
        other.close()
    p = run_ckpt(*args, "--parent", str(tmp_path / "o" / "layer-0001.ckpt"))
    comm = Path(sys.executable).name[:15]  # the name execve was given: python or python3 in a venv
    _err(p, 1, f"a dump of another process (pid {other.pid}, {comm}")
    assert "reused" not in p.stderr


def test_too_long_and_unsearchable_paths(tmp_path: Path) -> None:
    _err(run_ckpt("show", str(tmp_path / ("x" * 300))), 1, "File name too long")
    locked = tmp_path / "locked"
    (locked / "sub").mkdir(parents=True)
    (locked / "layer-0001.ckpt").write_bytes(b"")
    os.chmod(tmp_path, 0o755)
    os.chmod(locked, 0o744)  # listable by others, not searchable
    try:
        _err(_as_nobody("show", str(locked / "sub")), 1, "Permission denied")
        _err(_as_nobody("show", str(locked / "sub" / "layer-0001.ckpt")), 1, "Permission denied")
        _err(_as_nobody("show", str(locked)), 1, "Permission denied")
        _err(_as_nobody("verify", str(locked)), 1, "Permission denied")
    finally:
        os.chmod(locked, 0o700)


def test_nul_in_a_path_through_the_api() -> None:
    with pytest.raises(LayerError, match="NUL"):
        open_layer("/tmp/a\0b")


def test_untrack_without_access_to_the_fd_table(sleeper: Target) -> None:
    _err(_as_nobody("untrack", "-t", str(sleeper.pid)), 1, f"/proc/{sleeper.pid}/fd): permission denied")
