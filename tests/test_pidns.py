"""`ckpt restore --pidns` and `ckpt serve --pidns` (issue 12 B3): a process tree restored into a new
pid namespace, beside its originals that still hold the dumped pids. Inside, every process has its
dumped pid again (getpid, getppid, the pids a parent keeps for its children); the namespace's init
(pid 1) passes signals on to the root and exits with the root's status; killing it kills the tree.

Every test runs as a subreaper (fixture `subreaper`): the init of a --detach'ed restore is reparented
to the test, which reaps it and so learns the root's status, and kills what is left at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.restore.pidns import INIT_CODE, INIT_ROOT_OFF, nspid
from tests.test_migrate import Server, migrate, server  # noqa: F401 (a fixture)
from tests.test_restore import Restored, restored  # noqa: F401 (a fixture)
from tests.test_restore_props import _chain, _props
from tests.test_restore_tree import ENV, _dump, _line_within, _start_tree
from tests.test_tree_migrate_pool import _children
from tests.test_tree_pool import K, N
from tests.util import ROOT, Target

# Two children that, woken by SIGUSR1 from their parent, say who they are; the parent, woken by a
# SIGUSR1 (its handler writes to a pipe of its own) or by a byte in the FIFO argv[1], wakes them by
# the pids fork() gave it, reaps them by those pids, and exits with 7.
TREE = """
import os, select, signal, sys
def say(*words):  # one write per line: the processes share one pipe (and maybe PYTHONUNBUFFERED)
    os.write(1, (" ".join(map(str, words)) + "\\n").encode())
fifo = os.open(sys.argv[1], os.O_RDWR)
r, w = os.pipe()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
kids = []
for i in range(2):
    pid = os.fork()
    if pid == 0:
        signal.sigwait({signal.SIGUSR1})
        open("/proc/self/status").read()  # /proc/self stays readable
        say("child", os.getpid(), os.getppid())
        os._exit(3 + i)
    kids.append(pid)
signal.signal(signal.SIGUSR1, lambda *a: os.write(w, b"x"))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
say("ready", os.getpid(), *kids)
select.select([r, fifo], [], [])
for k in kids:
    os.kill(k, signal.SIGUSR1)
for k in kids:
    _, st = os.waitpid(k, 0)
    say("reaped", k, os.waitstatus_to_exitcode(st))
