"""Fixtures for the QEMU soft-dirty harness (tests/vm/vm.py); see docs/vm.md."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from . import session as vm_session_mod
from .vm import Assets, VmUnavailable, ensure_assets

# The guest results a test may ask for, each made by one scenario of the session's one guest boot
# (tests/vm/session.py); "timeout" is the harness's timeout check (a boot of its own).
SESSION_FIXTURES = {f"guest_{n}": n for n in vm_session_mod.ORDER} | {"guest_timeout": "timeout"}
_background: vm_session_mod.Background | vm_session_mod.Joined | None = None


def pytest_configure(config: pytest.Config) -> None:
    # Registered here so `-m vm` / `-m "not vm"` work without warnings even before the
    # top-level pyproject lists the marker.
    config.addinivalue_line("markers", "vm: boots Debian's kernel under QEMU/TCG (needs apt or a warm cache)")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the guest work that the selected tests need, before the first test: it runs beside the
    host's tests (tests/vm sorts after them), and the guest tests find it done or nearly."""
    global _background
    if session.config.option.collectonly or _background is not None:
        return
    wanted = {
        SESSION_FIXTURES[f]
        for item in session.items
        for f in getattr(item, "fixturenames", ())
        if f in SESSION_FIXTURES
    }
    if wanted:
        what = ([n for n in vm_session_mod.ORDER if n in wanted], "timeout" in wanted)
        shared = os.environ.get(vm_session_mod.SHARED_ENV)
        if shared and hasattr(session.config, "workerinput"):
            # An xdist worker (scripts/test.sh): each collects every test, and any may be given the
            # guest tests; one session serves all of them (docs/testing.md).
            _background = vm_session_mod.start_or_join(Path(shared), *what)
        else:
            _background = vm_session_mod.start(*what)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if isinstance(_background, vm_session_mod.Joined):
        if _background.pidfd >= 0:
            os.close(_background.pidfd)
        return
    if _background is not None and os.environ.get(vm_session_mod.SHARED_ENV):
        # The other worker may still wait for it: the controller ends it and cleans up
        # (tests/conftest.py pytest_sessionfinish).
        if _background.proc.stdout is not None:
            _background.proc.stdout.close()
        return
    if _background is not None:
        _background.stop()
        if not os.environ.get("CKPT_VM_KEEP"):
            shutil.rmtree(_background.workdir, ignore_errors=True)


def _unavailable(reason: str) -> None:
    # CKPT_VM_REQUIRED=1 (for a CI that must run these) turns the skip into a failure.
    if os.environ.get("CKPT_VM_REQUIRED"):
        pytest.fail(f"QEMU guest unavailable and CKPT_VM_REQUIRED is set: {reason}")
    pytest.skip(f"QEMU guest unavailable: {reason}")


@pytest.fixture(scope="session")
def vm_assets() -> Assets:
    """QEMU + kernel + initramfs, set up once per session; skips (never passes) when unavailable."""
    try:
        return ensure_assets()
    except VmUnavailable as exc:
        _unavailable(exc.reason)
        raise  # not reached


@pytest.fixture(scope="session")
def vm_session() -> dict[str, Any]:
    """What the session's guest run reported (tests/vm/session.py): waits for it to end."""
    if _background is None:
        pytest.fail("no guest session was started: ask for a guest_* fixture (tests/vm/conftest.py)")
    res = _background.result()
    if "unavailable" in res:
        _unavailable(res["unavailable"])
    assert "error" not in res, res["error"]
    return res


def _scenario(res: dict[str, Any], name: str) -> dict[str, Any]:
    guest = res.get("guest", {})
    assert "error" not in guest, (
        f"the guest did not finish its scenarios: {guest['error']}\n{guest.get('serial_log', '')}"
    )
    sc: dict[str, Any] = res["scenarios"][name]
    assert sc["exit_status"] is not None, (
        f"scenario {name} reported no exit status:\n{sc['output']}\n{guest.get('output', '')}"
    )
    return sc


@pytest.fixture(scope="session")
def guest_smoke(vm_session: dict[str, Any]) -> dict[str, Any]:
    """The soft-dirty probe's run, and the harness checks of the whole guest run (test_vm_smoke)."""
    return {"run": vm_session["guest"], "share": vm_session["share"], **_scenario(vm_session, "smoke")}


@pytest.fixture(scope="session")
def guest_softdirty(vm_session: dict[str, Any]) -> dict[str, Any]:
    return _scenario(vm_session, "softdirty")


@pytest.fixture(scope="session")
def guest_dirtyrate(vm_session: dict[str, Any]) -> dict[str, Any]:
    return _scenario(vm_session, "dirtyrate")


@pytest.fixture(scope="session")
def guest_cgthrottle(vm_session: dict[str, Any]) -> dict[str, Any]:
    return _scenario(vm_session, "cgthrottle")


@pytest.fixture(scope="session")
def guest_timeout(vm_session: dict[str, Any]) -> dict[str, Any]:
    timeout: dict[str, Any] = vm_session["timeout"]
    return timeout
