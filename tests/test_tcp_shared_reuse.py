"""A connection two processes of a tree share (forked after it was made): the later member's dump
meets it in repair mode already, where SO_REUSEADDR reads 2; the value read before by the earlier
member is the one recorded for both and given back (ckpt/proc/tcp.py _HELD), so a dump that leaves
the tree running leaves the process's 0 a 0. Real processes, a real loopback connection."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.image import Layer
from ckpt.proc.pipes import pidfd_getfd
from tests.test_restore import dump
from tests.test_restore_tcp import Peer, _no_lock_left, peer

__all__ = ["_no_lock_left", "peer"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)")

# Connects, sets SO_REUSEADDR to argv[2], forks (the child holds the same socket), says both pids
# and the fd, and both wait for stdin's end.
_TREE = """
import os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(sys.argv[2]))
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(r)
    os.close(w)  # (its end: the parent's read sees EOF once the child is in its read below)
    sys.stdin.read()
    os._exit(0)
os.close(w)
os.read(r, 1)
print(os.getpid(), child, s.fileno(), flush=True)
sys.stdin.read()
os.waitpid(child, 0)
"""


def _reuse(pid: int, fd: int) -> int:
    pfd = os.pidfd_open(pid)
    try:
        with socket.socket(fileno=pidfd_getfd(pfd, fd)) as s:
            return s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    finally:
        os.close(pfd)


@pytest.mark.parametrize("reuse", [0, 1])
def test_shared_connection_keeps_reuseaddr(
    reuse: int, tmp_path: Path, peer: Callable[[str], Peer], subreaper: list[int]
) -> None:
    p = peer("127.0.0.1")
    t = subprocess.Popen(
        [sys.executable, "-c", _TREE, str(p.port), str(reuse)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert t.stdout is not None
        p.accept()
        pid, child, fd = map(int, t.stdout.readline().split())
        subreaper.append(child)
        assert _reuse(pid, fd) == reuse and _reuse(child, fd) == reuse
        out = dump(pid, tmp_path / "d", "--tcp-established", "--tree")
        assert _reuse(pid, fd) == reuse and _reuse(child, fd) == reuse
        recorded = []
        for path in sorted((tmp_path / "d").rglob("*.ckpt")):
            with Layer.open(path) as lay:
                recorded += [r.reuseaddr() for r in lay.meta.tcp_established]
        assert recorded == [reuse, reuse], out  # each member's record of the one connection
    finally:
        if t.poll() is None:
            os.kill(child, signal.SIGKILL)
            t.kill()
        t.communicate()
