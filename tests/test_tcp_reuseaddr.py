"""SO_REUSEADDR of an established connection across TCP repair mode (ckpt/proc/tcp.py, module doc).

TCP_REPAIR on makes the kernel's sk_reuse SK_FORCE_REUSE (getsockopt reads 2) and TCP_REPAIR off
makes it SK_NO_REUSE (0), whatever the process had set. So a dump that leaves the process running,
a migration that gives the original its connection back (by ckpt or by its guard after a SIGKILL),
and a restore each set it back to the value read before repair mode; the layer records that value.

The option is read and set from outside through a copy of the target's fd (pidfd_getfd): the same
socket, so what is read is what the process would read.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.image import Layer
from ckpt.proc.pipes import pidfd_getfd
from tests.fuzzing import meta_of, pack, with_meta
from tests.test_cgthrottle_guard import _exited
from tests.test_migrate import ENV, ROOT, Server, _ckpt, _state, server
from tests.test_migrate_guard_final import WAIT, _held, _kill
from tests.test_restore import Restored, dump, killed, restored
from tests.test_restore_tcp import TO_TARGET, Peer, _connected, _goes_on, _locks, _no_lock_left, _queues, peer
from tests.util import Target

__all__ = ["_no_lock_left", "peer", "restored", "server"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)")

FD = 7  # the connection's fd in tests/targets/tcpconn.c


def _sock(pid: int) -> socket.socket:
    pfd = os.pidfd_open(pid)
    try:
        return socket.socket(fileno=pidfd_getfd(pfd, FD))
    finally:
        os.close(pfd)


def _reuse(pid: int) -> int:
    with _sock(pid) as s:
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)


def _set_reuse(pid: int, v: int) -> None:
    with _sock(pid) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, v)
    assert _reuse(pid) == v


@pytest.mark.parametrize("reuse", [0, 1])
def test_dump_leaves_reuseaddr_as_it_was(
    reuse: int, tmp_path: Path, spawn: Callable[..., Target], peer: Callable[[str], Peer]
) -> None:
    """A dump without --kill: the process keeps its SO_REUSEADDR (repair mode off had reset it to
    0), and the layer records the process's value, not repair mode's 2."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    _set_reuse(t.pid, reuse)
    out = dump(t.pid, tmp_path / "d", "--tcp-established")
    assert _reuse(t.pid) == reuse
    with Layer.open(Path(str(out["layer"]))) as lay:
        (rec,) = lay.meta.tcp_established
    assert rec.reuseaddr() == reuse
    assert not _locks()
    _goes_on(t, p, wrote)


@pytest.mark.parametrize("reuse", [0, 1])
def test_restore_gives_reuseaddr_back(
    reuse: int,
    tmp_path: Path,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    restored: Callable[..., Restored],
) -> None:
    """The restored connection has the SO_REUSEADDR the process had (it came back 1 always)."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    _set_reuse(t.pid, reuse)
    out = dump(t.pid, tmp_path / "d", "--tcp-established", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    r.set_pid(json.loads(r.readline())["pid"])
    assert r.wait() == 0
    assert _reuse(r.pid) == reuse
    _goes_on(r, p, wrote)


def _migrate(t: Target, s: Server, env: dict[str, str]) -> tuple[int, str]:
    argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:1", "--tcp-established")
    m = subprocess.run(argv, capture_output=True, env=env, cwd=ROOT, timeout=300, check=False)
    return m.returncode, m.stderr.decode()


@pytest.mark.parametrize("reuse", [0, 1])
def test_migrated_copy_has_reuseaddr(
    reuse: int, spawn: Callable[..., Target], peer: Callable[[str], Peer], server: Callable[..., Server]
) -> None:
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    _set_reuse(t.pid, reuse)
    s = server()
    rc, err = _migrate(t, s, ENV)
    assert rc == 0, err
    copy = s.done()
    assert _reuse(copy) == reuse
    _goes_on(s.chan, p, wrote)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("side", "fail"),
    [
        # READY fails at the source: the original's sockets still connected, in repair mode.
        ("src", "CKPT_MIGRATE_TEST_FAIL_AT_READY"),
        # The copy fails after the commit: the original's sockets disconnected, connected again.
        ("dst", "CKPT_RESTORE_TEST_FAIL_CONNECTED"),
    ],
    ids=["before-commit", "after-let-go"],
)
def test_failed_migration_gives_reuseaddr_back(
    side: str,
    fail: str,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    server: Callable[..., Server],
) -> None:
    """ckpt's own take-back (tcpmove.py) of the original's connection, each way it is done."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    _set_reuse(t.pid, 1)
    failing = dict(ENV, **{fail: "1"})
    s = server(env=failing if side == "dst" else ENV)
    rc, err = _migrate(t, s, failing if side == "src" else ENV)
    assert rc == 1 and f"the original process {t.pid} runs on" in err, err
    assert "could not be given back" not in err, err
    s.proc.wait(WAIT)
    assert _state(t.pid) in ("S", "R")
    assert _reuse(t.pid) == 1
    assert not _locks()
    assert _queues(t)["inq"] == TO_TARGET
    _goes_on(t, p, wrote)


