"""migrate --on-commit / --on-abort commands (ckpt/migrate/netmove.py run_hook): their exit status and
stderr, and no wait for what a command leaves running in the background."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ckpt.errors import CkptError
from ckpt.migrate.netmove import run_hook


def test_a_background_process_of_the_hook_is_not_waited_for(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    # The background sleep inherits the hook's stdout and stderr: run_hook returns when the shell
    # exits, not when they close (the sleep outlives HOOK_TIMEOUT).
    run_hook(f"sleep 600 & echo $! > {pidfile}", "commit", [])
    pid = int(pidfile.read_text())
    try:
        assert Path(f"/proc/{pid}").exists()  # still running: the hook returned before it ended
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_failing_hook_names_its_status_and_stderr() -> None:
    with pytest.raises(CkptError, match=r"--on-abort command failed \(exit status 3\): no route here"):
        run_hook("echo no route >&2; echo here >&2; echo ignored; exit 3", "abort", [])


def test_the_connections_are_in_its_environment(tmp_path: Path) -> None:
    out = tmp_path / "env"
    run_hook(f'echo "$CKPT_MIGRATE_PHASE|$CKPT_TCP_ADDRESSES" > {out}', "commit", [])
    assert out.read_text() == "commit|\n"
