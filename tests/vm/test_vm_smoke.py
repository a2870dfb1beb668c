"""Boots Debian's kernel under QEMU and checks that soft-dirty tracking really works in the guest.

The host kernel lacks CONFIG_MEM_SOFT_DIRTY, so this guest is where ckpt's soft-dirty path can
be tested at all. If these tests fail, the soft-dirty tests that run through the harness prove
nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .session import HARNESS_ARGS, HARNESS_STATUS, HARNESS_VAR, TIMEOUT_CHECK_S
from .vm import Assets

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]


def test_guest_soft_dirty_works(vm_assets: Assets, guest_smoke: dict[str, Any]) -> None:
    # Compiled on the host into a directory the guest reads through the read-only root share, and
    # run in the session's one guest boot (tests/vm/session.py). Its results directory is under host
    # /tmp: it also exercises a writable share inside the guest's tmpfs.
    assert vm_assets.soft_dirty is not False, f"{vm_assets.kernel_package} is built without soft-dirty"
    res = guest_smoke
    probe_txt = Path(res["dir"]) / "probe.txt"
    report = probe_txt.read_text() if probe_txt.exists() else ""
    assert res["exit_status"] == 0, f"soft-dirty probe failed in the guest:\n{res['output']}{report}"
    assert res["output"].split()[0] == vm_assets.kernel_release
    assert "SOFT_DIRTY_OK: 0 failure(s)" in report
    for check in (
        "after clear_refs no page of 64 is soft-dirty",
        "writes to pages 5, 17, 42 mark exactly those",
        "fresh mmap is soft-dirty before any access",
        "munmap + mmap at the same address is soft-dirty",
    ):
        assert f"ok   {check}" in report, report


def test_harness_passes_env_cwd_args_and_status(guest_smoke: dict[str, Any]) -> None:
    # The session's guest run (tests/vm/session.py guest_script) starts with these checks and ends
    # with `exit 7`, whatever its scenarios did; run_in_guest passed it this env, cwd and args.
    run, share = guest_smoke["run"], Path(guest_smoke["share"])
    assert run["exit_status"] == HARNESS_STATUS == 7, run["output"]
    assert HARNESS_VAR == "a b'c" and HARNESS_ARGS == ("x", "y z")
    assert f"cwd={REPO} var=a b'c args=x y z" in run["output"]
    assert "root-writable" not in run["output"]  # the host root is shared read-only
    assert (share / "result.txt").read_text() == "written\n"
    assert not Path("/etc/ckpt-vm-should-fail").exists()


def test_timeout_kills_the_guest(guest_timeout: dict[str, Any]) -> None:
    # The bound covers boot too (TIMEOUT_CHECK_S in tests/vm/session.py says why 90 s): any bound that
    # the boot fits in keeps the test's point (the guest is killed, its output kept) under load. Run by
    # the session's guest process after its scenarios, beside the host's tests.
    assert TIMEOUT_CHECK_S < 1000  # the guest's `sleep 1000` cannot have ended by itself
    assert guest_timeout["raised"] == "GuestTimeout", guest_timeout
    assert "started" in guest_timeout["output"]  # partial output survives the kill
