"""Which fds of a process share one open file description, found in kcmp's order (pipes.Descriptions).

A process with hundreds of fds of one inode (/dev/null opened again and again, some of them dup'ed)
and of socketpairs with dups: the groups ckpt finds are the ones the process made, and finding
them costs O(n log n) kcmp calls, not one per pair (the freeze of a process with 400 fds spent
~30 ms in them).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ckpt.proc import anonfds, pipes
from ckpt.proc.fds import list_fds
from ckpt.ptrace import Frozen

SRC = r"""
import json, os, random, socket, sys
rng = random.Random(int(sys.argv[1]))
groups = []
for i in range(120):
    fd = os.open("/dev/null", os.O_RDONLY)
    groups.append([fd] + [os.dup(fd) for _ in range(rng.randrange(3))])
pairs = []
for i in range(40):
    a, b = socket.socketpair()
    a.setblocking(True)
    fa, fb = a.detach(), b.detach()
    pairs.append([fa] + ([os.dup(fa)] if rng.random() < 0.5 else []))
    pairs.append([fb])
# Close some low fds and open again: dups land below their originals too.
for g in rng.sample(groups, 20):
    extra = os.dup(g[0])
    g.append(extra)
print(json.dumps({"files": groups, "socks": pairs}), flush=True)
sys.stdin.read()
"""


@pytest.fixture(params=[1, 2, 3])
def target(request: pytest.FixtureRequest) -> Iterator[tuple[int, dict[str, list[list[int]]]]]:
    p = subprocess.Popen(
        [sys.executable, "-c", SRC, str(request.param)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        made = json.loads(p.stdout.readline())
        nf, ns = sum(map(len, made["files"])), sum(map(len, made["socks"]))
        print(f"seed {request.param}: {nf} files, {ns} sockets")
        yield p.pid, made
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def kcmp_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[how many kcmp calls ckpt made] (the real ones, counted)."""
    calls = [0]
    real = pipes.kcmp

    def counted(*a: int) -> int:
        calls[0] += 1
        return real(*a)

    monkeypatch.setattr(pipes, "kcmp", counted)
    return calls


def _canon(groups: list[list[int]]) -> list[list[int]]:
    return sorted(sorted(g) for g in groups)


def test_open_files_groups_as_made_in_n_log_n(
    target: tuple[int, dict[str, list[list[int]]]], kcmp_calls: list[int]
) -> None:
    pid, made = target
    fds = sorted(fd for g in made["files"] for fd in g)
    got = pipes.open_files(pid, fds)
    assert _canon(got) == _canon(made["files"])
    # In the order met: each group's first fd is its lowest, the groups by their first fd.
    assert [g[0] for g in got] == sorted(g[0] for g in got)
    assert all(g == sorted(g) for g in got)
    n = len(fds)
    assert kcmp_calls[0] <= n * math.ceil(math.log2(n) + 1), kcmp_calls[0]  # (pairwise: ~n^2/2 = 50,000)


def test_socket_dups_found_by_read_anonfds(
    target: tuple[int, dict[str, list[list[int]]]], kcmp_calls: list[int]
) -> None:
    """Each socket of a socketpair recorded once, its dups pointing at the first fd of the same
    description; the target frozen, as in a dump. kcmp compares only fds of the same inode."""
    pid, made = target
    with Frozen(pid):
        recs = anonfds.read_anonfds(pid, list_fds(pid))
    by_fd = {r["fd"]: r for r in recs if r["kind"] == "unix"}
    socks = [fd for g in made["socks"] for fd in g]
    assert sorted(by_fd) == sorted(socks)
    for g in made["socks"]:
        first = min(g)
        assert by_fd[first]["dup_of"] == -1
        assert all(by_fd[fd]["dup_of"] == first for fd in g if fd != first)
    # Only fds of one inode are compared: a socket with no dup costs none, a dup one.
    assert kcmp_calls[0] == sum(len(g) - 1 for g in made["socks"]), kcmp_calls[0]


def test_established_copies_only_tcp_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """tcp.established copies (pidfd_getfd) only the sockets sockfs names as TCP: of 60 unix sockets,
    a TCP listener and both ends of a loopback connection, the three TCP ones are copied and the
    connection's ends found."""
    from ckpt.proc import tcp

    src = r"""
import socket, sys
pairs = [socket.socketpair() for _ in range(30)]
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
c = socket.create_connection(lst.getsockname()); peer, _ = lst.accept()
print(lst.fileno(), c.fileno(), peer.fileno(), flush=True)
sys.stdin.read()
"""
    pipe = subprocess.PIPE
    p = subprocess.Popen([sys.executable, "-c", src], stdin=pipe, stdout=pipe, text=True)
    try:
        assert p.stdout is not None
        lst, c, peer = map(int, p.stdout.readline().split())
        copied: list[int] = []
        real = tcp._copy_fd

        def counted(pid: int, n: int) -> int:
            copied.append(n)
            return real(pid, n)

        monkeypatch.setattr(tcp, "_copy_fd", counted)
        with Frozen(p.pid):
            got = list(tcp.established(p.pid, list_fds(p.pid)))
        for _, _, _, s in got:
            s.close()
        assert sorted(x[1] for x in got) == [c, peer]  # (both ends of the connection are its)
        assert sorted(copied) == [lst, c, peer]  # (the listener is TCP: copied, then left out)
    finally:
        p.kill()
        p.wait()
