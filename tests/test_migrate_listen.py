"""A server migrated on one machine with its listener and its clients (`ckpt migrate --tcp-established`
to a loopback `ckpt serve`; ckpt/restore/listenshare.py, ckpt/migrate/tcpmove.py).

The server is a real program (tests/targets/tcpserver.py: a python selectors loop that greets each
client with its pid and echoes every byte). Clients connected before the migration keep their
connections with every byte of their streams in order; clients connecting while it runs (some of
them during the final freeze, when the original's listener completes their handshakes with no one
to accept them) are served too; clients after it reach the copy. Each failure path leaves exactly
one server running and listening, the one that answers every client.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_migrate import ENV, ROOT, TARGETS, Server, _alive, _ckpt, _stopped_state, server
from tests.test_restore_tcp import _locks, _no_lock_left
from tests.util import Target

__all__ = ["_no_lock_left", "server"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)")

WAIT = 60.0  # bound on every wait for the server's bytes (a SYN or segment lost to a lock backs off)
DURING = 12  # clients that connect while the migration runs (bounded)


def _stream(seed: int, i: int, n: int) -> bytes:
    """Bytes i..i+n of a client's stream (each client its own)."""
    return bytes(((k * 31 + seed * 7 + 1) & 255) for k in range(i, i + n))


class Client:
    """One client: its greeting (the pid of the server that accepted it) and its echoed stream."""

    def __init__(
        self,
        port: int,
        seed: int,
        greet: bool = True,
        host: str = "127.0.0.1",
        sock: socket.socket | None = None,
    ) -> None:
        if sock is None:
            self.sock = socket.create_connection((host, port), timeout=WAIT)
        else:  # made elsewhere (in another network namespace)
            self.sock = sock
            sock.settimeout(WAIT)
            sock.connect((host, port))
        self.seed = seed
        self.sent = self.got = 0
        self.pid = 0
        self._buf = b""
        if greet:
            self.greeting()

    def greeting(self) -> int:
        while b"\n" not in self._buf:
            b = self.sock.recv(4096)
            assert b, "the server closed the connection before its greeting"
            self._buf += b
        line, _, self._buf = self._buf.partition(b"\n")
        word, pid = line.split()
        assert word == b"hello"
        self.pid = int(pid)
        return self.pid

    def send(self, n: int) -> None:
        self.sock.sendall(_stream(self.seed, self.sent, n))
        self.sent += n

    def check(self) -> None:
        """Everything sent comes back, exactly, in order."""
        while self.got < self.sent:
            b = self._buf or self.sock.recv(1 << 16)
            self._buf = b""
            assert b, f"connection closed after {self.got} of {self.sent} bytes"
            assert b == _stream(self.seed, self.got, len(b)), f"bytes differ at {self.got}"
            self.got += len(b)

    def exchange(self, n: int) -> None:
        self.send(n)
        self.check()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


@pytest.fixture
def tcpserver() -> Iterator[Callable[[], Target]]:
    started: list[Target] = []

    def _start() -> Target:
        t = Target([sys.executable, str(TARGETS / "tcpserver.py"), "127.0.0.1"], stderr=subprocess.DEVNULL)
        started.append(t)
        return t

    yield _start
    for t in started:
        t.close()


