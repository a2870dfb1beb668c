"""Shared memory of a tree stored once (issue 12 B4, ckpt/treeshare.py): a memfd, a shared anonymous
mapping and a /dev/shm file mapped shared that a parent and its children hold are stored in one
layer only, the first holder's (the parent's: members are dumped parents first). The others'
object records name the holder (`held_by`, no contents), and the tree record lists their shared
mappings (`shared_maps`), whose pages their layers lack; the restore makes one object for all of
them, filled from the holder.

Checked exactly: which layer holds which pages and contents; then the processes check their bytes
themselves after the restore, and that a write by one reaches the others.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ckpt.image import Layer, MergedView
from ckpt.image.chain import STATE_DATA
from tests.test_restore_tree import _dump, _reap, _restore_detached, _wait_children
from tests.util import run_ckpt

PAGES = 256  # 1 MiB of each kind
SHARER = f"""
import mmap, os, random, signal
N = {PAGES} * 4096
anon = mmap.mmap(-1, N)  # MAP_SHARED|MAP_ANONYMOUS
anon[:] = random.Random(1).randbytes(N)
fd = os.memfd_create("tree-share")
os.ftruncate(fd, N)
mfd = mmap.mmap(fd, N)
mfd[:] = random.Random(2).randbytes(N)
sfd = os.open(f"/dev/shm/ckpt-treeshare-{{os.getpid()}}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.ftruncate(sfd, N)
shf = mmap.mmap(sfd, N)  # POSIX shared memory, mapped shared (its fd closed)
shf[:] = random.Random(3).randbytes(N)
os.close(sfd)
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
kids = []
for k in range(2):
    c = os.fork()
    if c == 0:
        signal.sigwait({{signal.SIGUSR1}})
        ok = anon[16:] == random.Random(1).randbytes(N)[16:]
        ok = ok and mfd[16:] == random.Random(2).randbytes(N)[16:]
        ok = ok and shf[16:] == random.Random(3).randbytes(N)[16:]
        anon[8 * k : 8 * k + 8] = b"child-%d!" % k
        mfd[8 * k : 8 * k + 8] = b"child-%d!" % k
        shf[8 * k : 8 * k + 8] = b"child-%d!" % k
        os._exit(0 if ok else 3)
    kids.append(c)
print("ready", *kids, flush=True)
signal.sigwait({{signal.SIGUSR1}})
bad = [f"child {{c}}: {{st}}" for c in kids if (st := os.waitpid(c, 0)[1])]
if anon[:16] != b"child-0!child-1!": bad.append(f"anon {{anon[:16]!r}}")
if os.pread(fd, 16, 0) != b"child-0!child-1!": bad.append("memfd")
if shf[:16] != b"child-0!child-1!": bad.append("/dev/shm file")
if anon[16:] != random.Random(1).randbytes(N)[16:] or mfd[16:] != random.Random(2).randbytes(N)[16:]:
    bad.append("bytes")
print("ok" if not bad else " ".join(bad), flush=True)
"""


_OURS: set[int] = set()  # pids of the targets this run started


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """The target's /dev/shm file (this test's own: named by the target's pid) outlives it. Only
    this run's: a run beside this one needs its own file between its dump and its restore."""
    yield
    for p in _OURS:
        Path(f"/dev/shm/ckpt-treeshare-{p}").unlink(missing_ok=True)


def _start(reap: list[int]) -> tuple[subprocess.Popen[bytes], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SHARER],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reap.append(proc.pid)
    _OURS.add(proc.pid)
    assert proc.stdout is not None
    word, *kids = proc.stdout.readline().split()
    assert word == b"ready"
    reap.extend(int(k) for k in kids)
    return proc, [int(k) for k in kids]


def _shared_maps(layer: Path) -> list[tuple[int, int, str]]:
    """(start, end, path) of the layer's shared memory mappings (anonymous and memfd)."""
    return [
        (v.start, v.end, v.path)
        for v in Layer.open(str(layer)).meta.vmas
        if v.perms[3] == "s"
        and v.end - v.start == PAGES * 4096
        and v.path.startswith(("/dev/zero", "/memfd:", "/dev/shm/ckpt-treeshare-"))
    ]


def _data_pages(layer: Path, start: int, end: int) -> int:
    """Pages of [start, end) whose bytes the layer's chain holds."""
    mv = MergedView(Layer.open(str(layer)))
    try:
        t = mv.page_table()
        lo, hi = t.rows(start, end)
        return int(np.count_nonzero(t.state[lo:hi] == STATE_DATA))
    finally:
        mv.close()


def _check_stored_once(root_layer: Path, root: int, kids: list[int]) -> None:
    top = Layer.open(str(root_layer))
    tree = top.tree
    assert tree is not None
    base = root_layer.parent
    members = {p.pid: base / str(p.layer) for p in tree.processes[1:]}
    assert sorted(members) == sorted(kids)
    mine = _shared_maps(root_layer)
    assert len(mine) == 3, mine
    for s, e, _ in mine:  # the holder: every page (incompressible bytes), in its chain
        assert _data_pages(root_layer, s, e) == PAGES
    [memfd] = [o for o in top.meta.objects if o.kind == "memfd"]
    assert not memfd.held_by and memfd.stored and (memfd.extents or memfd.inherited)
    # (Also the shared file mappings python itself inherited, such as glibc's gconv cache.)
    assert {(k, s, e, root) for k in kids for s, e, _ in mine} <= set(tree.shared_maps), tree.shared_maps
    assert {(p, h) for p, _, _, h in tree.shared_maps} == {(k, root) for k in kids}
    for k, path in members.items():
        assert _shared_maps(path) == mine  # inherited at fork: the same addresses
        for s, e, _ in mine:
            assert _data_pages(path, s, e) == 0, (k, s)
        [o] = [o for o in Layer.open(str(path)).meta.objects if o.kind == "memfd"]
        assert (o.held_by, o.extents, o.digest) == (root, [], ""), o


def _run(layer: Path, root: int, kids: list[int]) -> None:
    r, info = _restore_detached(layer)
    assert r.wait(60) == 0
    assert {m["dumped_pid"]: m["pid"] for m in info["tree"]} == {x: x for x in [root, *kids]}  # type: ignore[attr-defined]
    for k in kids:
        os.kill(k, signal.SIGUSR1)
    os.kill(root, signal.SIGUSR1)
    assert r.stdout is not None
    assert r.stdout.readline() == b"ok\n"
    _, st = os.waitpid(root, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


@pytest.mark.parametrize("how", ["full", "chain", "merged"])
def test_shared_memory_is_stored_once(how: str, tmp_path: Path, subreaper: list[int]) -> None:
    """`chain`: a full tree dump, then an incremental one with --kill (the holder's contents
    inherited from its full layer when unchanged); `merged`: that chain merged into another
    directory, the chain removed."""
    proc, kids = _start(subreaper)
    d = tmp_path / "d"
    if how != "full":
        first = _dump(proc.pid, d)
        assert first["restorable"], first["not_restorable"]
        _check_stored_once(Path(str(first["layer"])), proc.pid, kids)
    out = _dump(proc.pid, d, "--kill", *(["--incremental"] if how != "full" else []))
    assert out["restorable"], out["not_restorable"]
    proc.wait(30)
    _reap(subreaper)
    layer = Path(str(out["layer"]))
    _check_stored_once(layer, proc.pid, kids)
    if how == "merged":
        m = tmp_path / "m"
        m.mkdir()
        layer = Path(run_ckpt("merge", str(layer), "-o", str(m), check=True).stdout.strip())
        shutil.rmtree(d)
        _check_stored_once(layer, proc.pid, kids)
        assert run_ckpt("verify", str(layer), check=True).stdout.count(": ok") == 3
        member = next(layer.parent.glob("tree/*/*.ckpt"))
        shown = run_ckpt("show", str(member), check=True).stdout
        assert f"in pid {proc.pid}'s layer" in shown, shown
    _run(layer, proc.pid, kids)


def test_member_layer_alone_is_refused(tmp_path: Path, subreaper: list[int]) -> None:
    """A child's layer restored on its own: its memfd's contents are in the parent's layer, so it
    is refused, naming that layer's pid (never restored with an empty memfd)."""
    proc, _ = _start(subreaper)
    out = _dump(proc.pid, tmp_path / "d")
    assert out["restorable"], out["not_restorable"]
    member = Path(str(out["tree"][0]["layer"]))  # type: ignore[index]
    r = run_ckpt("restore", str(member))
    assert r.returncode == 1 and r.stderr.startswith("ckpt: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"its contents are in the layer of pid {proc.pid} of the same tree dump" in r.stderr, r.stderr
    assert proc.poll() is None
    for f in (proc.stdout, proc.stderr):  # here, not by the garbage collector in a later test
        if f is not None:
            f.close()


# -- a real program: a multiprocessing.Pool over a large shared region -------------------------------
REGION = 8 << 20
K, N = 6, 16
POOL = f"""
import hashlib, mmap, multiprocessing as mp, os, random, signal, sys

def work(i):
    if i >= {K}:
        # one write(2): print() to stderr writes each argument apart, so the two workers' lines
        # could interleave on the pipe ("waiting waiting 6 7" then an empty line: seen in CI)
        os.write(2, b"waiting %d\\n" % i)
        ev.wait()
    part = region[i * ({REGION} // {N}) : (i + 1) * ({REGION} // {N})]
    return i, hashlib.sha256(part).hexdigest()[:16], mp.current_process().name != "MainProcess"

def go(*_):
    ev.set()

region = mmap.mmap(-1, {REGION})  # shared with the workers (fork), read by them
region[:] = random.Random(5).randbytes({REGION})
mp.set_start_method("fork")
ev = mp.Event()
signal.signal(signal.SIGUSR1, go)
if "now" in sys.argv:
    ev.set()
with mp.Pool(2) as p:
    for r in p.imap(work, range({N})):
        print(*r, flush=True)
print("done", flush=True)
"""


def test_pool_over_a_shared_region(tmp_path: Path, subreaper: list[int]) -> None:
    """Stopped mid-way through `imap` (both workers waiting on an Event), dumped with --kill: the
    8 MiB region is in the parent's layer only, the workers' layers hold none of its pages; restored,
    the pool finishes with the output of an uninterrupted run."""
    plain = subprocess.run([sys.executable, "-c", POOL, "now"], capture_output=True, timeout=120, check=True)
    want = plain.stdout.decode()
    proc = subprocess.Popen(
        [sys.executable, "-c", POOL], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # (its workers killed with it: they hold the pipes)
    )  # fmt: skip
    subreaper.append(proc.pid)
    assert proc.stdout is not None and proc.stderr is not None
    before = [proc.stdout.readline() for _ in range(K)]
    waiting = [proc.stderr.readline() for _ in range(2)]
    if not all(w.startswith(b"waiting ") for w in waiting):  # (once seen under load: say what came)
        os.killpg(proc.pid, signal.SIGKILL)
        rest = proc.communicate(timeout=30)
        raise AssertionError(f"pool: {waiting} then {rest}, status {proc.returncode}, stdout {before}")
    assert sorted(w.split()[1] for w in waiting) == [b"%d" % K, b"%d" % (K + 1)]
    subreaper.extend(_wait_children(proc.pid, 2))
    out = _dump(proc.pid, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    assert proc.wait(30) == -signal.SIGKILL
    _reap(subreaper)
    layer = Path(str(out["layer"]))
    tree = Layer.open(str(layer)).tree
    assert tree is not None
    [(s, e, _)] = [
        (v.start, v.end, v.path)
        for v in Layer.open(str(layer)).meta.vmas
        if v.perms[3] == "s" and v.end - v.start == REGION
    ]
    assert _data_pages(layer, s, e) == REGION // 4096
    assert sorted((p, a, b) for p, a, b, _ in tree.shared_maps if (a, b) == (s, e)) == sorted(
        (p.pid, s, e) for p in tree.processes[1:]
    )
    sems = {o.ino for o in Layer.open(str(layer)).meta.objects if o.name.startswith("/dev/shm/sem.")}
    assert sems
    for p in tree.processes[1:]:
        member = layer.parent / str(p.layer)
        assert _data_pages(member, s, e) == 0
        # The pool's semaphores (deleted /dev/shm files): the parent's layer holds them too.
        held = {o.ino: o.held_by for o in Layer.open(str(member)).meta.objects if o.kind == "ghost"}
        assert held and set(held) <= sems and set(held.values()) == {proc.pid}, held
    r, _ = _restore_detached(layer)
    assert r.wait(60) == 0
    os.kill(proc.pid, signal.SIGUSR1)
    assert r.stdout is not None
    rest = r.stdout.read()
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    assert (b"".join(before) + rest).decode() == want
