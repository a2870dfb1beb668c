"""ckpt/proc/procfs.py reads with os.read: the same bytes and text as open() gives (issue 9, part 2)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.errors import TargetExited
from ckpt.proc.maps import read_maps
from ckpt.proc.procfs import CHUNK, read_bytes, read_text
from ckpt.proc.stat import Status, read_status
from tests.util import Target


def _shape(smaps: bytes) -> bytes:
    """smaps with its page counts left out: even a stopped process's Shared_/Private_/Pss change
    when another process maps or unmaps the same file pages (a python3 started beside it: seen
    under two test workers), and reclaim or khugepaged can move the rest."""
    return re.sub(rb"(?m)^([A-Za-z_]+:)\s+\d+ kB$", rb"\1", smaps)


def test_same_as_open_on_proc_files() -> None:
    # A stopped child: its /proc files cannot move between the two reads, so
    # whole files compare (pytest's own stat line counts its page faults, which
    # the first read itself can bump).
    # 200 shared anonymous maps (never merged) make smaps larger than one read.
    code = (
        "import mmap, sys; m = [mmap.mmap(-1, 4096) for _ in range(200)];"
        " print('ready', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        os.kill(child.pid, signal.SIGSTOP)
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        for name in ("status", "stat", "limits", "smaps", "maps", "mountinfo", "cmdline"):
            path = f"/proc/{child.pid}/{name}"
            with open(path, "rb") as f:
                ref = f.read()
            got = read_bytes(path, child.pid)
            if name == "smaps":  # (sharing counts move with other processes: see _shape)
                got, ref = _shape(got), _shape(ref)
            assert got == ref, name
        # A file larger than one read: every line, in order, none twice.
        smaps = f"/proc/{child.pid}/smaps"
        with open(smaps, "rb") as f:
            assert len(f.read()) > CHUNK
        text = read_text(smaps, child.pid)
        assert text is not None and text.count("VmFlags:") == len(read_maps(child.pid))
    finally:
        child.kill()
        child.communicate()


def test_same_as_open_on_odd_text(tmp_path: Path) -> None:
    p = tmp_path / "odd"
    data = b"a\r\nb\rc\n\xff\xfe name\n" + b"x" * (3 * CHUNK + 5) + b"\r"
    p.write_bytes(data)
    assert read_bytes(str(p), 0) == data
    with open(p, errors="surrogateescape") as f:
        assert read_text(str(p), 0, errors="surrogateescape") == f.read()
    with pytest.raises(UnicodeDecodeError):
        read_text(str(p), 0)
    (tmp_path / "empty").write_bytes(b"")
    assert read_bytes(str(tmp_path / "empty"), 0) == b""


def test_gone_is_target_exited(tmp_path: Path) -> None:
    with pytest.raises(TargetExited, match="process 7 does not exist"):
        read_bytes(str(tmp_path / "none"), 7)
    assert read_text(str(tmp_path / "none"), 7, missing_ok=True) is None


def test_status_fields_found_when_asked_are_read_status_own(spawn: Callable[..., Target]) -> None:
    """Status (each field of /proc/PID/status found in its text when asked for) answers every key
    as read_status's dict does, of a process with threads and of this one; a missing key is None,
    the default or a KeyError, never another line's value ("Sig" is not "SigQ")."""
    t = spawn("threads", "3")
    for pid in (t.pid, os.getpid()):
        text = Path(f"/proc/{pid}/status").read_bytes().decode("utf-8", "replace")
        lazy = Status(text)
        whole = {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}
        assert all(lazy[k] == v and lazy.get(k) == v and k in lazy for k, v in whole.items())
        assert dict(lazy) == whole and len(lazy) == len(whole)
        assert lazy.get("Sig") is None and lazy.get("Sig", "x") == "x" and "Sig" not in lazy
        with pytest.raises(KeyError):
            lazy["NoSuchField"]
        assert read_status(pid).keys() == whole.keys()
