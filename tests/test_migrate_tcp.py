"""A migration of a process with an established TCP connection (`ckpt migrate --tcp-established`,
ckpt/migrate/tcpmove.py): live rounds while the connection carries traffic, the connection locked and
read in repair mode in the final freeze, handed over at the commit, and taken up by the copy.

The target (tests/targets/tcpconn.c) is connected to a peer this test runs on loopback; bytes are in
both of its queues at the final freeze (unread in its receive queue, unacknowledged and never sent in
its send queue: the peer stops reading). After the migration the peer goes on talking to the copy, and
every byte both ways is checked against its place in the stream. Each failure path leaves exactly one
running process whose connection works the same way: the original's.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.proc.tcp import SOL_TCP, TCP_REPAIR
from tests.test_migrate import ENV, ROOT, Server, _alive, _ckpt, _state, _uffds, server
from tests.test_restore_tcp import TO_TARGET, Peer, _connected, _goes_on, _locks, _no_lock_left, _queues, peer
from tests.util import Target

__all__ = ["_no_lock_left", "peer", "server"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)")


def _migrate(t: Target, s: Server, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:2", *args)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or ENV, cwd=ROOT)


def _finish(m: subprocess.Popen[bytes]) -> tuple[int, str]:
    _, err = m.communicate(timeout=300)
    return m.returncode, err.decode()


def _original_goes_on(t: Target, p: Peer, wrote: int) -> None:
    """The original runs, untracked, and its connection carries on byte-exact both ways."""
    assert _state(t.pid) in ("S", "R")
    assert t.tracer() == 0 and _uffds(t.pid) == 0
    assert not _locks()
    assert t.cmd("fdinfo") == "fd 7 nonblock 1 cloexec 0 state 1"
    assert _queues(t)["inq"] == TO_TARGET
    _goes_on(t, p, wrote)


@pytest.mark.parametrize(
    ("host", "command"), [("127.0.0.1", False), ("::1", False), ("127.0.0.1", True)],
    ids=["ipv4", "ipv6", "ipv4-nft-command"],
)  # fmt: skip
def test_migrate_with_an_established_connection(
    host: str,
    command: bool,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    server: Callable[..., Server],
) -> None:
    """The connection moves with the process and goes on byte-exact both ways; the lock made through
    libnftables, or (command) through the nft command where the library is missing."""
    env = dict(ENV, CKPT_NETLOCK_COMMAND="1") if command else ENV
    t, p, wrote = _connected(spawn, peer, host)
    port = t.ready.split()[1]
    s = server(env=env)
    rc, err = _finish(_migrate(t, s, "--tcp-established", "--json", env=env))
    assert rc == 0, err
    copy = s.done()
    assert copy != t.pid and not _alive(t.pid)
    assert s.last["warm"] is True, s.last  # the live rounds built the copy (their socket left aside)
    assert not _locks()  # lifted by the copy's restore as its last step
    # The copy holds the connection at the original's address pair, with what was queued.
    assert s.chan.cmd("fdinfo") == "fd 7 nonblock 1 cloexec 0 state 1"
    ss = subprocess.run(
        ["ss", "-Htn", "state", "established", "-p"], capture_output=True, text=True, check=True
    )
    mine = [ln for ln in ss.stdout.splitlines() if f"pid={copy}," in ln]
    assert len(mine) == 1 and f":{port} " in mine[0] and f":{p.port}" in mine[0], mine
    assert _queues(s.chan)["inq"] == TO_TARGET  # type: ignore[arg-type]
    _goes_on(s.chan, p, wrote)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "other"), [("127.0.0.1", "bound"), ("127.0.0.1", "connected"), ("::1", "connected")],
    ids=["ipv4-bound", "ipv4-connected", "ipv6-connected"],
)  # fmt: skip
def test_port_shared_with_another_socket(
    host: str,
    other: str,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    server: Callable[..., Server],
) -> None:
    """The original's local port shared by another socket of the host that does not listen, as the
    kernel shares an ephemeral port between outgoing connections to different peers (the other
    xdist worker's connection may get it while the original holds it): the copy's socket is bound
    beside both, the migration succeeds, and the other socket keeps its port."""
    t, p, wrote = _connected(spawn, peer, host)
    port = int(t.ready.split()[1])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        sharer = stack.enter_context(socket.socket(fam))
        # Bound beside the original in repair mode (SK_FORCE_REUSE), then out of it: sk_reuse 0, as
        # a connection given the port by connect() has.
        sharer.setsockopt(SOL_TCP, TCP_REPAIR, 1)
        sharer.bind((host, port))
        sharer.setsockopt(SOL_TCP, TCP_REPAIR, 0)
        if other == "connected":  # a real handshake from the shared port, to another peer
            far = stack.enter_context(socket.socket(fam))
            far.bind((host, 0))
            far.listen(1)
            sharer.connect(far.getsockname())
        s = server()
        rc, err = _finish(_migrate(t, s, "--tcp-established"))
        assert rc == 0, err
        copy = s.done()
        assert copy != t.pid and not _alive(t.pid)
        assert not _locks()
        assert s.chan.cmd("fdinfo") == "fd 7 nonblock 1 cloexec 0 state 1"
        assert _queues(s.chan)["inq"] == TO_TARGET  # type: ignore[arg-type]
        _goes_on(s.chan, p, wrote)  # type: ignore[arg-type]
        assert sharer.getsockname()[:2] == (host, port)
        if other == "connected":
            assert sharer.getpeername() == far.getsockname()


def test_refused_without_the_option(
    spawn: Callable[..., Target], peer: Callable[[str], Peer], server: Callable[..., Server]
) -> None:
    """Refused before any round, naming the connection and the option; nothing touched."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    s = server()
    rc, err = _finish(_migrate(t, s))
    assert rc == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert "established TCP connections" in err and "migrate it with --tcp-established" in err
    s.proc.kill()
    _original_goes_on(t, p, wrote)


def test_destination_killed_before_commit(
    spawn: Callable[..., Target], peer: Callable[[str], Peer], server: Callable[..., Server]
) -> None:
    """The destination dies with the final layer in hand (the connection locked and in repair mode
    at the source): the original's sockets leave repair mode, the lock goes, the original runs on."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    s = server(env=dict(ENV, CKPT_SERVE_HOLD_BEFORE_RESTORE="1"))
    m = _migrate(t, s, "--tcp-established")
    while not s.event("layer")["final"]:
        pass
    assert t.stopped_state() == "T" and len(_locks()) == 1  # (the stop can come after the layer)
    s.proc.kill()
    rc, err = _finish(m)
    assert rc == 1 and f"the original process {t.pid} runs on (untracked)" in err, err
    assert "could not be given back" not in err
    _original_goes_on(t, p, wrote)


def test_destination_fails_after_commit(
    spawn: Callable[..., Target], peer: Callable[[str], Peer], server: Callable[..., Server]
) -> None:
    """The worst moment: after the commit, the original's sockets disconnected (in repair mode) and
    the copy's connected at the same address pairs, the destination fails. It kills its copy (its
    sockets go silently) and says so; the source connects the original's sockets again from the
    state it read, and the original runs on with its connection."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    s = server(env=dict(ENV, CKPT_RESTORE_TEST_FAIL_CONNECTED="1"))
    rc, err = _finish(_migrate(t, s, "--tcp-established"))
    assert rc == 1 and f"the original process {t.pid} runs on (untracked)" in err, err
    assert "failing with the TCP connections made" in err and "could not be given back" not in err
    assert s.proc.wait(60) == 1
    _original_goes_on(t, p, wrote)


def test_pre_dump_leaves_connections_alone(
    tmp_path: Path, spawn: Callable[..., Target], peer: Callable[[str], Peer]
) -> None:
    """`ckpt dump --pre-dump` of a process with a connection: the connection is no state of a live
    layer (the final dump takes it), so it is neither refused nor locked nor touched."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    base = ["dump", "--pid", str(t.pid), "-D", str(tmp_path / "pre")]
    r = subprocess.run(
        _ckpt(*base, "--pre-dump"), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert not _locks()
    # The final dump takes the connection, and gives it back (no --kill).
    r = subprocess.run(_ckpt(*base, "--incremental", "--final", "--tcp-established"),
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    _original_goes_on(t, p, wrote)
