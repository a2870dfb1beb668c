"""Issue 11: `ckpt dirtyrate` on the soft-dirty tracker, in a QEMU guest whose kernel has it
(tests/vm/guest_dirtyrate.py; see docs/vm.md). The host side (uffd-wp) is tests/test_dirtyrate.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.examples_util import build_example

from .vm import Assets, run_in_guest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("guest_dirtyrate.py")


@pytest.mark.vm
def test_dirtyrate_soft_dirty_exact(vm_assets: Assets, tmp_path: Path) -> None:
    dirtier = build_example("dirtier")  # built on the host; the guest sees the host's root
    res = run_in_guest(
        f'exec "$CKPT_VM_PYTHON" {SCRIPT} --dirtier {dirtier} --out "$CKPT_VM_RESULTS/guest.json"\n',
        share_rw=tmp_path,
        env={"CKPT_VM_PYTHON": sys.executable, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout_s=240,
        assets=vm_assets,
    )
    out = tmp_path / "guest.json"
    assert out.exists(), f"the guest script left no result (exit {res.exit_status}):\n{res.output}"
    data = json.loads(out.read_text())
    assert not data["failures"], "\n".join(data["failures"]) + res.output
    assert res.exit_status == 0, res.output
    assert data["auto"] == "soft-dirty" and data["tracker"] == "soft-dirty"
    assert [len(e) for e in data["expected"]] == [len(g) for g in data["got"]]
    assert data["expected"] == data["got"] and data["end"] == "stopped"