@pytest.mark.parametrize("point", ["final-footer", "commit-told"])
def test_guard_gives_reuseaddr_back(
    point: str, spawn: Callable[..., Target], peer: Callable[[str], Peer], server: Callable[..., Server]
) -> None:
    """ckpt SIGKILLed before the COMMIT left: its guard (guardtcp.py) gives the original its
    connection back with SO_REUSEADDR as it was, still connected in repair mode (final-footer,
    before the stash: the value came with the sockets' inodes) or disconnected by the let-go
    (commit-told: connected again from the stash)."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    _set_reuse(t.pid, 1)
    s = server()
    m, guard = _held(t, s, point, "--tcp-established")
    try:
        _kill(m)
    finally:
        if m.poll() is None:
            m.kill()
            m.wait()
    _exited(guard)
    assert s.proc.wait(WAIT) == 1
    assert _state(t.pid) in ("S", "R")
    assert _reuse(t.pid) == 1
    assert not _locks()
    _goes_on(t, p, wrote)


def test_layer_with_repair_modes_value_restores_on_with_a_warning(
    tmp_path: Path,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    restored: Callable[..., Restored],
) -> None:
    """A layer of an older ckpt holds SO_REUSEADDR as repair mode read it (2): the process's value
    is unknown, so it is restored on (as that ckpt did), with one warning naming the connection,
    and the connection goes on."""
    t, p, wrote = _connected(spawn, peer, "127.0.0.1")
    port = int(t.ready.split()[1])
    layer = Path(str(dump(t.pid, tmp_path / "d", "--tcp-established", "--kill")["layer"]))
    killed(t)
    raw = layer.read_bytes()
    meta = meta_of(raw)
    (rec,) = meta["tcp_established"]
    assert not [o for o in rec["options"] if o[:2] == [socket.SOL_SOCKET, socket.SO_REUSEADDR]]  # 0
    rec["options"].append([socket.SOL_SOCKET, socket.SO_REUSEADDR, 2])
    old = tmp_path / "old.ckpt"
    old.write_bytes(with_meta(raw, pack(meta)))
    back = restored(old, "--detach", "--json")
    back.set_pid(json.loads(back.readline())["pid"])
    assert back.wait() == 0
    assert back.proc.stderr is not None
    err = back.proc.stderr.read().decode()
    warned = [ln for ln in err.splitlines() if "SO_REUSEADDR" in ln]
    assert len(warned) == 1 and warned[0].startswith("ckpt: warning: "), err
    assert f"127.0.0.1:{port} -> 127.0.0.1:{p.port}" in warned[0] and "not record" in warned[0], err
    assert _reuse(back.pid) == 1
    assert not _locks()
    _goes_on(back, p, wrote)
