"""A process tree with established TCP connections migrated to another network namespace, the way
it would cross machines (`ckpt migrate --tcp-established --on-commit CMD --on-abort CMD` of a tree).

The namespaces, the bridge and the service address are tests/test_migrate_tcp_netns.py's (made by
the test, removed after it). The server is two processes (tests/targets/tcptreeserver.py): the
parent and its child each listen on a port of their own and hold a client of the peer's, both on
the service address. The hooks write a line each time they run, so the test sees that each runs
once for the whole tree, with every process's connections in its environment.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_migrate import ENV, ROOT, TARGETS, Server, _ckpt, token
from tests.test_migrate_listen import Client
from tests.test_migrate_tcp_netns import SERVICE, Net, _service_in, net  # noqa: F401 (a fixture)
from tests.test_restore import alive
from tests.util import Target

pytestmark = pytest.mark.skipif(
    any(shutil.which(c) is None for c in ("nft", "ip", "nsenter")), reason="needs nft, ip and nsenter"
)

Migrate = Callable[..., tuple[subprocess.CompletedProcess[str], Server]]


class Tree:
    def __init__(self, t: Target) -> None:
        w = t.ready.split()
        self.t = t
        self.ports = int(w[1]), int(w[2])
        self.pids = int(w[3]), int(w[4])


@pytest.fixture
def setup(
    tmp_path: Path,
    net: Net,  # noqa: F811
    subreaper: list[int],
) -> Iterator[tuple[Tree, list[Client], Migrate, Path]]:
    """The tree in the source, a client of each of its processes in the peer (one stream checked,
    200 kB of echo waiting unread), and migrate(commit=..., env=...): a destination `ckpt serve` in
    its namespace, and the source's `ckpt migrate` of the tree run to its end."""
    tok = token(tmp_path, "tok", "token-for-the-namespaces-0123")
    log = tmp_path / "hooks.log"
    t = Target(
        net.in_src(sys.executable, str(TARGETS / "tcptreeserver.py"), "0.0.0.0"), stderr=subprocess.DEVNULL
    )
    tree = Tree(t)
    subreaper.append(tree.pids[1])  # (killed with its parent; reaped here if it comes to us)
    clients: list[Client] = []
    servers: list[Server] = []
    record = f'echo "$CKPT_MIGRATE_PHASE $CKPT_TCP_ADDRESSES $CKPT_TCP_CONNECTIONS" >> {log}'

    def migrate(commit_fails: bool = False, env: dict[str, str] | None = None) -> tuple[
        subprocess.CompletedProcess[str], Server
    ]:  # fmt: skip
        # (--new-pids: one host, where the original tree holds the pids)
        s = Server(tmp_path / "dst", "--token-file", str(tok), "--listen", "10.232.9.2:0", "--new-pids",
                   netns=net.dst, env=env)  # fmt: skip
        servers.append(s)
        commit = f"{record} && {net.move(net.src, net.dst)}" + (" && exit 3" if commit_fails else "")
        argv = _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--token-file", str(tok),
                     "--tcp-established", "--on-commit", commit,
                     "--on-abort", f"{record} && {net.move(net.dst, net.src)}")  # fmt: skip
        p = subprocess.run(net.in_src(*argv), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
        return p, s

    try:
        for i, port in enumerate(tree.ports):
            c = Client(port, 1 + i, host=SERVICE, sock=net.socket_in_peer())
            clients.append(c)
            assert c.pid == tree.pids[i]
            c.exchange(70000)
            c.send(200_000)
        yield tree, clients, migrate, log
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.close()
        t.close()


def _hooks(log: Path) -> list[list[str]]:
    return [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []


def _both_connections(line: list[str], tree: Tree) -> None:
    """A hook's line: its phase, the one address, and the two connections (one per process)."""
    conns = line[2:]
    assert line[1] == SERVICE and len(conns) == 2, line
    assert sorted(int(c.split(">")[0].rsplit(":", 1)[1]) for c in conns) == sorted(tree.ports)


def test_tree_connections_follow_their_moved_address(
    net: Net,  # noqa: F811
    setup: tuple[Tree, list[Client], Migrate, Path],
    subreaper: list[int],
) -> None:
    """The address moves once, at the commit, for the whole tree; each process's connection goes on
    in the destination byte-exact, and new clients of both ports reach the copies there."""
    tree, clients, migrate, log = setup
    p, s = migrate()
    assert p.returncode == 0, p.stderr
    copy = s.done()
    subreaper.append(copy)
    kids = [int(k) for k in Path(f"/proc/{copy}/task/{copy}/children").read_text().split()]
    subreaper.extend(kids)
    assert tree.t.proc.wait(30) == -signal.SIGKILL and not alive(tree.pids[1])
    hooks = _hooks(log)
    assert [h[0] for h in hooks] == ["commit"], hooks
    _both_connections(hooks[0], tree)
    assert _service_in(net, net.dst) and not _service_in(net, net.src)
    for c in clients:
        c.check()  # the 200 kB that waited at the freeze
        c.exchange(50000)
    for i, port in enumerate(tree.ports):
        new = Client(port, 10 + i, host=SERVICE, sock=net.socket_in_peer())
        clients.append(new)
        assert new.pid == (copy, *kids)[i]
        new.exchange(3000)
    assert s.chan.cmd("stats").split()[1:] == [str(copy), "2", "2"]
    assert not net.tables(net.src) and not net.tables(net.dst)


def test_tree_failing_after_commit_moves_the_address_back(
    net: Net,  # noqa: F811
    setup: tuple[Tree, list[Client], Migrate, Path],
) -> None:
    """The destination fails after the commit (the address moved, its copies connected): --on-abort
    runs once and moves the address back, and the original tree takes its connections back."""
    tree, clients, migrate, log = setup
    p, s = migrate(env=dict(ENV, CKPT_RESTORE_TEST_FAIL_CONNECTED="1"))
    assert p.returncode == 1 and f"the tree of pid {tree.t.pid} runs on" in p.stderr, p.stderr
    assert "could not be given back" not in p.stderr and "Traceback" not in p.stderr
    assert s.proc.wait(60) == 1
    hooks = _hooks(log)
    assert [h[0] for h in hooks] == ["commit", "abort"], hooks
    for h in hooks:
        _both_connections(h, tree)
    assert _service_in(net, net.src) and not _service_in(net, net.dst)
    _originals_go_on(tree, clients, net)


def test_tree_commit_hook_failing_gives_everything_back(
    net: Net,  # noqa: F811
    setup: tuple[Tree, list[Client], Migrate, Path],
) -> None:
    """--on-commit fails after moving the address: the migration ends before the commit,
    --on-abort moves the address back, and the original tree runs on with its connections."""
    tree, clients, migrate, log = setup
    p, _ = migrate(commit_fails=True)
    assert p.returncode == 1 and "--on-commit command failed (exit status 3)" in p.stderr, p.stderr
    assert f"the tree of pid {tree.t.pid} runs on" in p.stderr and "could not be given back" not in p.stderr
    assert [h[0] for h in _hooks(log)] == ["commit", "abort"]
    assert _service_in(net, net.src) and not _service_in(net, net.dst)
    _originals_go_on(tree, clients, net)


def _originals_go_on(tree: Tree, clients: list[Client], net: Net) -> None:  # noqa: F811
    assert alive(tree.t.pid) and alive(tree.pids[1])
    for c in clients:
        c.check()
        c.exchange(50000)
    for i, port in enumerate(tree.ports):
        new = Client(port, 10 + i, host=SERVICE, sock=net.socket_in_peer())
        clients.append(new)
        assert new.pid == tree.pids[i]
        new.exchange(3000)
    assert tree.t.cmd("stats").split()[1:] == [str(tree.pids[0]), "2", "2"]
    assert not net.tables(net.src) and not net.tables(net.dst)
