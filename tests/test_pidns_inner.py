"""Processes dumped inside a pid namespace below ckpt's (a container's): the layer records the ids
each saw there (NSpid, image/pidns.py), `ckpt restore --pidns` gives them back, and a restore
without --pidns refuses, naming the option (issue 12).

The targets run in a pid namespace this test makes (`unshare --pid --fork`, /proc left as it is):
a `sh` is its pid 1, and the target, its child, pid 2 (with a child of its own, pid 3, in the tree
case). Each process records what it saw before the dump (getpid, getppid, gettid of a thread, the
pid fork() gave the parent) and checks it again itself after the restore. Every test runs as a
subreaper (conftest `subreaper`): the namespaces' inits come to the test and are killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash

from ckpt.image import Layer
from ckpt.restore.pidns import nspid
from tests.test_image import meta_dict, reassemble
from tests.test_migrate import Server, migrate, server  # noqa: F401 (a fixture)
from tests.test_pidns import _detached
from tests.test_restore_tree import ENV, _dump
from tests.util import ROOT

# The root saw pid 2 and parent 1 (the sh); with "tree" it forks a child (pid 3 inside) that starts a
# thread; each waits for SIGUSR1, then checks its ids against those it saw before and says so. The
# root wakes its child by the pid fork() gave it and reaps it by that pid. `/proc/self` is the
# caller's /proc here: it gives each process's pid outside, which the test dumps by.
TARGET = """
import os, signal, sys, threading
def say(*words):  # one write per line: the processes share one pipe
    os.write(1, (" ".join(map(str, words)) + "\\n").encode())
def outer():
    return int(os.readlink("/proc/self"))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

def threaded(name):
    seen, ready, go = {}, threading.Event(), threading.Event()
    def run():
        seen["tid"] = threading.get_native_id()
        ready.set()
        go.wait()
        now = threading.get_native_id()
        say(name + "-thread", "ok" if now == seen["tid"] else "bad", seen["tid"], now)
    t = threading.Thread(target=run)
    t.start()
    ready.wait()
    return seen, go, t

def check(name, pid, ppid, extra=""):
    now = (os.getpid(), os.getppid())
    say(name, "ok" if now == (pid, ppid) else "bad", pid, ppid, *now, extra)

me = (os.getpid(), os.getppid())
if "tree" in sys.argv:
    r, w = os.pipe()
    kid = os.fork()
    if kid == 0:
        mine = (os.getpid(), os.getppid())
        seen, go, t = threaded("child")
        os.write(w, b"%d %d\\n" % (outer(), seen["tid"]))
        signal.sigwait({signal.SIGUSR1})
        go.set()
        t.join()
        check("child", *mine)
        os._exit(3)
    kid_outer, kid_tid = os.read(r, 100).split()
    say("ready", outer(), *me, kid, kid_tid.decode(), kid_outer.decode())
    signal.sigwait({signal.SIGUSR1})
    os.kill(kid, signal.SIGUSR1)
    got, st = os.waitpid(kid, 0)
    check("root", *me, f"reaped={got == kid and os.waitstatus_to_exitcode(st) == 3}")
    sys.exit(7)
