"""Shared anonymous memory whose first holder in a tree cannot read it (PROT_NONE): its pages are
stored once, by that holder (ckpt/treeshare.py, issue 12). Its dump reads them all the same (through
/proc/PID/mem, the object's whole), and its restore fills them through a writable mapping of the one
object the tree restore makes, so it stands for the later holders; before, each later holder stored
them again (a 64-page object: 64 pages in the parent's layer and 64 in the child's).

The parent fills a MAP_SHARED|MAP_ANONYMOUS object with random bytes, forks a child that keeps it
readable, then makes its own mapping PROT_NONE (`none`) or only its first quarter (`part`). Each
layer's stored pages of the object are counted exactly; after the restore the parent makes its
mapping readable again and checks its bytes, the child checks its own, and a write by the child
reaches the parent (one object again). Also from a chain (a full dump, then `--incremental --kill`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt.image import Layer
from tests.test_restore_tree import _dump, _reap, _restore_detached
from tests.test_tree_share_partial import _stored

PAGES = 64
N = PAGES * 4096
TARGET = f"""
import ctypes, os, random, signal, sys
N, MODE = {N}, sys.argv[1]
c = ctypes
libc = c.CDLL(None, use_errno=True)
libc.mmap.restype = c.c_void_p
libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
libc.mprotect.argtypes = [c.c_void_p, c.c_size_t, c.c_int]
base = libc.mmap(None, N, 3, 0x01 | 0x20, -1, 0)  # MAP_SHARED|MAP_ANONYMOUS
data = random.Random(5).randbytes(N)
c.memmove(base, data, N)
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
child = os.fork()
if child == 0:
    signal.sigwait({{signal.SIGUSR1}})
    ok = c.string_at(base, N) == data
    c.memmove(base + N // 2, b"child!!!", 8)
    os._exit(0 if ok else 3)
libc.mprotect(base, N if MODE == "none" else N // 4, 0)
print("ready", child, base, flush=True)
signal.sigwait({{signal.SIGUSR1}})
bad = []
libc.mprotect(base, N, 3)
if c.string_at(base, N) != data:
    bad.append("parent's bytes")
os.kill(child, signal.SIGUSR1)
st = os.waitpid(child, 0)[1]
if st:
    bad.append(f"child {{st}}")
if c.string_at(base + N // 2, 8) != b"child!!!":
    bad.append("the child's write is not the parent's")
print("ok" if not bad else " ".join(bad), flush=True)
"""


@pytest.mark.parametrize("chain", ["full", "incremental"])
@pytest.mark.parametrize("mode", ["none", "part"])
def test_unreadable_holder_stores_the_pages_once(
    mode: str, chain: str, tmp_path: Path, subreaper: list[int]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", TARGET, mode],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    word, child_s, base_s = proc.stdout.readline().split()
    assert word == b"ready"
    child, base = int(child_s), int(base_s)
    subreaper.append(child)
    d = tmp_path / "d"
    layers = []
    if chain == "incremental":
        first = _dump(proc.pid, d)
        assert first["restorable"], first["not_restorable"]
        layers.append(first)
    out = _dump(proc.pid, d, "--kill", *(["--incremental"] if chain == "incremental" else []))
    assert out["restorable"], out["not_restorable"]
    layers.append(out)
    proc.wait(30)
    _reap(subreaper)
    for i, lay in enumerate(layers):
        root = Path(str(lay["layer"]))
        [m] = lay["tree"]  # type: ignore[misc]
        # Each page of the object once in the tree's layers: all in the parent's first layer (its
        # mapping, readable or not, is the first holder), none in the child's; none new after.
        assert (_stored(root, base), _stored(Path(str(m["layer"])), base)) == ((PAGES if i == 0 else 0), 0)
        tree = Layer.open(str(root)).tree
        assert tree is not None
        mine = [(p, s - base, e - base, h) for p, s, e, h in tree.shared_maps if base <= s < base + N]
        assert mine == [(child, 0, N, proc.pid)]  # (others: shared mappings of files python holds)
    r, info = _restore_detached(Path(str(out["layer"])))
    assert r.wait(60) == 0
    pids = {x["dumped_pid"]: x["pid"] for x in info["tree"]}  # type: ignore[attr-defined]
    assert pids == {proc.pid: proc.pid, child: child}
    subreaper.extend([proc.pid, child])
    os.kill(proc.pid, signal.SIGUSR1)
    assert r.stdout is not None
    assert r.stdout.readline() == b"ok\n"
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
