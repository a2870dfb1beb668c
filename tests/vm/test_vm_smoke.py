"""Boots Debian's kernel under QEMU and checks that soft-dirty tracking really works in the guest.

The host kernel lacks CONFIG_MEM_SOFT_DIRTY, so this guest is where ckpt's soft-dirty path can
be tested at all. If these tests fail, the soft-dirty tests that run through the harness prove
nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .vm import Assets, GuestResult, GuestTimeout, host_scratch_dir, run_in_guest

pytestmark = pytest.mark.vm

PROBE_SRC = Path(__file__).with_name("softdirty_probe.c")
REPO = Path(__file__).resolve().parents[2]


def _gcc() -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler on the host to build the soft-dirty probe")
    return gcc


def test_guest_soft_dirty_works(vm_assets: Assets, tmp_path: Path) -> None:
    gcc = _gcc()
    assert vm_assets.soft_dirty is not False, f"{vm_assets.kernel_package} is built without soft-dirty"
    # Compiled on the host into a directory the guest reads through the read-only root share
    # (host /tmp would be hidden by the guest's own tmpfs).
    with host_scratch_dir(vm_assets) as scratch:
        probe = scratch / "softdirty_probe"
        subprocess.run(
            [gcc, "-O2", "-Wall", "-Werror", "-o", str(probe), str(PROBE_SRC)], check=True, timeout=120
        )
        # tmp_path is under host /tmp: it also exercises a writable share inside the guest's tmpfs.
        res = run_in_guest(
            f'uname -r\nexec {probe} > "$CKPT_VM_RESULTS/probe.txt" 2>&1\n', share_rw=tmp_path, timeout_s=120
        )
    report = (tmp_path / "probe.txt").read_text() if (tmp_path / "probe.txt").exists() else ""
    assert res.exit_status == 0, f"soft-dirty probe failed in the guest:\n{res.output}{report}"
    assert res.output.split()[0] == vm_assets.kernel_release
    assert "SOFT_DIRTY_OK: 0 failure(s)" in report
    for check in (
        "after clear_refs no page of 64 is soft-dirty",
        "writes to pages 5, 17, 42 mark exactly those",
        "fresh mmap is soft-dirty before any access",
        "munmap + mmap at the same address is soft-dirty",
    ):
        assert f"ok   {check}" in report, report


def test_harness_passes_env_cwd_args_and_status(vm_assets: Assets, tmp_path: Path) -> None:
    script = tmp_path / "probe.sh"
    script.write_text(
        "#!/bin/sh\n"
        'echo "cwd=$(pwd) var=$CKPT_TEST_VAR args=$*"\n'
        'echo written > "$CKPT_VM_RESULTS/result.txt"\n'
        "touch /etc/ckpt-vm-should-fail 2>/dev/null && echo root-writable\n"
        "exit 7\n"
    )
    res: GuestResult = run_in_guest(
        script,
        share_rw=tmp_path / "share",
        env={"CKPT_TEST_VAR": "a b'c"},
        cwd=REPO,
        args=["x", "y z"],
        timeout_s=120,
    )
    assert res.exit_status == 7, res.output
    assert f"cwd={REPO} var=a b'c args=x y z" in res.output
    assert "root-writable" not in res.output  # the host root is shared read-only
    assert (tmp_path / "share" / "result.txt").read_text() == "written\n"
    assert not Path("/etc/ckpt-vm-should-fail").exists()


def test_timeout_kills_the_guest(vm_assets: Assets, tmp_path: Path) -> None:
    # The bound covers boot too: 8 s was short of a guest's boot on a 2-CPU machine at load 10 (it
    # printed nothing). 30 s keeps the test's point (the guest is killed, its output kept) under load.
    with pytest.raises(GuestTimeout) as info:
        run_in_guest("echo started\nsleep 1000\n", share_rw=tmp_path, timeout_s=30)
    assert "started" in info.value.output  # partial output survives the kill
