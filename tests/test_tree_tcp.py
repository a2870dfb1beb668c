"""Process trees with established TCP connections (`ckpt dump --tcp-established` of a tree): each
process's connections, and a connection between two processes of the tree (both ends inside, both
restored in repair mode and brought live together).

The target (tests/targets/tcptree.c): a parent and its child joined by a loopback connection, the
child also connected to this test's peer and echoing on both. Bytes are queued at the dump both in
the tree (the parent's echo left unread) and towards the peer; after the restore every byte both
ways is checked against its place in its stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.image import Layer
from tests.test_migrate import ENV, ROOT, Server, _ckpt, server
from tests.test_restore import Restored, alive, dump, restored  # noqa: F401 (a fixture)
from tests.test_restore_tcp import Peer, _locks, _no_lock_left, _theirs, peer
from tests.util import Target, run_ckpt

__all__ = ["_no_lock_left", "peer", "server"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)")

IN_TREE = 20000  # parent -> child bytes whose echo sits unread in the parent at the dump
TO_CHILD = 30000  # peer -> child bytes sent before the dump (their echo: towards the peer)


def _tree(
    spawn: Callable[..., Target], peer: Callable[[str], Peer], reap: list[int]
) -> tuple[Target, int, Peer]:
    p = peer("127.0.0.1")
    t = spawn("tcptree", "127.0.0.1", str(p.port), stderr=subprocess.DEVNULL)
    child = int(t.ready.split()[1])
    reap.append(child)
    p.accept()
    assert t.cmd("ping 1000") == "ok"
    p.start_reading()
    p.send(TO_CHILD)
    assert t.cmd(f"stuff {IN_TREE}") == f"stuffed {IN_TREE}"
    return t, child, p


def _established(pid: int) -> list[tuple[str, str]]:
    ss = subprocess.run(["ss", "-Htnp", "state", "established"], capture_output=True, text=True, check=True)
    rows = [ln.split() for ln in ss.stdout.splitlines() if f"pid={pid}," in ln]
    return sorted((w[2], w[3]) for w in rows)


def _goes_on(r: Target | Restored, p: Peer) -> None:
    """The tree's connection and the peer's go on byte-exact both ways."""
    assert r.cmd(f"drain {IN_TREE}") == "ok"  # queued in the parent at the dump
    assert r.cmd("ping 70000") == "ok"  # through the child and back, both ways inside the tree
    p.send(4000)
    got = p.wait_for(TO_CHILD + 4000)
    assert len(got) == TO_CHILD + 4000 and got == _theirs(0, TO_CHILD + 4000)


def test_tree_with_connections_is_restored(
    tmp_path: Path,
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    subreaper: list[int],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t, child, p = _tree(spawn, peer, subreaper)
    before = {t.pid: _established(t.pid), child: _established(child)}
    assert len(before[t.pid]) == 1 and len(before[child]) == 2
    out = dump(t.pid, tmp_path / "d", "--tcp-established", "--kill")
    assert out["restorable"], out["not_restorable"]
    assert not alive(t.pid) and not alive(child)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)  # the killed child, ours (subreaper): its pid is free for the restore
    assert len(_locks()) == 2  # one per process, kept until the restore
    with Layer.open(Path(str(out["layer"]))) as lay:
        assert len(lay.meta.tcp_established) == 1  # the parent's end of the tree's connection
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    info = json.loads(r.readline())
    r.set_pid(info["pid"])
    pids = {m["dumped_pid"]: m["pid"] for m in info["tree"]}
    subreaper.extend(pids.values())
    assert r.wait() == 0
    assert not _locks()
    # The same address pairs, in the same processes (pids kept where free).
    assert {d: _established(n) for d, n in pids.items()} == before
    _goes_on(r, p)


def test_tree_dump_leaves_connections_running(
    tmp_path: Path, spawn: Callable[..., Target], peer: Callable[[str], Peer], subreaper: list[int]
) -> None:
    """Without --kill the tree runs on; both ends of its connection were read while both were held
    (locked, in repair mode) and given back before the thaw: nothing lost, no lock left."""
    t, child, p = _tree(spawn, peer, subreaper)
    out = dump(t.pid, tmp_path / "d", "--tcp-established")
    assert out["restorable"], out["not_restorable"]
    assert not _locks()
    member = next(m for m in out["tree"] if m["pid"] == child)  # type: ignore[attr-defined]
    with Layer.open(Path(str(member["layer"]))) as lay:
        ends = [(rec.port, rec.peer_port) for rec in lay.meta.tcp_established]
    assert len(ends) == 2  # the child's end of the tree's connection and its peer's
    _goes_on(t, p)


def test_tree_with_connections_refused_without_the_option(
    tmp_path: Path, spawn: Callable[..., Target], peer: Callable[[str], Peer], subreaper: list[int]
) -> None:
    t, child, p = _tree(spawn, peer, subreaper)
    r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "established TCP connections" in r.stderr and "--tcp-established" in r.stderr
    assert alive(t.pid) and alive(child) and not _locks()
    _goes_on(t, p)


def _migrate_tree(t: Target, s: Server, env: dict[str, str] | None = None) -> tuple[int, str]:
    m = subprocess.run(_ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--tcp-established", "--json"),
                       capture_output=True, text=True, env=env or ENV, cwd=ROOT, timeout=300)  # fmt: skip
    return m.returncode, m.stderr


def test_tree_migrates_with_its_connections(
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    server: Callable[..., Server],
    subreaper: list[int],
) -> None:
    """`ckpt migrate --tcp-established` of the tree (one stop-and-copy): every process's connections
    are handed over at the commit, the one inside the tree with both its ends."""
    t, child, p = _tree(spawn, peer, subreaper)
    s = server("--new-pids")  # over loopback the original tree holds the pids: new ones (restore/pidheld.py)
    rc, err = _migrate_tree(t, s)
    assert rc == 0, err
    new = s.done()
    kids = [int(k) for k in Path(f"/proc/{new}/task/{new}/children").read_text().split()]
    subreaper.extend([new, *kids])
    assert len(kids) == 1 and not alive(t.pid) and not alive(child)
    assert not _locks()
    assert len(_established(new)) == 1 and len(_established(kids[0])) == 2
    _goes_on(s.chan, p)  # type: ignore[arg-type]


def test_tree_migration_failing_after_commit_gives_the_connections_back(
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    server: Callable[..., Server],
    subreaper: list[int],
) -> None:
    """The destination fails with every connection of its copy made (after the commit): the
    original tree's sockets are connected again and the original tree runs on with them."""
    t, child, p = _tree(spawn, peer, subreaper)
    s = server("--new-pids", env=dict(ENV, CKPT_RESTORE_TEST_FAIL_CONNECTED="1"))
    rc, err = _migrate_tree(t, s)
    assert rc == 1 and f"the tree of pid {t.pid} runs on" in err, err
    assert "could not be given back" not in err and "Traceback" not in err
    assert s.proc.wait(60) == 1
    assert alive(t.pid) and alive(child) and not _locks()
    _goes_on(t, p)


def test_tree_migration_refused_without_the_option(
    spawn: Callable[..., Target],
    peer: Callable[[str], Peer],
    server: Callable[..., Server],
    subreaper: list[int],
) -> None:
    t, child, p = _tree(spawn, peer, subreaper)
    s = server()
    m = subprocess.run(_ckpt("migrate", "--pid", str(t.pid), "--to", s.addr),
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)  # fmt: skip
    assert m.returncode == 1 and "Traceback" not in m.stderr and m.stderr.count("\n") == 1, m.stderr
    assert f"process {t.pid} has established TCP connections" in m.stderr
    assert "migrate it with --tcp-established" in m.stderr
    s.proc.kill()
    assert alive(t.pid) and alive(child) and not _locks()
    _goes_on(t, p)