say("root", os.getpid(), os.getppid())
sys.exit(7)
"""


def _start(tmp_path: Path, subreaper: list[int], *pre: str) -> tuple[subprocess.Popen[bytes], list[int]]:
    os.mkfifo(tmp_path / "fifo")
    cmd = [sys.executable, "-c", TREE, str(tmp_path / "fifo")]
    if pre:  # a capsh, whose shell execs python: the same pid
        cmd = [*pre, "--", "-c", 'exec "$0" "$@"', *cmd]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout is not None
        word, *pids = p.stdout.readline().decode().split()
        assert word == "ready"
        subreaper.extend(int(x) for x in pids)
    except BaseException:
        p.kill()
        p.wait()
        raise
    return p, [int(x) for x in pids]


@pytest.fixture
def tree(tmp_path: Path, subreaper: list[int]) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """The original tree, running (its pids stay taken); killed and reaped at the end."""
    p, pids = _start(tmp_path, subreaper)
    try:
        yield p, pids
    finally:
        p.kill()
        p.wait()


def _restore(layer: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", layer, "--pidns", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip


def _detached(layer: str, subreaper: list[int]) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    r = _restore(layer, "--detach", "--json")
    assert r.stdout is not None and r.stderr is not None
    first = r.stdout.readline()
    assert first, r.stderr.read().decode()
    info: dict[str, object] = json.loads(first)
    assert r.wait(60) == 0
    init = info["init_pid"]
    assert isinstance(init, int)
    subreaper.insert(0, init)  # killed first: that kills the namespace
    return r, info


def _inner(pid: int) -> int:
    return nspid(f"/proc/{pid}/status")[-1]


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_tree_gets_its_pids_beside_its_originals(
    tmp_path: Path, tree: tuple[subprocess.Popen[bytes], list[int]], subreaper: list[int]
) -> None:
    orig, pids = tree
    root, k1, k2 = pids
    out = _dump(root, tmp_path / "d")  # no --kill: the originals keep running, and their pids
    assert out["restorable"], out["not_restorable"]
    r, info = _detached(str(out["layer"]), subreaper)
    init = int(info["init_pid"])  # type: ignore[call-overload]
    members = {m["dumped_pid"]: m for m in info["tree"]}  # type: ignore[attr-defined]
    assert sorted(members) == sorted(pids)
    assert info["pid_kept"] and info["dumped_pid"] == root and info["warnings"] == [], info
    # Ours are new pids (the originals hold theirs); inside, each is its dumped one, under pid 1.
    assert _inner(init) == 1
    for dumped, m in members.items():
        assert m["pid"] != dumped and _inner(m["pid"]) == dumped, m
    assert members[k1]["ppid"] == members[k2]["ppid"] == info["pid"]
    assert Path(f"/proc/{info['pid']}/stat").read_text().split()[3] == str(init)

    os.kill(int(info["pid"]), signal.SIGUSR1)  # type: ignore[call-overload]
    assert r.stdout is not None
    lines = r.stdout.read().decode().splitlines()  # until the last restored process ends
    _check_lines(lines, pids)
    _, status = os.waitpid(init, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7  # the root's status
    assert all(_gone(int(m["pid"])) for m in members.values())
    # The originals were never touched.
    assert orig.poll() is None and all(Path(f"/proc/{p}").exists() for p in pids)


def _expected(pids: list[int]) -> list[str]:
    root, k1, k2 = pids
    return [f"child {k1} {root}", f"child {k2} {root}", f"reaped {k1} 3", f"reaped {k2} 4", f"root {root} 1"]


def _check_lines(lines: list[str], pids: list[int]) -> None:
    """The children's lines come in any order with the parent's; the parent reaps in order, last."""
    want = _expected(pids)
    assert sorted(lines) == sorted(want) and lines[-1] == want[-1], lines
    assert [x for x in lines if x.startswith("reaped")] == want[2:4], lines


def _open_fifo(path: Path) -> None:
    """A byte into the FIFO, once a reader has it open (bounded: a thread, as _open_gate)."""

    def write() -> None:
        with open(path, "wb") as f:
            f.write(b"x")

    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "no restored process opened the FIFO within 60 s"


def test_foreground_restore_exits_with_the_roots_status(
    tmp_path: Path, tree: tuple[subprocess.Popen[bytes], list[int]], subreaper: list[int]
) -> None:
    """Without --detach ckpt waits for the init, which exits with the root's status: so does ckpt."""
    orig, pids = tree
    out = _dump(pids[0], tmp_path / "d", "--kill")  # the FIFO is then the restored root's alone
    assert orig.wait(30) == -signal.SIGKILL
    r = _restore(str(out["layer"]))
    try:
        _open_fifo(tmp_path / "fifo")
        assert r.wait(120) == 7
    finally:
        _end_restore(r)
    assert r.stdout is not None
    lines = r.stdout.read().decode().splitlines()
    _check_lines(lines, pids)


def _end_restore(r: subprocess.Popen[bytes]) -> None:
    """On failure, a `ckpt restore` still waiting: its children (the init, and with it the
    namespace) killed first, then ckpt; all reaped (the init by us, a subreaper, if ckpt went first)."""
    if r.poll() is not None:
        return
    kids = []
    for task in os.listdir(f"/proc/{r.pid}/task"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in Path(f"/proc/{r.pid}/task/{task}/children").read_text().split()]
    for k in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(k, signal.SIGKILL)
    r.kill()
    r.wait()
    for k in kids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(k, 0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_to_the_init(
    sig: int, tmp_path: Path, tree: tuple[subprocess.Popen[bytes], list[int]], subreaper: list[int]
) -> None:
    """SIGTERM: passed on to the root, which dies of it; the init exits with 128 + 15. SIGKILL: the
    init dies, and with it every process of the namespace."""
    _, pids = tree
    out = _dump(pids[0], tmp_path / "d")
    _, info = _detached(str(out["layer"]), subreaper)
    init = int(info["init_pid"])  # type: ignore[call-overload]
    members = [int(m["pid"]) for m in info["tree"]]  # type: ignore[attr-defined]
    os.kill(init, sig)
    _, status = os.waitpid(init, 0)
    if sig == signal.SIGKILL:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    else:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGTERM
    # The kernel waits for every process of a namespace before its init is reaped.
    assert all(_gone(m) for m in members), members


def test_refused_without_a_pid_namespace_to_make(tmp_path: Path, subreaper: list[int]) -> None:
    """A tree and a ckpt without CAP_SYS_ADMIN (which a new pid namespace needs): one clear line."""
    drop = ("capsh", "--drop=cap_sys_admin")
    p, pids = _start(tmp_path, subreaper, *drop)
    try:
        out = _dump(pids[0], tmp_path / "d")
        r = subprocess.run(
            [*drop, "--", "-c", 'exec "$0" "$@"', sys.executable, "-m", "ckpt", "restore", str(out["layer"]),
             "--pidns", "--detach"],
            capture_output=True, env=ENV, cwd=ROOT, timeout=120,
        )  # fmt: skip
    finally:
        p.kill()
        p.wait()
    assert r.returncode == 1, r
    err = r.stderr.decode()
    assert err == "ckpt: --pidns: cannot make a new pid namespace: clone3 failed: needs CAP_SYS_ADMIN\n", err


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to assemble pidinit.S")
def test_init_bytes_match_source(tmp_path: Path) -> None:
    obj, binf = tmp_path / "i.o", tmp_path / "i.bin"
    subprocess.run(["gcc", "-c", str(ROOT / "ckpt" / "restore" / "pidinit.S"), "-o", str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binf)], check=True)
    assert binf.read_bytes() == INIT_CODE and INIT_CODE[INIT_ROOT_OFF : INIT_ROOT_OFF + 4] == bytes(4)


