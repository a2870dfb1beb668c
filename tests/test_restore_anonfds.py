"""eventfd, timerfd, signalfd, epoll, unix socketpairs and inotify restored, or refused naming the fd
(issue 12 (B) 5).

tests/targets/fdkinds.c holds one kind per switch and checks it itself (`check` answers "ok" or
names what differs); each test dumps it (a full layer, then an incremental one with --kill),
restores the chain's top layer and asks the restored process to check again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.image.fdobjects import AnonFdRecord, PipeRecord
from ckpt.image.validate import MetaError
from tests.test_migrate import Server, migrate, server, token  # noqa: F401 (a fixture)
from tests.test_restore import Restored, dump, killed, restored  # noqa: F401 (a fixture)
from tests.util import TARGETS, LineChannel, Target, run_ckpt

ALL = "pipe,eventfd,timerfd,signalfd,epoll,socket,inotify,follow"
KINDS = ["eventfd", "timerfd", "signalfd", "eventfd,timerfd,epoll", "socket", "inotify", ALL]
# Switches the restore refuses, with the words its refusal must contain.
REFUSED = {
    "epollgone": "fd 49 (anon_inode:[eventpoll]) (an epoll watching a file no fd of the process holds",
    "inotifyq": "fd 58 (anon_inode:inotify) (an inotify with ",  # and "N bytes of events not yet read"
}


def _start(spawn: Callable[..., Target], tmp_path: Path, kinds: str) -> Target:
    t = spawn("fdkinds", kinds, str(tmp_path), stderr=subprocess.DEVNULL)
    assert t.cmd("check") == "ok"  # holds before any dump
    return t


def _chain(t: Target, d: Path, *, force: bool = False) -> Path:
    dump(t.pid, d)
    assert t.cmd("check") == "ok"  # the dump changed nothing the process can see
    out = dump(t.pid, d, "--incremental", "--kill", *(["--force"] if force else []))
    killed(t)
    return Path(str(out["layer"]))


def _chain_cmd(t: Target, d: Path) -> Path:
    """_chain for a target without `check`: the dumps must leave it answering as before."""
    dump(t.pid, d)
    assert t.cmd("ping") == "pong 2" and t.cmd("ping") == "pong 3"
    out = dump(t.pid, d, "--incremental", "--kill")
    assert t.proc.wait(30) == -signal.SIGKILL
    return Path(str(out["layer"]))


@pytest.mark.parametrize("kinds", KINDS)
def test_kind_is_restored(
    kinds: str,
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t = _start(spawn, tmp_path, kinds)
    layer = _chain(t, tmp_path / "d")
    r = restored(layer, "--detach", "--json")
    r.set_pid(json.loads(r.readline())["pid"])
    assert r.cmd("check") == "ok"
    assert r.cmd("check") == "ok"  # checking changed nothing


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_kind_is_refused(kind: str, tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = _start(spawn, tmp_path, kind)
    layer = _chain(t, tmp_path / "d", force=True)
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1, r.stderr
    assert REFUSED[kind] in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_every_kind_after_migrate(
    tmp_path: Path,
    spawn: Callable[..., Target],
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """`ckpt migrate` (live rounds, then the final one) over loopback: every kind comes back."""
    t = _start(spawn, tmp_path, ALL)
    tok = token(tmp_path, "tok", "a-token-for-the-fd-kinds-test")
    s = server("--token-file", str(tok))
    rc, _, err = migrate(t.pid, s.addr, "--token-file", str(tok), "--policy", "rounds:2")
    assert rc == 0, err
    s.done()
    assert t.proc.wait(30) == -signal.SIGKILL
    mig = LineChannel(s.proc, 60)
    assert mig.cmd("check") == "ok"


def test_socket_with_peer_outside_is_refused(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """One end of a socketpair handed to the process (its peer stays here): refused, named."""
    a, b = socket.socketpair()
    try:
        t = spawn("fdkinds", "", str(tmp_path), stderr=subprocess.DEVNULL, pass_fds=(3,),
                  preexec_fn=lambda: os.dup2(b.fileno(), 3))  # fmt: skip
        ino = os.fstat(b.fileno()).st_ino
        layer = _chain(t, tmp_path / "d", force=True)
        r = run_ckpt("restore", str(layer))
        assert r.returncode == 1 and f"fd 3 (socket:[{ino}]) (a socket)" in r.stderr, r.stderr
    finally:
        a.close()
        b.close()


def test_asyncio_loop_after_restore(tmp_path: Path, restored: Callable[..., Restored]) -> None:  # noqa: F811
    """A real program: python's asyncio loop (epoll watching stdin and its self-pipe socketpair,
    the socketpair as signal wakeup fd) goes on answering, signals included."""
    t = Target([sys.executable, str(TARGETS / "asyncio_echo.py")], stderr=subprocess.DEVNULL)
    try:
        kinds = {os.readlink(f"/proc/{t.pid}/fd/{n}").split(":")[0] for n in os.listdir(f"/proc/{t.pid}/fd")}
        assert {"anon_inode", "socket"} <= kinds  # the epoll and the socketpair are there
        assert t.cmd("ping") == "pong 1" and t.cmd("signal") == "signalled 1"
        layer = _chain_cmd(t, tmp_path / "d")
    finally:
        t.close()
    r = restored(layer)
    assert r.cmd("ping") == "pong 4"
    assert r.cmd("signal") == "signalled 2"
    r.send("exit")
    assert r.wait() == 0


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"kind": "userfaultfd"}, "is not one of"),
        ({"ints": {f"k{i}": 0 for i in range(65)}}, "too many keys"),
        ({"items": [[1] * 9]}, "items[0]"),
        ({"blobs": [b"x" * (1 << 26)] * 2}, "more bytes than a layer keeps"),
        ({"dup_of": -2}, "dup_of"),
        ({"fd": -1}, ".fd"),
    ],
)
def test_hostile_anonfd_records_are_rejected(record: dict[str, object], words: str) -> None:
    good = {"fd": 3, "kind": "eventfd", "dup_of": -1, "ints": {"count": 1}, "items": [], "blobs": []}
    assert AnonFdRecord.from_dict(good, "anonfds[0]").ints == {"count": 1}
    with pytest.raises(MetaError, match=re.escape(words)):
        AnonFdRecord.from_dict({**good, **record}, "anonfds[0]")


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"data": b"x" * 10, "size": 4}, "10 bytes do not fit a pipe of 4"),
        ({"size": 0}, ".size"),
        ({"size": 1 << 32}, ".size"),
        ({"files": [[-1]]}, "files[0]"),
        ({"fifo": 1}, ".fifo"),
    ],
)
def test_hostile_pipe_records_are_rejected(record: dict[str, object], words: str) -> None:
    good = {"ino": 5, "fifo": False, "path": "pipe:[5]", "size": 4096, "data": b"ab", "files": [[3, 4]]}
    assert PipeRecord.from_dict(good, "pipes[0]").files == [[3, 4]]
    assert PipeRecord.from_dict({k: v for k, v in good.items() if k != "files"}, "pipes[0]").files == []
    with pytest.raises(MetaError, match=re.escape(words)):
        PipeRecord.from_dict({**good, **record}, "pipes[0]")
