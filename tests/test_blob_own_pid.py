"""The restore's syscall blobs signal the helper by its own pid as its pid namespace numbers it
(restore/blob.py, for --pidns). That number is read from /proc/PID/status once per helper, not on
every blob run: a restore runs many blobs, and without --pidns the answer is always the pid itself.

The restore runs in the test process (as tests/test_restore_fill.py's do), with a count of the
status reads and of the blob runs; the restored process must still be right (it answers)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.image import open_layer
from ckpt.restore import blob, restore_process
from tests.test_restore import dump
from tests.util import Target


def test_status_read_once_per_helper(
    tmp_path: Path, spawn: Callable[..., Target], monkeypatch: pytest.MonkeyPatch, subreaper: list[int]
) -> None:
    t = spawn("rounds", "64", stderr=subprocess.DEVNULL)
    assert t.cmd("round").startswith("round")
    dump(t.pid, tmp_path / "d", "--kill")
    assert t.proc.wait(30) == -signal.SIGKILL
    reads: list[int] = []
    runs: list[int] = []
    real_inner, real_run = blob.inner, blob._run_once

    def inner(pid: int) -> int:
        reads.append(pid)
        return real_inner(pid)

    def run_once(remote: blob.Remote, *a: object) -> object:
        runs.append(remote.pid)
        return real_run(remote, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(blob, "inner", inner)
    monkeypatch.setattr(blob, "_run_once", run_once)
    with open_layer(tmp_path / "d" / "layer-0001.ckpt") as view:
        rp = restore_process(view)
    subreaper.append(rp.pid)
    monkeypatch.undo()
    assert len(runs) > 1, runs  # (else there would be nothing to save)
    assert len(reads) == len(set(runs)) == 1, (reads, runs)
    os.kill(rp.pid, signal.SIGKILL)