# A pool stopped mid-way through imap (as tests/test_tree_pool.py's), then ended with terminate()
# while both workers are busy with tasks that never end: only terminate()'s SIGTERM, sent to the pids
# the pool keeps for its workers, can end them, and the pool then joins them by those pids.
POOL = f"""
import hashlib, multiprocessing as mp, os, signal, sys

def work(i):
    if i >= {K}:
        os.write(2, b"waiting %d\\n" % i)  # one write: both workers share stderr
        ev.wait()
    h = b"%d" % i
    for _ in range(2000):
        h = hashlib.sha256(h).digest()
    return i, h.hex()[:16]

def block(i):
    started.release()
    never.wait()

mp.set_start_method("fork")
ev, never, started = mp.Event(), mp.Event(), mp.Semaphore(0)
signal.signal(signal.SIGUSR1, lambda *a: ev.set())
if "now" in sys.argv:
    ev.set()
p = mp.Pool(2)
for r in p.imap(work, range({N})):
    print(*r, flush=True)
workers = list(p._pool)
p.map_async(block, range(2), chunksize=1)
started.acquire()
started.acquire()
print("pids", os.getpid(), *sorted(w.pid for w in workers), file=sys.stderr, flush=True)
p.terminate()
p.join()
print("exitcodes", *[w.exitcode for w in workers], flush=True)
print("done", flush=True)
"""


