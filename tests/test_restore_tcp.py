"""Established TCP connections (issue 12 (B) 6): `ckpt dump --tcp-established` with TCP_REPAIR and
the nftables network lock (ckpt/proc/tcp.py, ckpt/netlock.py, ckpt/restore/tcp.py).

The target (tests/targets/tcpconn.c) holds a connection to a peer that this test runs on loopback
and keeps up across the dump, the kill and the restore. Both directions carry a stream in which
every byte is known by its place, so the connection is checked byte-exact on both sides after the
restore, including the bytes that sat in the target's queues at the dump: unread in its receive
queue, unacknowledged or never sent in its send queue (the peer stops reading, so its window closes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.image import Layer
from ckpt.image.tcp import TcpRecord
from ckpt.image.validate import MetaError
from ckpt.proc.tcp import SOL_TCP, TCP_REPAIR
from tests.test_restore import Restored, alive, dump, killed, restored, rounds  # noqa: F401 (a fixture)
from tests.util import LOCK_OWNER, Target, run_ckpt

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)")

WAIT = 60.0  # bound on every wait for the peer's bytes: retransmissions after the lock back off
TO_TARGET = 60000  # peer -> target bytes left unread in the target's receive queue at the dump


def _ours(i: int, n: int) -> bytes:
    """Bytes i..i+n of the target's stream."""
    return bytes(((k * 7 + 3) & 255) for k in range(i, i + n))


def _theirs(i: int, n: int) -> bytes:
    return bytes(((k * 13 + 5) & 255) for k in range(i, i + n))


class Peer:
    """The other end, in the test: a listener, then the accepted connection."""

    def __init__(self, host: str) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(fam, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(1)
        self.listener.settimeout(WAIT)
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.sent = 0
        self.got = bytearray()
        self._cv = threading.Condition()
        self._reader: threading.Thread | None = None

    def accept(self) -> None:
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(WAIT)

    def send(self, n: int) -> None:
        assert self.conn is not None
        self.conn.sendall(_theirs(self.sent, n))
        self.sent += n

    def start_reading(self) -> None:
        def run() -> None:
            assert self.conn is not None
            while True:
                try:
                    b = self.conn.recv(1 << 16)
                except OSError:
                    b = b""
                with self._cv:
                    if not b:
                        self.got += b"<eof>"
                        self._cv.notify_all()
                        return
                    self.got += b
                    self._cv.notify_all()

        self._reader = threading.Thread(target=run, daemon=True)
        self._reader.start()

    def wait_for(self, n: int) -> bytes:
        with self._cv:
            self._cv.wait_for(lambda: len(self.got) >= n or self.got.endswith(b"<eof>"), WAIT)
            return bytes(self.got)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv
            self.conn.close()
        self.listener.close()
        if self._reader is not None:
            self._reader.join(WAIT)


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Peer]]:
    made: list[Peer] = []

    def _make(host: str) -> Peer:
        p = Peer(host)
        made.append(p)
        return p

    yield _make
    for p in made:
        p.close()


@pytest.fixture(autouse=True)
def _no_lock_left() -> Iterator[None]:
    """Every test ends with no network lock of this run's: one left would drop a connection's
    packets. (Another run's, beside this one, are not this test's to judge or delete.)"""
    yield
    left = _locks()
    for name in left:
        subprocess.run(["nft", "delete", "table", "inet", name], check=False)
    assert not left, f"network locks left behind: {left}"


def _connected(
    spawn: Callable[..., Target], peer: Callable[[str], Peer], host: str
) -> tuple[Target, Peer, int]:
    """A target connected to a peer, with TO_TARGET bytes unread in its receive queue and its send
    queue full (the peer does not read); the count of bytes the target wrote."""
    p = peer(host)
    t = spawn("tcpconn", host, str(p.port), stderr=subprocess.DEVNULL)
    p.accept()
    p.send(TO_TARGET)
    assert t.cmd(f"waitin {TO_TARGET}") == f"inq {TO_TARGET}"
    wrote = int(t.cmd("send 8000000").split()[1])
    return t, p, wrote