def _listeners(port: int) -> list[int]:
    """The pids of the processes listening on the port."""
    out = subprocess.run(["ss", "-Htlnp", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return sorted({int(p) for p in re.findall(r"pid=(\d+),", out.stdout)})


def _started(tcpserver: Callable[[], Target], clients: list[Client]) -> tuple[Target, int]:
    """The server with three clients: two that talked, one whose echo waits unread (200 kB: the
    server's send queue and its own buffer hold what the client's receive queue cannot)."""
    t = tcpserver()
    port = int(t.ready.split()[1])
    for i in range(3):
        clients.append(Client(port, i))
        assert clients[-1].pid == t.pid
    clients[0].exchange(1000)
    clients[1].exchange(70000)
    clients[2].send(200_000)
    return t, port


def _migrate(t: Target, s: Server, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:2", "--tcp-established")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or ENV, cwd=ROOT)


def _finish(m: subprocess.Popen[bytes]) -> tuple[int, str]:
    _, err = m.communicate(timeout=300)
    return m.returncode, err.decode()


def _serves(pid: int, port: int, old: list[Client], clients: list[Client], chan: Any) -> None:
    """`pid` is the one server: the only listener, it answers the old clients byte-exact and greets
    a new one."""
    assert _listeners(port) == [pid]
    for c in old:
        c.exchange(5000)
        assert c.pid in (pid, old[0].pid)
    clients.append(Client(port, 100))
    assert clients[-1].pid == pid
    clients[-1].exchange(3000)
    assert chan.cmd("stats").split()[1] == str(pid)
    assert not _locks()


def test_server_migrates_with_its_clients(
    tcpserver: Callable[[], Target], clients: list[Client], server: Callable[..., Server]
) -> None:
    """Clients before, during and after: all served, every stream exact; the copy is the only
    listener, the original is gone, no lock is left."""
    t, port = _started(tcpserver, clients)
    s = server()
    done = threading.Event()
    during: list[Client] = []
    errors: list[BaseException] = []

    def talk() -> None:
        """New clients one after another while the migration runs, and the first old client busy."""
        try:
            for i in range(DURING):
                if done.is_set():
                    break
                c = Client(port, 10 + i)
                during.append(c)
                c.exchange(2000)
                clients[0].exchange(500)
        except BaseException as e:  # reported by the test
            errors.append(e)

    th = threading.Thread(target=talk)
    th.start()
    m = _migrate(t, s)
    rc, err = _finish(m)
    done.set()
    th.join(WAIT * 4)
    clients.extend(during)
    assert rc == 0, err
    assert not errors, errors
    copy = s.done()
    assert copy != t.pid and t.proc.wait(30) == -signal.SIGKILL
    assert {c.pid for c in during} <= {t.pid, copy}
    for c in during:
        c.exchange(100)
    clients[2].check()  # the 200 kB queued at the freeze, in the kernel's queues and the server's buffer
    _serves(copy, port, clients[:3], clients, s.chan)
    stats = s.chan.cmd("stats").split()
    assert stats[2] == str(len(clients)) and stats[3] == str(len(clients))


def test_queued_connections_move(
    tcpserver: Callable[[], Target], clients: list[Client], server: Callable[..., Server]
) -> None:
    """Connections completed but not accepted at the final freeze (the server stopped accepting):
    still in the listener's accept queue, with the bytes their clients sent; the copy accepts them."""
    t, port = _started(tcpserver, clients)
    assert t.cmd("hold") == "held"
    queued = [Client(port, 50 + i, greet=False) for i in range(2)]
    clients.extend(queued)
    for c in queued:
        c.send(4000)
    s = server()
    rc, err = _finish(_migrate(t, s))
    assert rc == 0, err
    copy = s.done()
    assert s.chan.cmd("accept") == "accepting"
    for c in queued:
        assert c.greeting() == copy
        c.check()
    clients[2].check()
    _serves(copy, port, clients[:3], clients, s.chan)


def test_destination_killed_before_commit(
    tcpserver: Callable[[], Target], clients: list[Client], server: Callable[..., Server]
) -> None:
    """The destination dies with the final layer in hand: the original runs on with its listener,
    which kept completing handshakes meanwhile, and its connections."""
    t, port = _started(tcpserver, clients)
    s = server(env=dict(ENV, CKPT_SERVE_HOLD_BEFORE_RESTORE="1"))
    m = _migrate(t, s)
    while not s.event("layer")["final"]:
        pass
    # (The final layer can be in before the original has run to its group-stop: woken by it.)
    assert _stopped_state(t.pid) == "T"
    waiting = Client(port, 60, greet=False)  # the original is stopped: queued in its listener
    clients.append(waiting)
    waiting.send(1500)
    s.proc.kill()
    rc, err = _finish(m)
    assert rc == 1 and f"the original process {t.pid} runs on (untracked)" in err, err
    assert waiting.greeting() == t.pid
    waiting.check()
    clients[2].check()
    _serves(t.pid, port, clients[:3], clients, t)


def test_destination_fails_after_commit(
    tcpserver: Callable[[], Target], clients: list[Client], server: Callable[..., Server]
) -> None:
    """After the commit (the original's connections let go, the copy's made, the listener held by
    both), the destination fails and kills its copy: the original takes its connections back and
    runs on, the one listener."""
    t, port = _started(tcpserver, clients)
    s = server(env=dict(ENV, CKPT_RESTORE_TEST_FAIL_CONNECTED="1"))
    rc, err = _finish(_migrate(t, s))
    assert rc == 1 and f"the original process {t.pid} runs on (untracked)" in err, err
    assert "could not be given back" not in err
    assert s.proc.wait(60) == 1
    clients[2].check()
    _serves(t.pid, port, clients[:3], clients, t)


def test_connection_to_destination_lost_after_commit(
    tcpserver: Callable[[], Target], clients: list[Client], server: Callable[..., Server]
) -> None:
    """The link to the destination breaks after its COMMIT: the copy runs and serves, the original
    is kept stopped (the source cannot know), so one server answers; the user then kills it."""
    t, port = _started(tcpserver, clients)
    s = server(env=dict(ENV, CKPT_SERVE_TEST_DROP_AFTER_COMMIT="1"))
    rc, err = _finish(_migrate(t, s))
    copy = int(s.event("restored")["pid"])  # type: ignore[call-overload]
    s.pid = copy  # killed and reaped by the fixture
    try:
        assert rc == 1 and f"the original process {t.pid} is kept stopped" in err, err
        assert t.stopped_state() == "T" and _alive(copy)
        assert s.proc.wait(60) == 1
        clients[2].check()
        # Both hold the listener (the stopped original accepts nothing): the copy answers everyone.
        assert sorted(_listeners(port)) == sorted([t.pid, copy])
        for c in clients[:3]:
            c.exchange(5000)
        clients.append(Client(port, 100))
        assert clients[-1].pid == copy
        clients[-1].exchange(3000)
        assert not _locks()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(t.pid, signal.SIGKILL)


def test_failing_on_commit_command_gives_everything_back(
    tmp_path: Path, tcpserver: Callable[[], Target], clients: list[Client], server: Callable[..., Server]
) -> None:
    """`--on-commit` (the network's step, migrate/netmove.py) fails: the migration stops before
    the commit, `--on-abort` runs, and the original takes its connections back. Both commands see
    the connections in their environment."""
    t, port = _started(tcpserver, clients)
    s = server()
    log = tmp_path / "hooks"
    hook = 'echo "$CKPT_MIGRATE_PHASE $CKPT_TCP_ADDRESSES $CKPT_TCP_CONNECTIONS" >> ' + str(log)
    argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:2", "--tcp-established",
                 "--on-commit", f"{hook}; echo no route >&2; exit 3", "--on-abort", hook)  # fmt: skip
    m = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert m.returncode == 1 and "Traceback" not in m.stderr, m.stderr
    assert "--on-commit command failed (exit status 3): no route" in m.stderr, m.stderr
    assert f"the original process {t.pid} runs on (untracked)" in m.stderr, m.stderr
    phases = log.read_text().splitlines()
    assert [ln.split()[:2] for ln in phases] == [["commit", "127.0.0.1"], ["abort", "127.0.0.1"]]
    assert sorted(phases[0].split()[2:]) == sorted(f"127.0.0.1:{port}>127.0.0.1:{c.sock.getsockname()[1]}"
                                                   for c in clients)  # fmt: skip
    clients[2].check()
    _serves(t.pid, port, clients[:3], clients, t)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--on-commit", "true"], "they need --tcp-established"),
     (["--tcp-established", "--on-abort", "true"], "--on-abort undoes --on-commit: give both")],
)  # fmt: skip
def test_hook_options_checked(args: list[str], message: str, tcpserver: Callable[[], Target]) -> None:
    t = tcpserver()
    m = subprocess.run(_ckpt("migrate", "--pid", str(t.pid), "--to", "127.0.0.1:1", *args),
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)  # fmt: skip
    assert m.returncode == 1 and m.stderr == f"ckpt: {m.stderr[6:]}" and message in m.stderr, m.stderr
    assert m.stderr.count("\n") == 1
    assert t.cmd("stats") == f"stats {t.pid} 0 0"


