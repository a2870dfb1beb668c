"""ckpt/proc/procfs.py reads with os.read: the same bytes and text as open() gives (issue 9, part 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt.errors import TargetExited
from ckpt.proc.maps import read_maps
from ckpt.proc.procfs import CHUNK, read_bytes, read_text


def test_same_as_open_on_proc_files() -> None:
    pid = os.getpid()
    for name in ("status", "stat", "limits", "smaps", "maps", "mountinfo"):
        path = f"/proc/{pid}/{name}"
        with open(path, "rb") as f:
            ref = f.read()
        got = read_bytes(path, pid)
        # Live files: compare what cannot move between the two reads (their first lines).
        assert got.split(b"\n")[0] == ref.split(b"\n")[0]
    # A file larger than one read: every line, in order, none twice.
    with open(f"/proc/{pid}/smaps", "rb") as f:
        assert len(f.read()) > CHUNK or pytest.skip("smaps smaller than one read here")
    text = read_text(f"/proc/{pid}/smaps", pid)
    assert text is not None and text.count("VmFlags:") == len(read_maps(pid))


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
