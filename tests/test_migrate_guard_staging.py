"""`ckpt migrate` killed with SIGKILL leaves no staging copy of its chain behind: the guard removes
/dev/shm/ckpt-migrate-* (ckpt/migrate/guard.py remove_staging). Before, a killed migration left its
layers in /dev/shm for good, memory charged to the machine (the project's CI machine had hundreds).

Real processes and sockets: ckpt is held at a point of the hand-over (testhold.py), the test finds
its staging directory (named to the guard when it starts, and holding ckpt's pid in its lock file),
kills ckpt, waits for the guard to exit, and looks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.migrate.guard import remove_staging
from tests.test_migrate import Server, _rounds, server
from tests.test_migrate_guard_final import _check, _held, _kill
from tests.util import Target

__all__ = ["server"]  # the fixture, used by name


def _staging_of(guard: int) -> Path:
    argv = Path(f"/proc/{guard}/cmdline").read_bytes().split(b"\0")
    staging = json.loads(argv[-2] if argv[-1] == b"" else argv[-1])["staging"]
    assert staging, "the guard was not told the staging directory"
    return Path(staging)


@pytest.mark.parametrize("point", ["final-footer", "committed"])
def test_sigkilled_migrate_leaves_no_staging(
    spawn: Callable[..., Target], server: Callable[..., Server], point: str
) -> None:
    t, ref = _rounds(spawn, "256"), _rounds(spawn, "256")
    s = server()
    m, guard = _held(t, s, point)
    try:
        staging = _staging_of(guard)
        assert staging.name.startswith("ckpt-migrate-")
        assert (staging / ".ckpt-lock").read_text().split() == [str(m.pid)]  # this ckpt's
        assert any(p.name.startswith("layer-") for p in staging.iterdir())
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _check(t, ref, s, point, guard)  # (waits for the guard's exit; one copy runs)
    assert not staging.exists()


def test_remove_staging_only_a_staging_directory(tmp_path: Path) -> None:
    """Only a real directory named ckpt-migrate-*: not another name, not a symlink to one (the
    directory it points at keeps its files)."""
    real = tmp_path / "ckpt-migrate-abc"
    real.mkdir()
    (real / "layer-0001.ckpt").write_bytes(b"x")
    other = tmp_path / "keep"
    other.mkdir()
    link = tmp_path / "ckpt-migrate-link"
    link.symlink_to(other)
    (other / "f").write_bytes(b"y")
    assert not remove_staging(str(other))
    assert not remove_staging(str(link))
    assert not remove_staging(None)
    assert (other / "f").exists() and link.is_symlink()
    assert remove_staging(str(real))
    assert not real.exists()
    os.unlink(link)