seen, go, t = threaded("root")
say("ready", outer(), *me, seen["tid"])
signal.sigwait({signal.SIGUSR1})
go.set()
t.join()
check("root", *me)
sys.exit(7)
"""


class Contained:
    """The target, running in a pid namespace of its own; killed with its namespace at the end."""

    def __init__(self, *args: str, ns: bool = True, init: bool = False) -> None:
        script = 'python3 -c "$0" "$@" & wait'
        cmd = ["unshare", "--pid", "--fork", "--", "sh", "-c", script] if ns else ["python3", "-c"]
        if init:  # the target is the namespace's init itself
            cmd = ["unshare", "--pid", "--fork", "--", "python3", "-c"]
        self.proc = subprocess.Popen(
            [*cmd, TARGET, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"),
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().split()
        assert line and line[0] == "ready", line
        self.outer = int(line[1])
        self.seen = [int(x) for x in line[2:]]
        # The namespace's init (the sh), by our pid: the target's parent.
        self.init = self.outer if init else 0
        if ns and not init:
            self.init = int(Path(f"/proc/{self.outer}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert nspid(f"/proc/{self.init}/status")[-1] == 1, self.init  # (never kill another)

        self.ns = os.stat(f"/proc/{self.outer}/ns/pid").st_ino

    def kill(self) -> None:
        if self.init and Path(f"/proc/{self.init}").exists():
            os.kill(self.init, signal.SIGKILL)  # and with it every process of its namespace
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def contained(subreaper: list[int]) -> Iterator[type[Contained]]:
    made: list[Contained] = []

    class Made(Contained):
        def __init__(self, *args: str, ns: bool = True, init: bool = False) -> None:
            super().__init__(*args, ns=ns, init=init)
            made.append(self)

    try:
        yield Made
    finally:
        for c in made:
            c.kill()


def _inner(pid: int) -> int:
    return nspid(f"/proc/{pid}/status")[-1]


def _lines(r: subprocess.Popen[bytes]) -> list[str]:
    assert r.stdout is not None
    return sorted(r.stdout.read().decode().splitlines())  # until every restored process is gone


def test_process_gets_the_ids_it_saw(
    tmp_path: Path, contained: type[Contained], subreaper: list[int]
) -> None:
    """One process with a thread: its layer records what it saw, and --pidns gives it back."""
    c = contained()
    pid, ppid, tid = c.seen
    assert (pid, ppid) == (2, 1) and c.outer != pid
    out = _dump(c.outer, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    meta = Layer.open(str(out["layer"])).meta
    assert meta.pidns is not None
    rec = meta.pidns
    assert (rec.pid, rec.ppid, rec.pgid, rec.sid, rec.depth) == (2, 1, 0, 0, 1)
    assert list(rec.tids.values()) == [tid] and rec.ino == c.ns

    r, info = _detached(str(out["layer"]), subreaper)
    new = int(info["pid"])  # type: ignore[call-overload]
    assert info["dumped_pid"] == c.outer and info["warnings"] == [], info
    assert _inner(new) == pid and _inner(int(info["init_pid"])) == 1  # type: ignore[call-overload]
    tids = sorted(nspid(f"/proc/{new}/task/{t}/status")[-1] for t in os.listdir(f"/proc/{new}/task"))
    assert tids == sorted([pid, tid])
    os.kill(new, signal.SIGUSR1)
    assert _lines(r) == [f"root ok {pid} {ppid} {pid} {ppid} ", f"root-thread ok {tid} {tid}"]
    _, status = os.waitpid(int(info["init_pid"]), 0)  # type: ignore[call-overload]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


def test_from_an_incremental_chain(tmp_path: Path, contained: type[Contained], subreaper: list[int]) -> None:
    """A full dump, then an incremental one with --kill (its tracker armed, read and disarmed by
    injections the target makes as its namespace numbers it): --pidns restores the top with the ids."""
    c = contained()
    pid, ppid, tid = c.seen
    _dump(c.outer, tmp_path / "d")
    out = _dump(c.outer, tmp_path / "d", "--incremental", "--kill")
    with Layer.open(str(out["layer"])) as top:
        assert top.meta.inventory.incremental and top.meta.pidns is not None
    r, info = _detached(str(out["layer"]), subreaper)
    new = int(info["pid"])  # type: ignore[call-overload]
    assert _inner(new) == pid
    os.kill(new, signal.SIGUSR1)
    assert _lines(r) == [f"root ok {pid} {ppid} {pid} {ppid} ", f"root-thread ok {tid} {tid}"]
    _, status = os.waitpid(int(info["init_pid"]), 0)  # type: ignore[call-overload]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


def test_tree_gets_the_ids_it_saw(tmp_path: Path, contained: type[Contained], subreaper: list[int]) -> None:
    """Parent (2), child (3) with a thread: each its pid, parent and thread id again; the parent
    wakes and reaps its child by the pid fork() gave it."""
    c = contained("tree")
    pid, ppid, kid, kid_tid, kid_outer = c.seen
    assert (pid, ppid, kid) == (2, 1, 3)
    out = _dump(c.outer, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    tree = Layer.open(str(out["layer"])).meta.tree
    assert tree is not None
    assert tree.ns_pids == {c.outer: (pid, c.ns), kid_outer: (kid, c.ns)}

    r, info = _detached(str(out["layer"]), subreaper)
    members = {m["dumped_pid"]: int(m["pid"]) for m in info["tree"]}  # type: ignore[attr-defined]
    assert _inner(members[c.outer]) == pid and _inner(members[kid_outer]) == kid, info
    os.kill(members[kid_outer], signal.SIGUSR1)  # (blocked until the root's own SIGUSR1 wakes it: queued)
    os.kill(members[c.outer], signal.SIGUSR1)
    assert _lines(r) == sorted(
        [
            f"root ok {pid} {ppid} {pid} {ppid} reaped=True",
            f"child ok {kid} {pid} {kid} {pid} ",
            f"child-thread ok {kid_tid} {kid_tid}",
        ]
    )
    _, status = os.waitpid(int(info["init_pid"]), 0)  # type: ignore[call-overload]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


@pytest.mark.parametrize("what", ["process", "tree"])
def test_refused_without_pidns(what: str, tmp_path: Path, contained: type[Contained]) -> None:
    """Restored outside a namespace, the process would see other pids: refused, one line naming
    --pidns; nothing runs."""
    c = contained(*(["tree"] if what == "tree" else []))
    out = _dump(c.outer, tmp_path / "d")  # the original runs on
    r = subprocess.run(
        [sys.executable, "-m", "ckpt", "restore", str(out["layer"]), "--detach"],
        capture_output=True, env=ENV, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and r.stdout == b"", r
    assert r.stderr.decode() == (
        f"ckpt: pid {c.outer} was dumped inside a pid namespace below ckpt's, where it was pid 2: "
        "outside one it cannot get back the pids it saw (its own, its parent's, its children's, its "
        "threads'); restore it with --pidns\n"
    )
    assert Path(f"/proc/{c.outer}").exists()


def _as_version_5(path: Path) -> None:
    """Rewrite a layer as an older ckpt wrote it: format 5, without the pidns record."""
    d = meta_dict(path)
    d.pop("pidns", None)
    d["inventory"]["version"] = 5
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 8, 5)
    struct.pack_into("<Q", raw, 56, xxhash.xxh3_64_intdigest(bytes(raw[:56])))
    path.write_bytes(bytes(raw))
    reassemble(path, d)


def test_version_5_layer_restores(tmp_path: Path, contained: type[Contained], subreaper: list[int]) -> None:
    """A format-5 layer (an older ckpt's: no pidns record) of a process with a thread restores: its
    pid and its thread's tid kept."""
    c = contained(ns=False)
    pid, _, tid = c.seen
    out = _dump(c.outer, tmp_path / "d", "--kill")
    assert c.proc.wait(30) == -signal.SIGKILL  # (reaped: its pid free again)
    layer = Path(str(out["layer"]))
    _as_version_5(layer)
    with Layer.open(str(layer)) as lay:
        assert lay.header.version == 5 and lay.meta.pidns is None
    r = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach", "--json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert r.stdout is not None
    info = json.loads(r.stdout.readline() or b"null")
    assert info is not None and info["pid"] == pid and info["pid_kept"], r.stderr and r.stderr.read()
    subreaper.append(pid)
    assert r.wait(60) == 0
    os.kill(pid, signal.SIGUSR1)
    root, thread = _lines(r)
    assert root.split()[2] == root.split()[4] == str(pid), root  # getpid(): the dumped pid
    assert thread == f"root-thread ok {tid} {tid}"


def test_contained_process_migrates(
    contained: type[Contained],
    server: Callable[..., Server],  # noqa: F811
    subreaper: list[int],
) -> None:
    """`ckpt migrate` of a contained process: to a `ckpt serve` without --pidns it is refused (the
    original runs on); to a `ckpt serve --pidns` the copy has the ids the original saw."""
    c = contained()
    pid, ppid, tid = c.seen
    plain = server()
    rc, _, err = migrate(c.outer, plain.addr)
    assert rc == 1 and "restore it with --pidns" in err, err
    assert plain.proc.wait(60) == 1
    assert Path(f"/proc/{c.outer}").exists()
    state = Path(f"/proc/{c.outer}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "S", state  # running on, not left stopped

    s = server("--pidns")
    rc, lines, err = migrate(c.outer, s.addr)
    assert rc == 0, err
    new = s.done()
    init = lines[-1]["init_pid"]
    assert isinstance(init, int)
    subreaper.insert(0, init)  # serve's orphan, so ours; killing it ends the namespace
    assert _inner(new) == pid and _inner(init) == 1
    os.kill(new, signal.SIGUSR1)
    got = list(s.other)
    while len(got) < 2:
        got.append(s.chan.readline())
    assert sorted(got) == [f"root ok {pid} {ppid} {pid} {ppid} ", f"root-thread ok {tid} {tid}"]
    _, status = os.waitpid(init, 0)
    subreaper.remove(init)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
