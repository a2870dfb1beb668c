"""Network locks name their owner (ckpt/netlock.py owner()): a run of the tests checks and lifts
only its own locks, never those of a run beside it on the same machine."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ckpt import netlock
from ckpt.image.tcp import LOCK_NAME
from tests.util import LOCK_OWNER

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)")
LO = bytes([127, 0, 0, 2])


def _tables() -> list[str]:
    return subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=True
    ).stdout.split()


@pytest.mark.parametrize("tag", [LOCK_OWNER, None, "xyz", "123456789"], ids=["run", "pid", "bad", "long"])
def test_lock_name_says_whose_it_is(tag: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if tag is None:
        monkeypatch.delenv(netlock.OWNER_ENV, raising=False)
    else:
        monkeypatch.setenv(netlock.OWNER_ENV, tag)
    name = netlock.lock([netlock.Flow(2, LO, 1, LO, 1)])
    try:
        assert name in _tables()
        assert LOCK_NAME.fullmatch(name), name  # what a layer may record (image/tcp.py)
        owner = LOCK_OWNER if tag == LOCK_OWNER else f"{os.getpid():08x}"  # (bad tags: the pid)
        assert name.startswith(f"ckpt_lock_{owner}") and len(name) == len("ckpt_lock_") + 24
    finally:
        netlock.unlock(name)
    assert name not in _tables()


def test_the_run_tags_the_ckpt_it_starts() -> None:
    assert os.environ[netlock.OWNER_ENV] == LOCK_OWNER  # tests/conftest.py: inherited by every ckpt


def test_another_runs_lock_is_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """What broke tests/test_tree_tcp.py's failed tree migration once in CI: a run beside it deleted
    every ckpt_lock_* table at the end of one of its tests, while the migration's original sockets
    were let go (disconnected in repair mode) and only its locks kept the peer's segments away; the
    next segment met no socket and the kernel answered with a reset (the child read ECONNRESET).
    Deleting the migration's locks by hand at that moment gave the same failure. Now each run sees,
    checks and deletes only its own."""
    from tests.test_restore_tcp import _locks

    # Not a pid (pids are below 2**22): LOCK_OWNER + 1 could be the other xdist worker's, whose
    # lock checks would see this lock as theirs.
    other = f"{int(LOCK_OWNER, 16) | 0x80000000:08x}"
    monkeypatch.setenv(netlock.OWNER_ENV, other)
    name = netlock.lock([netlock.Flow(2, LO, 1, LO, 1)])
    try:
        assert name in _tables() and name not in _locks()
    finally:
        netlock.unlock(name)