def _queues(t: Target | Restored) -> dict[str, int]:
    w = t.cmd("queues").split()
    return {w[i]: int(w[i + 1]) for i in range(0, len(w), 2)}


def _locks() -> list[str]:
    """This run's network locks (tests/conftest.py names their owner)."""
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return [w for w in tables.split() if w.startswith(f"ckpt_lock_{LOCK_OWNER}")]


def _goes_on(t: Target | Restored, p: Peer, wrote: int) -> None:
    """The connection continues byte-exact both ways from where the dump found it."""
    assert t.cmd(f"recv {TO_TARGET}") == "ok"  # the bytes that were queued at the dump
    p.send(5000)
    assert t.cmd("recv 5000") == "ok"
    p.start_reading()
    assert t.cmd("sendall 300000") == "sent 300000"
    got = p.wait_for(wrote + 300000)
    assert len(got) == wrote + 300000
    assert got == _ours(0, wrote + 300000)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_established_connection_is_restored(
    host: str,
    tmp_path: Path,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t, p, wrote = _connected(spawn, peer, host)
    q = _queues(t)
    assert q["inq"] == TO_TARGET and q["outq"] > 0 and q["unsent"] > 0, q
    out = dump(t.pid, tmp_path / "d", "--tcp-established", "--kill")
    killed(t)
    assert len(_locks()) == 1  # the peer's packets are dropped until the restore
    with Layer.open(Path(str(out["layer"]))) as lay:
        (rec,) = lay.meta.tcp_established
    assert rec.port == int(t.ready.split()[1])
    assert rec.peer_port == p.port
    assert rec.recv_queue == _theirs(0, TO_TARGET)
    # The peer's kernel may still have taken a little (its window opens as it prunes its queue).
    n = len(rec.send_queue)
    assert 0 < rec.unsent <= n <= q["outq"]
    assert rec.send_queue == _ours(wrote - n, n)

    r = restored(Path(str(out["layer"])), "--detach", "--json")
    r.set_pid(json.loads(r.readline())["pid"])
    assert r.wait() == 0
    assert not _locks()
    assert r.cmd("fdinfo") == "fd 7 nonblock 1 cloexec 0 state 1"
    assert _queues(r)["inq"] == TO_TARGET
    _goes_on(r, p, wrote)


def test_connection_from_a_chain_with_a_dup(
    tmp_path: Path,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """A full layer while it runs, the incremental one with --kill, then `ckpt merge`: the connection
    comes back from the chain's top and from the merged layer; a second fd of it (a dup) is the same
    socket again."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    assert t.cmd("dup") == "fd 9"
    d = tmp_path / "d"
    dump(t.pid, d, "--tcp-established")
    assert t.cmd("recv 1000") == "ok"  # the state changes between the layers
    p.send(1000)
    assert t.cmd("waitin 60000") == "inq 60000"
    out = dump(t.pid, d, "--incremental", "--tcp-established", "--kill")
    killed(t)
    merged = tmp_path / "merged.ckpt"
    run_ckpt("merge", str(out["layer"]), "-o", str(merged), check=True)
    with Layer.open(merged) as lay:
        (rec,) = lay.meta.tcp_established
        assert rec.recv_queue == _theirs(1000, TO_TARGET)
    r = restored(merged, "--detach", "--json")
    r.set_pid(json.loads(r.readline())["pid"])
    assert r.wait() == 0
    assert r.cmd("same") == "same 1"
    _goes_on(r, p, wrote)


def test_established_connection_refused_without_the_option(
    tmp_path: Path, spawn: Callable[..., Target], peer: Callable[[str], Peer]
) -> None:
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    res = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill")
    assert res.returncode != 0
    port = int(t.ready.split()[1])
    assert f"fd 7 (a TCP connection 127.0.0.1:{port} -> 127.0.0.1:{p.port})" in res.stderr
    assert "--tcp-established" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert alive(t.pid)
    _goes_on(t, p, wrote)


def test_dump_leaves_a_running_connection_as_it_was(
    tmp_path: Path, spawn: Callable[..., Target], peer: Callable[[str], Peer]
) -> None:
    """Repair mode taken off, the lock lifted: the process never notices the dump."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    before = _queues(t)
    out = dump(t.pid, tmp_path / "d", "--tcp-established")
    assert out["restorable"] is True, out
    assert not _locks()
    after = _queues(t)  # the peer's window may open a little meanwhile: the send queue only shrinks
    assert after["inq"] == before["inq"] == TO_TARGET and 0 < after["outq"] <= before["outq"]
    assert t.cmd("fdinfo") == "fd 7 nonblock 1 cloexec 0 state 1"
    _goes_on(t, p, wrote)


def test_refused_kill_leaves_the_connection_running(
    tmp_path: Path, spawn: Callable[..., Target], peer: Callable[[str], Peer]
) -> None:
    """A --kill dump that fails after the connection was read in repair mode (here: something else
    cannot be restored) takes repair mode off and lifts the lock; the process runs on unharmed."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    assert t.cmd("unbound").startswith("fd ")
    res = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill", "--tcp-established")
    assert res.returncode != 0 and "not killing" in res.stderr, res.stderr
    assert not _locks()
    assert alive(t.pid)
    _goes_on(t, p, wrote)


def test_failed_restore_keeps_the_lock_and_can_be_tried_again(
    tmp_path: Path,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """The connection's local port taken meanwhile: the restore fails naming it, the peer's packets
    stay dropped (it sees no reset), and once the port is free again the restore succeeds."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    port = int(t.ready.split()[1])
    out = dump(t.pid, tmp_path / "d", "--tcp-established", "--kill")
    killed(t)
    with socket.socket() as blocker:
        # Made in repair mode (SK_FORCE_REUSE), as a plain bind could not always be: the port may be
        # shared meanwhile by another connection of the host (the kernel gives an outgoing
        # connection any ephemeral port whose address pair is free: the other xdist worker's may
        # get it), and a plain bind beside that is EADDRINUSE. It listens all the same.
        blocker.setsockopt(SOL_TCP, TCP_REPAIR, 1)
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        r = restored(Path(str(out["layer"])), "--detach", "--json")
        assert r.wait() != 0
        err = r.stderr_now()
        assert f"binding the TCP connection 127.0.0.1:{port} -> 127.0.0.1:{p.port}" in err, err
        assert len(_locks()) == 1
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    r.set_pid(json.loads(r.readline())["pid"])
    assert r.wait() == 0
    assert not _locks()
    _goes_on(r, p, wrote)


@pytest.mark.parametrize("taker", ["bound", "connected"])
def test_port_taken_by_a_socket_that_does_not_listen(
    taker: str,
    tmp_path: Path,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """The killed original's port taken meanwhile by a socket that does not listen (as another
    program's outgoing connection may take it as its ephemeral port): the connection is bound beside
    it (repair mode, as CRIU binds) and restored; only a listener on the port refuses it (above)."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    port = int(t.ready.split()[1])
    out = dump(t.pid, tmp_path / "d", "--tcp-established", "--kill")
    killed(t)
    with contextlib.ExitStack() as stack:
        blocker = stack.enter_context(socket.socket())
        # Bound in repair mode (SK_FORCE_REUSE), then out of it: a plain socket (sk_reuse 0, which
        # conflicts with the restore's SO_REUSEADDR bind) on the port, even where another
        # connection of the host shares the port meanwhile (a plain bind would then fail here).
        blocker.setsockopt(SOL_TCP, TCP_REPAIR, 1)
        blocker.bind(("127.0.0.1", port))
        blocker.setsockopt(SOL_TCP, TCP_REPAIR, 0)
        if taker == "connected":
            other = stack.enter_context(socket.socket())
            other.bind(("127.0.0.1", 0))
            other.listen(1)
            blocker.connect(other.getsockname())
        r = restored(Path(str(out["layer"])), "--detach", "--json")
        r.set_pid(json.loads(r.readline())["pid"])
        assert r.wait() == 0, r.stderr_now()
        assert not _locks()
        assert r.cmd("fdinfo") == "fd 7 nonblock 1 cloexec 0 state 1"
        assert _queues(r)["inq"] == TO_TARGET
        _goes_on(r, p, wrote)
        assert blocker.getsockname() == ("127.0.0.1", port)  # the other socket untouched


def test_both_ends_in_the_process(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """A listener, a connection to it and the accepted end, all in one process (tests/targets/rounds.c
    "tcp"): the accepted end shares the listener's port, bound again beside it."""
    t = rounds(spawn, "64", "", "", "tcp")
    before = _established_of(t.pid)
    assert len(before) == 2
    flags = _fd_flags(t.pid)
    out = dump(t.pid, tmp_path / "d", "--tcp-established", "--kill")
    killed(t)
    with Layer.open(Path(str(out["layer"]))) as lay:
        assert len(lay.meta.tcp_established) == 2 and len(lay.meta.inet_listen) == 1
    r = restored(Path(str(out["layer"])))
    assert r.cmd("sum").startswith("sum ")
    assert not _locks()
    assert _established_of(r.pid) == before
    assert _fd_flags(r.pid) == flags  # close-on-exec as it was, at whatever number socket() gave


def _fd_flags(pid: int) -> dict[int, str]:
    """fd -> its flags line in fdinfo, for the process's sockets."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            out[int(fd)] = next(ln for ln in info.splitlines() if ln.startswith("flags:"))
    return out


def _established_of(pid: int) -> list[tuple[str, str]]:
    """(local, peer) of the process's established TCP connections, as ss shows them."""
    ss = subprocess.run(
        ["ss", "-Htn", "state", "established", "-p"], capture_output=True, text=True, check=True
    )
    rows = [ln.split() for ln in ss.stdout.splitlines() if f"pid={pid}," in ln]
    return sorted((w[2], w[3]) for w in rows)


def _record(**over: object) -> dict[str, object]:
    d: dict[str, object] = {
        "ino": 5, "family": 2, "addr": bytes(4), "port": 1, "peer": bytes(4), "peer_port": 2,
        "send_seq": 1, "recv_seq": 2, "send_queue": b"ab", "unsent": 1, "recv_queue": b"", "mss": 1460,
        "tcpi_options": 7, "snd_wscale": 7, "rcv_wscale": 7, "timestamp": 9, "window": [1, 2, 3, 4, 5],
    }  # fmt: skip
    d.update(over)
    return d


@pytest.mark.parametrize(
    "over",
    [
        {"unsent": 3},  # more unsent bytes than queued
        {"port": 0},
        {"addr": bytes(16)},  # an IPv6 address for AF_INET
        {"window": [1, 2, 3]},
        {"snd_wscale": 15},
        {"lock": "inet filter; flush ruleset"},  # the name goes to nft: only ckpt's own names
    ],
)
def test_bad_connection_records_are_refused(over: dict[str, object]) -> None:
    assert TcpRecord.from_dict(_record(), "r").unsent == 1
    with pytest.raises(MetaError):
        TcpRecord.from_dict(_record(**over), "r")


def test_check_reports_tcp_repair() -> None:
    """`ckpt check` tries TCP_REPAIR and the lock for real (and leaves no lock: the autouse fixture)."""
    r = run_ckpt("check", "--json", check=True)
    assert json.loads(r.stdout)["features"]["tcp-repair"]["ok"] is True
