"""Issue 11: `ckpt dirtyrate` on the soft-dirty tracker, in a QEMU guest whose kernel has it
(tests/vm/guest_dirtyrate.py; see docs/vm.md). The host side (uffd-wp) is tests/test_dirtyrate.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.vm
def test_dirtyrate_soft_dirty_exact(guest_dirtyrate: dict[str, Any]) -> None:
    # Run in the session's one guest boot (tests/vm/session.py); examples/dirtier built on the host.
    res = guest_dirtyrate
    out = Path(res["dir"]) / "guest.json"
    assert out.exists(), f"the guest script left no result (exit {res['exit_status']}):\n{res['output']}"
    data = json.loads(out.read_text())
    assert not data["failures"], "\n".join(data["failures"]) + res["output"]
    assert res["exit_status"] == 0, res["output"]
    assert data["auto"] == "soft-dirty" and data["tracker"] == "soft-dirty"
    assert [len(e) for e in data["expected"]] == [len(g) for g in data["got"]]
    assert data["expected"] == data["got"] and data["end"] == "stopped"
