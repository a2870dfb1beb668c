"""The migration guard's decisions (ckpt/migrate/guard.py) on real sockets and processes: which side
of the COMMIT's send ckpt died on, and which processes are its targets."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ckpt.migrate import guard


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback TCP connection: (ckpt's end, the destination's end)."""
    ls = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(ls.getsockname())
    d, _ = ls.accept()
    ls.close()
    try:
        yield c, d
    finally:
        c.close()
        d.close()


def _acked(c: socket.socket, d: socket.socket, data: bytes) -> None:
    """Send `data` and wait (by the event: the destination reads it) until it arrived."""
    c.sendall(data)
    got = b""
    while len(got) < len(data):
        got += d.recv(65536)
    # The ACK of the last segment follows the data on loopback; the send queue drains with it.
    for _ in range(1000):
        if guard._sent(c.fileno())[1] == 0:
            return
        select.select([], [], [], 0.001)  # (bounded: a loopback ACK is immediate)
    raise AssertionError("loopback never acknowledged")


def test_nothing_written_past_the_mark_continues(pair: tuple[socket.socket, socket.socket]) -> None:
    c, d = pair
    _acked(c, d, b"READY-and-before")
    state = {"phase": "commit", "mark": guard.written(c.fileno())}
    assert guard._committed(state, c.fileno()) is False


def test_commit_acknowledged_kills(pair: tuple[socket.socket, socket.socket]) -> None:
    c, d = pair
    state = {"phase": "commit", "mark": guard.written(c.fileno())}
    _acked(c, d, b"COMMIT")
    assert guard._committed(state, c.fileno()) is True


def test_commit_still_queued_is_held(pair: tuple[socket.socket, socket.socket]) -> None:
    """Bytes past the mark that the destination's kernel has not acknowledged (its window full: it
    does not read): neither kill nor continue."""
    c, d = pair
    d.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    state = {"phase": "commit", "mark": guard.written(c.fileno())}
    c.setblocking(False)
    with pytest.raises(BlockingIOError):
        for _ in range(100000):
            c.send(b"x" * 65536)
    assert guard._sent(c.fileno())[1] > 0
    assert guard._committed(state, c.fileno()) is None


def test_members_replace_the_targets() -> None:
    """A process that left the tree (not among the members as dumped) is no longer a target: the
    guard would otherwise kill or continue a process that was never migrated."""
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
             for _ in range(3)]  # fmt: skip
    targets: dict[str, int] = {}
    try:
        guard._adopt(targets, [[p.pid, guard.start_time(p.pid)] for p in procs])
        assert set(targets) == {str(p.pid) for p in procs}
        gone = targets[str(procs[2].pid)]
        guard._only(targets, [[p.pid, guard.start_time(p.pid)] for p in procs[:2]])
        assert set(targets) == {str(p.pid) for p in procs[:2]}
        with pytest.raises(OSError):
            os.fstat(gone)  # its pidfd closed
        guard._signal(targets, None, 0)  # (signal 0: a check that each pidfd names a live process)
        assert procs[2].poll() is None
    finally:
        for fd in targets.values():
            os.close(fd)
        for p in procs:
            p.kill()
            p.communicate()