def test_pool_migrated_on_one_machine_is_terminated(
    tmp_path: Path,
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """`ckpt serve --pidns`: the copy of a multiprocessing.Pool, built while the original still runs
    (and holds its pids), has them again; its terminate() reaches its workers (SIGTERM: exit code
    -15 each) and the output is an uninterrupted run's. The init exits with the pool's status."""
    plain = subprocess.run([sys.executable, "-c", POOL, "now"], capture_output=True, timeout=120, check=True)
    want = plain.stdout.decode()
    assert want.splitlines()[-2:] == ["exitcodes -15 -15", "done"], want

    p = subprocess.Popen(
        [sys.executable, "-c", POOL], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    s = server("--pidns")
    workers: list[int] = []
    init = 0
    try:
        assert p.stdout is not None and p.stderr is not None
        before = [p.stdout.readline().decode() for _ in range(K)]
        assert [int(x.split()[0]) for x in before] == list(range(K)), before
        waiting = sorted(p.stderr.readline().split()[1] for _ in range(2))
        assert waiting == [b"%d" % K, b"%d" % (K + 1)], waiting
        workers = _children(p.pid)
        assert len(workers) == 2, workers

        rc, lines, err = migrate(p.pid, s.addr)
        assert rc == 0, err
        assert lines[-1]["policy"] == "tree", lines[-1]
        assert not any("restored as pid" in w for w in lines[-1]["warnings"]), lines[-1]  # type: ignore[attr-defined]
        assert p.wait(30) == -signal.SIGKILL
        for w in workers:  # the original workers: orphans, ours (subreaper)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w, 0)
        new = s.done()
        init = int(s.last["init_pid"])  # type: ignore[call-overload]
        assert s.last["pid_kept"] and _inner(init) == 1 and _inner(new) == p.pid, s.last
        kids = _children(new)
        assert sorted(_inner(k) for k in kids) == sorted(workers), (kids, workers)

        os.kill(new, signal.SIGUSR1)  # sets the event: the workers go on
        rest = list(s.other)
        while not rest or rest[-1] != "done":
            rest.append(s.chan.readline())
        assert "".join(before) + "".join(x + "\n" for x in rest) == want
        _, status = os.waitpid(init, 0)  # serve's orphan, so ours
        s.pid = None
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert all(_gone(k) for k in [new, *kids])
    finally:
        p.kill()
        p.wait()
        for x in [init, *workers]:
            if x:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(x, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(x, 0)


# One process (no tree) with a second thread: both keep their ids inside the namespace.
THREADED = """
import os, signal, sys, threading
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
ids, ready, go = {}, threading.Event(), threading.Event()
def run():
    ids["tid"] = threading.get_native_id()
    ready.set()
    go.wait()
    print("thread", ids["tid"], threading.get_native_id(), flush=True)
t = threading.Thread(target=run)
t.start()
ready.wait()
print("ready", os.getpid(), ids["tid"], flush=True)
signal.sigwait({signal.SIGUSR1})
go.set()
t.join()
print("main", os.getpid(), os.getppid(), flush=True)
sys.exit(5)
"""


def test_threaded_process_alone(tmp_path: Path, subreaper: list[int]) -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", THREADED],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert p.stdout is not None
        word, pid, tid = p.stdout.readline().decode().split()
        assert word == "ready"
        out = _dump(int(pid), tmp_path / "d")  # the original runs on, with its pid and tid
        assert out["restorable"], out["not_restorable"]
        r, info = _detached(str(out["layer"]), subreaper)
        new = int(info["pid"])  # type: ignore[call-overload]
        assert info["pid_kept"] and info["tree"] == [] and new != int(pid) and _inner(new) == int(pid), info
        tids = sorted(nspid(f"/proc/{new}/task/{t}/status")[-1] for t in os.listdir(f"/proc/{new}/task"))
        assert tids == sorted([int(pid), int(tid)])
        os.kill(new, signal.SIGUSR1)
        assert r.stdout is not None
        assert r.stdout.read().decode().splitlines() == [f"thread {tid} {tid}", f"main {pid} 1"]
        _, status = os.waitpid(int(info["init_pid"]), 0)  # type: ignore[call-overload]
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 5
        assert p.poll() is None  # the original, untouched
    finally:
        p.kill()
        p.wait()


# Properties whose restore names a thread or process to the kernel (a timer's SIGEV_THREAD_ID, a
# pending signal's queue, clear_child_tid, locks) or that a new namespace could change: each checked
# by the props target itself after a --pidns restore (tests/test_restore_props.py).
PIDNS_PROPS = [
    "ptimer",
    "tidaddr",
    "robust",
    "sigpending",
    "posixlock",
    "flock",
    "rseq",
    "itimer",
    "pdeathsig",
]


@pytest.mark.parametrize("prop", PIDNS_PROPS)
def test_property_in_a_pid_namespace(
    prop: str,
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t = _props(spawn, tmp_path, prop)
    layer = _chain(t, tmp_path / "d")
    r = restored(layer, "--pidns", "--detach", "--json")
    out = json.loads(r.readline())
    r.set_pid(out["pid"])
    init = int(out["init_pid"])
    try:
        assert r.wait() == 0
        assert _inner(out["pid"]) == out["dumped_pid"] and _inner(init) == 1
        assert r.cmd("check") == "ok"
    finally:
        os.kill(init, signal.SIGKILL)  # and the namespace with it
        os.waitpid(init, 0)


def test_thread_directed_timer_beside_its_original(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """A timer that signals one thread (SIGEV_THREAD_ID), restored while the original (and its tids)
    still run: timer_create is given the thread's tid inside the namespace, and the timer reaches it."""
    t = spawn("pidns_timer", stderr=subprocess.DEVNULL)
    assert t.cmd("check") == "ok"
    out = _dump(t.pid, tmp_path / "d")
    assert out["restorable"], out["not_restorable"]
    r = restored(Path(str(out["layer"])), "--pidns", "--detach", "--json")
    info = json.loads(r.readline())
    r.set_pid(info["pid"])
    init = int(info["init_pid"])
    try:
        assert r.wait() == 0
        assert r.cmd("check") == "ok"
        assert t.cmd("check") == "ok"  # the original, untouched
    finally:
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)


def test_c_tree_with_groups_sessions_and_a_zombie(tmp_path: Path, subreaper: list[int]) -> None:
    """tests/targets/tree.c beside its original: a grandchild, a zombie (exit 7), a process group
    leader and a session leader; each checks its pid, parent, group, session and memory itself."""
    proc, pids = _start_tree(subreaper)
    try:
        root, a, g, z, p, s = pids
        out = _dump(root, tmp_path / "d")
        assert out["restorable"], out["not_restorable"]
        r, info = _detached(str(out["layer"]), subreaper)
        init = int(info["init_pid"])  # type: ignore[call-overload]
        tree = {m["dumped_pid"]: m for m in info["tree"]}  # type: ignore[attr-defined]
        assert sorted(tree) == sorted(pids) and tree[z]["zombie"]
        for dumped, m in tree.items():
            assert _inner(m["pid"]) == dumped, m
        for x in (g, a, p, s, root):
            os.kill(tree[x]["pid"], signal.SIGUSR1)
        assert r.stdout is not None
        assert _line_within(r.stdout, 120, "the restored tree's root") == "tree ok"
        _, status = os.waitpid(init, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert proc.poll() is None  # the original, untouched
    finally:
        proc.kill()
        proc.wait()
