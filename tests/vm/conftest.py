"""Fixtures for the QEMU soft-dirty harness (tests/vm/vm.py); see docs/vm.md."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from . import session as vm_session_mod
from .vm import Assets, VmUnavailable, ensure_assets

# The guest results a test may ask for, each made by one scenario of the session's one guest boot
# (tests/vm/session.py); "timeout" is the harness's timeout check (a boot of its own).
SESSION_FIXTURES = {f"guest_{n}": n for n in vm_session_mod.ORDER} | {"guest_timeout": "timeout"}
_background: vm_session_mod.Background | None = None
# Under xdist (scripts/test.sh): what to start, started by the worker that runs the guest tests
# (one xdist_group, so one worker) when the first of them asks; the other worker never boots one.
_deferred: tuple[list[str], bool] | None = None
GROUP = "vm-session"


def pytest_configure(config: pytest.Config) -> None:
    # Registered here so `-m vm` / `-m "not vm"` work without warnings even before the
    # top-level pyproject lists the marker.
    config.addinivalue_line("markers", "vm: boots Debian's kernel under QEMU/TCG (needs apt or a warm cache)")


def _guest_test(item: pytest.Item) -> bool:
    return any(f in SESSION_FIXTURES or f == "vm_session" for f in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # --dist loadgroup gives a group to one worker, and the largest group first: that worker starts
    # the session at once and waits on it while the other one runs the host's tests.
    for item in items:
        if _guest_test(item):
            item.add_marker(pytest.mark.xdist_group(GROUP))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the guest work that the selected tests need, before the first test: it runs beside the
    host's tests (tests/vm sorts after them), and the guest tests find it done or nearly."""
    global _background, _deferred
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
        if hasattr(session.config, "workerinput"):  # an xdist worker: every one collects all tests
            _deferred = what
        else:
            _background = vm_session_mod.start(*what)


def pytest_sessionfinish(session: pytest.Session) -> None:
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
    global _background
    if _background is None and _deferred is not None:
        # (Session scope: set up before the test's own fixtures, so tests/conftest.py's
        # _no_popen_left does not count this process as the test's.)
        _background = vm_session_mod.start(*_deferred)
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
