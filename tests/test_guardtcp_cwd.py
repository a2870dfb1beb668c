"""The guard's TCP helper (guardtcp.py, run by module name) is ckpt's own, never a ckpt/ package
of the working directory ckpt was started in (ckpt/migrate/guard.py, guardtcp_argv). A real
interpreter run as the guard runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ckpt.migrate.guard import guardtcp_argv, guardtcp_env


def test_guardtcp_is_not_taken_from_the_cwd(tmp_path: Path) -> None:
    fake = tmp_path / "ckpt" / "migrate"
    fake.mkdir(parents=True)
    marker = tmp_path / "ran"
    for d in (tmp_path / "ckpt", fake):
        (d / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (fake / "guardtcp.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    r = subprocess.run(
        guardtcp_argv({"action": "unlock", "tcp": [], "pidfds": {}}),
        env=guardtcp_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr  # ckpt's own ran (nothing to unlock)
    assert not marker.exists()
