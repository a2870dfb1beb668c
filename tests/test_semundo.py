"""SysV semaphore undo (SEM_UNDO): its adjustments cannot be read back, so a process that may hold
some is refused, naming it (ckpt/proc/semundo.py); one that cannot is dumped and restored.

Each case runs in an IPC namespace of its own (a holder `unshare --ipc cat`; the target and ckpt
enter it with nsenter): the sets it makes are nobody else's, and go with the namespace."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.util import ROOT, LineChannel, Target, build_c

ENV = {"PYTHONPATH": str(ROOT), "NO_COLOR": "1"}


@pytest.fixture
def ipcns() -> Iterator[list[str]]:
    """The nsenter prefix of a fresh IPC namespace, held by a `cat` for the test's length."""
    holder = subprocess.Popen(
        ["unshare", "--ipc", "sh", "-c", "echo in; exec cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert LineChannel(holder, 30).readline() == "in"  # unshared: nsenter now finds the new one
        yield ["nsenter", f"--ipc=/proc/{holder.pid}/ns/ipc"]
    finally:
        holder.kill()
        holder.wait(30)
        for f in (holder.stdin, holder.stdout):
            if f:
                f.close()


def _ckpt(ns: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ns, sys.executable, "-m", "ckpt", *args], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, **ENV), cwd=ROOT,
    )  # fmt: skip


def _tracer(pid: int) -> int:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith("TracerPid:"):
            return int(ln.split()[1])
    return -1


@pytest.mark.parametrize(
    ("mode", "thread"),
    [("undo", ""), ("undo", "thread"), ("used", "thread")],
    ids=["semundo", "semundo-threaded", "threaded-with-a-used-set"],
)
def test_may_hold_undo_is_refused_at_dump(ipcns: list[str], tmp_path: Path, mode: str, thread: str) -> None:
    exe = build_c("semundo")
    t = Target([*ipcns, str(exe), mode, thread])
    try:
        r = _ckpt(ipcns, "dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill")
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ckpt: "), r.stderr
        assert "SEM_UNDO" in lines[0] and "undo list" in lines[0], lines[0]
        # Refused before the kill: the original runs on, untraced, its adjustment still its own.
        assert _tracer(t.pid) == 0
        assert t.cmd("check") == "PASS"
    finally:
        with contextlib.suppress(BrokenPipeError):
            t.chan.send("exit")
        t.close()


@pytest.mark.parametrize(
    ("mode", "thread"),
    [("used", ""), ("fresh", "thread"), ("none", "thread")],
    ids=["used-set-no-undo-list", "threaded-set-never-operated", "threaded-no-set"],
)
def test_cannot_hold_undo_is_restored(ipcns: list[str], tmp_path: Path, mode: str, thread: str) -> None:
    exe = build_c("semundo")
    t = Target([*ipcns, str(exe), mode, thread])
    try:
        r = _ckpt(ipcns, "dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill")
        assert r.returncode == 0, r.stderr
    finally:
        t.close()
    proc = subprocess.Popen(
        [*ipcns, sys.executable, "-m", "ckpt", "restore", str(tmp_path / "d")], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, **ENV), cwd=ROOT, bufsize=0,
    )  # fmt: skip
    chan = LineChannel(proc, 60, lambda: f"\n{proc.stderr.read().decode() if proc.stderr else ''}")
    try:
        assert chan.cmd("check") == "PASS"  # the set as the process left it, reachable by the same id
        chan.send("exit")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f:
                f.close()
