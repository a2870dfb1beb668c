"""Fixtures for the QEMU soft-dirty harness (tests/vm/vm.py); see docs/vm.md."""

from __future__ import annotations

import os

import pytest

from .vm import Assets, VmUnavailable, ensure_assets


def pytest_configure(config: pytest.Config) -> None:
    # Registered here so `-m vm` / `-m "not vm"` work without warnings even before the
    # top-level pyproject lists the marker.
    config.addinivalue_line("markers", "vm: boots Debian's kernel under QEMU/TCG (needs apt or a warm cache)")


@pytest.fixture(scope="session")
def vm_assets() -> Assets:
    """QEMU + kernel + initramfs, set up once per session; skips (never passes) when unavailable."""
    try:
        return ensure_assets()
    except VmUnavailable as exc:
        # CKPT_VM_REQUIRED=1 (for a CI that must run these) turns the skip into a failure.
        if os.environ.get("CKPT_VM_REQUIRED"):
            pytest.fail(f"QEMU guest unavailable and CKPT_VM_REQUIRED is set: {exc.reason}")
        pytest.skip(f"QEMU guest unavailable: {exc.reason}")
