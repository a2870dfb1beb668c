"""restore/taskbatch.py: the working directory, the capabilities back after the files, the mm fields,
the signal actions, the task's props and the main thread's own state in one run of injected code; a
working directory too long for the run's area (its path is the chdir's buffer) goes one call at a
time. Either way the restored process is in its directory, its own name, and runs on. (The other
properties of the run, rseq, robust list, sigaltstack, THP, membarrier: tests/test_restore_props.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_refuse_named import CWD, ENV
from tests.test_restore import dump, killed
from tests.util import ROOT, Target


def _deep(base: Path, length: int) -> Path:
    """A directory whose absolute path is about `length` bytes (under PATH_MAX: chdir takes it)."""
    d = base
    while len(str(d)) < length - 250:
        d = d / ("d" * 200)
    d = d / ("e" * max(1, length - len(str(d)) - 1))
    d.mkdir(parents=True)
    return d


@pytest.mark.parametrize("length", [0, 3900])
def test_restored_in_its_working_directory(tmp_path: Path, length: int) -> None:
    where = _deep(tmp_path / "w", length) if length else tmp_path
    t = Target([sys.executable, "-c", CWD, str(where)], stderr=subprocess.DEVNULL)
    try:
        assert t.cmd("cwd") == str(where)
        layer = Path(str(dump(t.pid, tmp_path / "d", "--kill")["layer"]))
        killed(t)
    finally:
        t.close()
    r = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(layer)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    out, err = r.communicate(b"cwd\ncwd\n", timeout=120)
    assert r.returncode == 0, err.decode()
    assert out.decode().split("\n")[:2] == [str(where), str(where)]
