"""tests/leftovers.py: a stale test queue (its program gone) is removed before a run; a live
program's queue and queues not named like the tests' are left alone. Real queues, real processes."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

from tests.leftovers import remove_stale_queues

rt = ctypes.CDLL("librt.so.1", use_errno=True)
rt.mq_open.restype = ctypes.c_int


def _make(name: str) -> None:
    q = rt.mq_open(name.encode(), os.O_RDWR | os.O_CREAT, 0o600, None)
    assert q >= 0, os.strerror(ctypes.get_errno())
    os.close(q)  # (a message queue descriptor is an fd on Linux)


def _exists(name: str) -> bool:
    q = rt.mq_open(name.encode(), os.O_RDONLY, 0, None)
    if q >= 0:
        os.close(q)
    return q >= 0


def test_stale_queue_removed_live_and_foreign_kept() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    names = [
        f"/ckpt-test-mq-{dead.stdout.strip()}",
        f"/zdtm-mq-{live.pid}",
        f"/ckpt-leftover-probe-{os.getpid()}",
    ]
    try:
        for n in names:
            _make(n)
        gone = remove_stale_queues()
        assert names[0][1:] in gone
        assert [_exists(n) for n in names] == [False, True, True]
    finally:
        live.communicate(b"")
        for n in names:
            rt.mq_unlink(n.encode())
