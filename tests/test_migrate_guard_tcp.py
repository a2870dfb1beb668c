"""`ckpt migrate --tcp-established` killed with SIGKILL at each point of the hand-over: the guard
(ckpt/migrate/guard.py, its TCP work in ckpt/migrate/guardtcp.py) leaves exactly one copy running,
that copy's connection carries on byte-exact both ways with the peer (the bytes queued at the final
freeze among them), and no network lock of this run is left (the autouse fixture).

Before the COMMIT leaves the original is continued with its connection: in repair mode still
connected (final-footer, ready: repair mode taken off), or disconnected by the commit's let-go
(commit-told: connected again from the records ckpt stashed before READY). From the COMMIT on the
copy holds the connection and the original is killed; the lock is lifted by the copy's restore
(one machine: the lock is shared) and never before it."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.migrate.testhold import POINTS
from tests.test_cgthrottle_guard import _exited, _guard_of
from tests.test_migrate import ENV, ROOT, TARGETS, Server, _ckpt, _state, server, token
from tests.test_migrate_guard_final import BEFORE_COMMIT, WAIT, _held, _kill
from tests.test_migrate_listen import Client
from tests.test_migrate_tcp_netns import SERVICE, Net, _service_in, net
from tests.test_restore import alive
from tests.test_restore_tcp import TO_TARGET, Peer, _connected, _goes_on, _locks, _no_lock_left, _queues, peer
from tests.test_tree_tcp import _goes_on as _tree_goes_on
from tests.test_tree_tcp import _tree
from tests.util import Target

__all__ = ["_no_lock_left", "net", "peer", "server"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)")


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_with_an_established_connection(
    spawn: Callable[..., Target], peer: Callable[[str], Peer], server: Callable[..., Server], point: str
) -> None:
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    s = server()
    m, guard = _held(t, s, point, "--tcp-established")
    try:
        if point != "killed":  # (killed by ckpt already)
            assert _state(t.pid) == "T"  # (stopped for the hand-over)
        if point in BEFORE_COMMIT:
            assert len(_locks()) == 1  # (after it, the copy's restore may have lifted it already)
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _exited(guard)  # it has acted, the TCP work included
    if point in BEFORE_COMMIT:
        assert s.proc.wait(WAIT) == 1  # the held copy dropped at the destination
        assert _state(t.pid) in ("S", "R")
        assert not _locks()
        assert t.cmd("fdinfo") == "fd 7 nonblock 1 cloexec 0 state 1"
        assert _queues(t)["inq"] == TO_TARGET
        _goes_on(t, p, wrote)
    else:
        copy = s.done()
        assert t.proc.wait(WAIT) == -signal.SIGKILL
        assert _state(copy) in ("S", "R")
        assert not _locks()
        assert s.chan.cmd("fdinfo") == "fd 7 nonblock 1 cloexec 0 state 1"
        assert _queues(s.chan)["inq"] == TO_TARGET  # type: ignore[arg-type]
        _goes_on(s.chan, p, wrote)  # type: ignore[arg-type]


@pytest.mark.parametrize("point", ["commit-told", "committed"])
def test_sigkill_across_namespaces(tmp_path: Path, net: Net, point: str) -> None:
    """The two-machine case (tests/test_migrate_tcp_netns.py): the service address moved by
    --on-commit before ckpt is killed. At commit-told (no byte of the COMMIT left) the guard runs
    --on-abort (the address back) and connects the original's sockets again from the stash; at
    committed the copy runs in the destination and the guard lifts the source's own lock (the
    destination lifted its own). Either way one copy runs and the client's stream goes on."""
    tok = token(tmp_path, "tok", "token-for-the-namespaces-0123")
    t = Target(
        net.in_src(sys.executable, str(TARGETS / "tcpserver.py"), "0.0.0.0"), stderr=subprocess.DEVNULL
    )
    c: Client | None = None
    s = Server(tmp_path / "dst", "--token-file", str(tok), "--listen", "10.232.9.2:0", netns=net.dst)
    try:
        c = Client(int(t.ready.split()[1]), 1, host=SERVICE, sock=net.socket_in_peer())
        c.exchange(70000)
        c.send(200_000)
        r, w = os.pipe()
        env = dict(ENV, CKPT_MIGRATE_TEST_HOLD=point, CKPT_MIGRATE_TEST_HOLD_FD=str(w))
        argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--token-file", str(tok),
                     "--policy", "rounds:1", "--tcp-established",
                     "--on-commit", net.move(net.src, net.dst),
                     "--on-abort", net.move(net.dst, net.src))  # fmt: skip
        m = subprocess.Popen(net.in_src(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env, cwd=ROOT, pass_fds=(w,))  # fmt: skip
        os.close(w)
        try:
            with os.fdopen(r, "rb") as f:
                assert select.select([f], [], [], WAIT)[0], f"ckpt migrate did not reach {point}"
                assert f.readline().decode().strip() == point
            guard = _guard_of(m.pid)
            assert _service_in(net, net.dst)  # (--on-commit ran)
            _kill(m)
        finally:
            if m.poll() is None:
                m.kill()
                m.wait()
        _exited(guard)
        assert not net.tables(net.src) and not net.tables(net.dst)
        if point == "commit-told":
            assert s.proc.wait(WAIT) == 1
            assert _service_in(net, net.src) and not _service_in(net, net.dst)
            c.check()  # the 200 kB that waited at the freeze
            c.exchange(50000)
            assert t.cmd("stats").split()[1:] == [str(t.pid), "1", "1"]
        else:
            copy = s.done()
            assert t.proc.wait(WAIT) == -signal.SIGKILL
            c.check()
            c.exchange(50000)
            assert s.chan.cmd("stats").split()[1:] == [str(copy), "1", "1"]
    finally:
        if c is not None:
            c.close()
        s.close()
        t.close()


@pytest.mark.parametrize("point", ["ready", "commit-told", "committed"])
def test_sigkill_of_a_tree_with_connections(
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    server: Callable[..., Server],
    subreaper: list[int],
    point: str,
) -> None:
    """A process tree (tests/targets/tcptree.c: a connection inside the tree, both ends, and one to
    the peer): the guard gives every member's connections back, or lifts nothing early."""
    t, child, p = _tree(spawn, peer, subreaper)
    s = server("--new-pids")  # over loopback the original tree holds the pids (restore/pidheld.py)
    m, guard = _held(t, s, point, "--tcp-established")
    try:
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _exited(guard)
    if point in BEFORE_COMMIT:
        assert s.proc.wait(WAIT) == 1
        assert _state(t.pid) in ("S", "R") and _state(child) in ("S", "R")
        assert not _locks()
        _tree_goes_on(t, p)
    else:
        new = s.done()
        kids = [int(k) for k in Path(f"/proc/{new}/task/{new}/children").read_text().split()]
        subreaper.extend([new, *kids])
        assert t.proc.wait(WAIT) == -signal.SIGKILL
        assert len(kids) == 1 and not alive(child)
        assert not _locks()
        _tree_goes_on(s.chan, p)  # type: ignore[arg-type]
