"""The optional fields format 7 adds for what tests/zdtm found (images/FORMAT.md "Version 7"):
written only when set, read back equal, absent in older records read as their defaults, and bounded."""

from __future__ import annotations

import pytest

from ckpt.image.format import FdRecord, PropsRecord
from ckpt.image.validate import MetaError

FD = {"fd": 5, "kind": "file", "path": "/etc/hostname", "flags": 2, "pos": 7, "mnt_id": 1, "dev": 1,
      "ino": 2, "mode": 0o100644, "size": 9, "mtime_ns": 3}  # fmt: skip


def test_dup_of_round_trip_and_default() -> None:
    assert FdRecord.from_dict(FD, "fds[0]").dup_of == -1
    assert "dup_of" not in FdRecord.from_dict(FD, "fds[0]").to_dict()  # unset: records stay as they were
    rec = FdRecord.from_dict({**FD, "dup_of": 3}, "fds[0]")
    assert rec.dup_of == 3 and FdRecord.from_dict(rec.to_dict(), "fds[0]") == rec
    with pytest.raises(MetaError):
        FdRecord.from_dict({**FD, "dup_of": -2}, "fds[0]")


def test_props_namespaces_and_refusals_round_trip() -> None:
    base = PropsRecord().to_dict()
    assert "namespaces" not in base and "refused" not in base
    p = PropsRecord.from_dict(base)
    assert p.namespaces == [] and p.refused == []
    rec = PropsRecord(namespaces=[("uts", 4026531838)], refused=["a process keyring (key 1)"],
                      prctl={"mlockall": 6})  # fmt: skip
    back = PropsRecord.from_dict(rec.to_dict())
    assert back.namespaces == [("uts", 4026531838)] and back.refused == rec.refused
    assert back.prctl == {"mlockall": 6}
    with pytest.raises(MetaError):
        PropsRecord.from_dict({**base, "refused": ["x" * 600]})
    with pytest.raises(MetaError):
        PropsRecord.from_dict({**base, "namespaces": [["uts"] for _ in range(17)]})
