"""A long `ckpt migrate --on-abort` (ckpt/migrate/tcpmove.py check_on_abort): the guard is told it in
one message at the commit ({"tcp_moved": CMD}, guard.py), which a pipe writes whole only up to
PIPE_BUF. One that does not fit is refused before anything is done, in one line; one that fits
exactly is taken."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
from collections.abc import Callable

import pytest

from ckpt.errors import CkptError
from ckpt.migrate.tcpmove import MAX_ARG_STRLEN, check_on_abort, check_on_commit
from tests.test_migrate import ENV, ROOT, _ckpt, _state, _uffds
from tests.test_restore_tcp import Peer, _connected, _goes_on, _locks, _no_lock_left, peer
from tests.util import Target

__all__ = ["_no_lock_left", "peer"]  # fixtures, used by name

OVERHEAD = len(json.dumps({"tcp_moved": ""})) + 1  # the message around the command, its newline


def test_longest_that_fits_is_taken() -> None:
    check_on_abort("x" * (select.PIPE_BUF - OVERHEAD))
    with pytest.raises(CkptError, match="--on-abort is too long"):
        check_on_abort("x" * (select.PIPE_BUF - OVERHEAD + 1))
    # JSON escapes non-ASCII (\\u00e9: 6 bytes for a 2-byte character): counted as written.
    with pytest.raises(CkptError, match="--on-abort is too long: 1400 bytes"):
        check_on_abort("\u00e9" * 700)


def test_on_commit_longer_than_an_exec_argument_is_refused() -> None:
    """--on-commit goes to /bin/sh -c as one argument: one the kernel would refuse (E2BIG) is
    refused before the migration, not at the commit."""
    check_on_commit("x" * (MAX_ARG_STRLEN - 1))
    with pytest.raises(CkptError, match="--on-commit is too long"):
        check_on_commit("x" * MAX_ARG_STRLEN)
    # The bound is the kernel's: the longest taken runs, one byte more does not.
    r = subprocess.run(["/bin/sh", "-c", ":" + " " * (MAX_ARG_STRLEN - 2)], check=False)
    assert r.returncode == 0
    with pytest.raises(OSError, match="Argument list too long"):
        subprocess.run(["/bin/sh", "-c", ":" + " " * (MAX_ARG_STRLEN - 1)], check=False)


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)")
def test_long_on_abort_is_refused_up_front(spawn: Callable[..., Target], peer: Callable[[str], Peer]) -> None:
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    long = "ip addr del 10.0.0.1/32 dev lo; " * 200  # 6400 bytes
    argv = _ckpt(
        "migrate", "--pid", str(t.pid), "--to", "127.0.0.1:9", "--tcp-established",
        "--on-commit", "true", "--on-abort", long,
    )  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120, check=False)
    assert r.returncode != 0
    assert r.stderr.startswith("ckpt: --on-abort is too long: 6400 bytes") and r.stderr.count("\n") == 1, (
        r.stderr
    )
    assert "put the commands in a script" in r.stderr
    # Nothing was done to the process.
    assert _state(t.pid) in ("S", "R") and t.tracer() == 0 and _uffds(t.pid) == 0
    assert not _locks()
    _goes_on(t, p, wrote)
