"""Established TCP connections migrated to another network namespace, the way they would cross
machines (`ckpt migrate --tcp-established --on-commit CMD --on-abort CMD`, ckpt/migrate/netmove.py).

Three namespaces made by the test and removed after it: the source, the destination and the peer,
joined by a bridge in the peer's namespace. The server (tests/targets/tcpserver.py) runs in the
source and its client is the test, with sockets made in the peer's namespace, talking to the
service address 10.232.9.10, which only the source has at first. The test stands in for the
network manager: ckpt runs its --on-commit command at the commit, which moves the service address
to the destination and makes the peer forget the old neighbour, and its --on-abort command if the
original has to take its connections back, which moves the address back.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_migrate import ENV, ROOT, TARGETS, Server, _ckpt, token
from tests.test_migrate_listen import Client
from tests.util import Target

pytestmark = pytest.mark.skipif(
    shutil.which("nft") is None or shutil.which("ip") is None or shutil.which("nsenter") is None,
    reason="needs nft, ip and nsenter",
)

CLONE_NEWNET = 0x40000000
SERVICE = "10.232.9.10"
_libc = ctypes.CDLL(None, use_errno=True)


class Net:
    def __init__(self, tag: str) -> None:
        self.src, self.dst, self.peer = f"ckpt-tn-s{tag}", f"ckpt-tn-d{tag}", f"ckpt-tn-p{tag}"
        self.vsrc, self.vdst = f"cktns{tag}", f"cktnd{tag}"

    def socket_in_peer(self) -> socket.socket:
        """A TCP socket of the peer's namespace (setns for this thread only, and back)."""
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{self.peer}", os.O_RDONLY)
        try:
            assert _libc.setns(there, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
            try:
                return socket.socket()
            finally:
                assert _libc.setns(here, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(here)
            os.close(there)

    def move(self, frm: str, to: str) -> str:
        """A shell command moving the service address (the network manager's step)."""
        dev = {self.src: self.vsrc, self.dst: self.vdst}
        return (
            f"ip -n {frm} addr del {SERVICE}/24 dev {dev[frm]} && "
            f"ip -n {to} addr add {SERVICE}/24 dev {dev[to]} && "
            f"ip -n {self.peer} neigh flush all"
        )

    def in_src(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.src}", *argv]

    def tables(self, ns: str) -> list[str]:
        out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return [w for w in out.split() if w.startswith("ckpt_lock_")]


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net(f"{os.getpid() % 100000}")

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        for ns in (n.src, n.dst, n.peer):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", n.peer, "link", "add", "br0", "type", "bridge")
        for ns, dev, end in ((n.src, n.vsrc, "ps"), (n.dst, n.vdst, "pd")):
            ip("link", "add", dev, "type", "veth", "peer", "name", f"{end}{dev}")
            ip("link", "set", dev, "netns", ns)
            ip("link", "set", f"{end}{dev}", "netns", n.peer)
            ip("-n", n.peer, "link", "set", f"{end}{dev}", "master", "br0")
            ip("-n", n.peer, "link", "set", f"{end}{dev}", "up")
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", n.peer, "addr", "add", "10.232.9.3/24", "dev", "br0")
        ip("-n", n.peer, "link", "set", "br0", "up")
        ip("-n", n.src, "addr", "add", "10.232.9.1/24", "dev", n.vsrc)  # the migration's own link
        ip("-n", n.src, "addr", "add", f"{SERVICE}/24", "dev", n.vsrc)  # the service's, moved
        ip("-n", n.dst, "addr", "add", "10.232.9.2/24", "dev", n.vdst)
        yield n
    finally:
        for ns in (n.src, n.dst, n.peer):  # a namespace's veth ends and locks go with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


Migrate = Callable[..., tuple[subprocess.CompletedProcess[str], Server]]


@pytest.fixture
def setup(tmp_path: Path, net: Net) -> Iterator[tuple[Target, list[Client], Migrate]]:
    """The server in the source with a client in the peer (one stream checked, 200 kB of echo
    waiting unread), and migrate(): a destination `ckpt serve` in its namespace, and the source's
    `ckpt migrate` run to its end."""
    tok = token(tmp_path, "tok", "token-for-the-namespaces-0123")
    t = Target(
        net.in_src(sys.executable, str(TARGETS / "tcpserver.py"), "0.0.0.0"), stderr=subprocess.DEVNULL
    )
    clients: list[Client] = []
    servers: list[Server] = []

    def migrate(env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Server]:
        s = Server(tmp_path / "dst", "--token-file", str(tok), "--listen", "10.232.9.2:0",
                   netns=net.dst, env=env)  # fmt: skip
        servers.append(s)
        argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--token-file", str(tok),
                     "--policy", "rounds:2", "--tcp-established",
                     "--on-commit", net.move(net.src, net.dst),
                     "--on-abort", net.move(net.dst, net.src))  # fmt: skip
        p = subprocess.run(net.in_src(*argv), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
        return p, s

    try:
        c = Client(int(t.ready.split()[1]), 1, host=SERVICE, sock=net.socket_in_peer())
        clients.append(c)
        assert c.pid == t.pid
        c.exchange(70000)
        c.send(200_000)
        yield t, clients, migrate
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.close()
        t.close()


def _service_in(net: Net, ns: str) -> bool:
    out = subprocess.run(["ip", "-n", ns, "-4", "addr"], capture_output=True, text=True, check=True).stdout
    return f"inet {SERVICE}/" in out


def test_connection_follows_its_moved_address(net: Net, setup: tuple[Target, list[Client], Migrate]) -> None:
    """The address moves at the commit; the connection goes on in the destination byte-exact, and
    a new client of the service address reaches the copy there."""
    t, clients, migrate = setup
    p, s = migrate()
    assert p.returncode == 0, p.stderr
    copy = s.done()
    assert t.proc.wait(30) == -signal.SIGKILL
    assert _service_in(net, net.dst) and not _service_in(net, net.src)
    c = clients[0]
    c.check()  # the 200 kB that waited at the freeze
    c.exchange(50000)
    new = Client(c.sock.getpeername()[1], 2, host=SERVICE, sock=net.socket_in_peer())
    clients.append(new)
    assert new.pid == copy
    new.exchange(3000)
    assert s.chan.cmd("stats").split()[1:] == [str(copy), "2", "2"]
    assert not net.tables(net.src) and not net.tables(net.dst)


def test_destination_fails_after_commit_address_comes_back(
    net: Net, setup: tuple[Target, list[Client], Migrate]
) -> None:
    """The destination fails after the commit (the address moved, its copy connected): it kills
    its copy, --on-abort moves the address back, and the original takes its connection back."""
    t, clients, migrate = setup
    p, s = migrate(env=dict(ENV, CKPT_RESTORE_TEST_FAIL_CONNECTED="1"))
    assert p.returncode == 1 and f"the original process {t.pid} runs on (untracked)" in p.stderr, p.stderr
    assert "could not be given back" not in p.stderr
    assert s.proc.wait(60) == 1
    assert _service_in(net, net.src) and not _service_in(net, net.dst)
    c = clients[0]
    c.check()
    c.exchange(50000)
    new = Client(c.sock.getpeername()[1], 2, host=SERVICE, sock=net.socket_in_peer())
    clients.append(new)
    assert new.pid == t.pid
    assert t.cmd("stats").split()[1:] == [str(t.pid), "2", "2"]
    assert not net.tables(net.src) and not net.tables(net.dst)