UDP = """
import os, socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
print("ready", u.getsockname()[1], flush=True)
for line in sys.stdin:
    data, peer = u.recvfrom(65536)
    u.sendto(data[::-1], peer)
    print(os.getpid(), data.decode(), flush=True)
"""


def test_bound_udp_socket_taken_over(server: Callable[..., Server]) -> None:
    """A bound UDP socket on one machine is taken over too: the datagram left unread at the final
    freeze (which a socket bound again would lose: refused elsewhere) is read by the copy, which
    answers from the same address."""
    t = Target([sys.executable, "-c", UDP], stderr=subprocess.DEVNULL)
    try:
        port = int(t.ready.split()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(WAIT)
            c.sendto(b"before", ("127.0.0.1", port))
            s = server()
            rc, err = _finish(_migrate(t, s))
            assert rc == 0, err
            copy = s.done()
            assert t.proc.wait(30) == -signal.SIGKILL
            assert s.chan.cmd("recv") == f"{copy} before"
            assert c.recvfrom(100) == (b"erofeb", ("127.0.0.1", port))
            c.sendto(b"after", ("127.0.0.1", port))
            assert s.chan.cmd("recv") == f"{copy} after"
            assert c.recvfrom(100) == (b"retfa", ("127.0.0.1", port))
    finally:
        t.close()
