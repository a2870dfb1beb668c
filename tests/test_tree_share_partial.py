"""Shared anonymous memory of a tree that its processes map only partly (ckpt/treeshare.py): a
parent that maps a whole MAP_SHARED|MAP_ANONYMOUS object and a child that keeps only a window of
it, the reverse, and two that overlap. Each page of the object is stored once per tree dump, by the
first member (parents first) whose mapping holds it; the rest of the tree record names it
(`shared_maps`, pieces of mappings). After the restore the processes check their own bytes, and a
write by the child reaches the parent (one object again).

`stale`: the parent maps the middle half at the first dump (the child stores the rest), then maps
the last quarter of the object again (through /proc/self/map_files, where a PROT_NONE placeholder
kept the place) and rewrites its three quarters, one page of the last now zeros; the second
(incremental) dump stores them in the parent's layer only. The child's chain still holds the first
dump's bytes of the last quarter: its restore must not write them over the parent's (the zero page,
which the parent's restore does not write, shows it). (Before, this test made the parent's mapping
PROT_NONE at the first dump, when an unreadable mapping was no holder; it is one now:
tests/test_tree_share_unreadable.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ckpt.image import Layer
from tests.test_restore_tree import _dump, _reap, _restore_detached

PAGES = 64
N = PAGES * 4096
Q = N // 4
# (parent's readable part, child's mapping) of the object, in bytes
MODES = {
    "parent-whole": ((0, N), (Q, 3 * Q)),
    "child-whole": ((Q, 3 * Q), (0, N)),
    "overlap": ((0, 3 * Q), (Q, N)),
    "stale": ((Q, N), (0, N)),
}
TARGET = f"""
import ctypes, os, random, signal, sys
N, MODE = {N}, sys.argv[1]
P_LO, P_HI, C_LO, C_HI = (int(x) for x in sys.argv[2:6])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
c = ctypes
libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
base = libc.mmap(None, N, 3, 0x01 | 0x20, -1, 0)  # MAP_SHARED|MAP_ANONYMOUS
gen = 1
ZERO = N - 8 * 4096  # in the last quarter, which the child's first layer stored
def expect(lo, hi):
    b = bytearray(random.Random(1).randbytes(N))
    if gen == 2:  # the parent's part rewritten; a page of zeros: nothing the parent's restore
        b[P_LO:] = random.Random(2).randbytes(N)[P_LO:]  # writes, the object's own zeros
        b[ZERO : ZERO + 4096] = bytes(4096)
    return bytes(b[lo:hi])
def view(lo, hi):
    return ctypes.string_at(base + lo, hi - lo)
def keep(lo, hi):  # the rest of this process's mapping of the object unmapped
    if lo:
        libc.munmap(base, lo)
    if hi < N:
        libc.munmap(base + hi, N - hi)
ctypes.memmove(base, expect(0, N), N)
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1, signal.SIGUSR2}})
child = os.fork()
if child == 0:
    keep(C_LO, C_HI)
    signal.sigwait({{signal.SIGUSR1}})
    gen = 2 if MODE == "stale" else 1
    ok = view(C_LO, C_HI) == expect(C_LO, C_HI)
    ctypes.memmove(base + N // 2, b"child!!!", 8)
    os._exit(0 if ok else 3)
if MODE == "stale":
    keep(P_LO, 3 * N // 4)  # the middle half at the first dump; the last quarter kept for later:
    libc.mmap(base + 3 * N // 4, N // 4, 0, 0x02 | 0x20 | 0x10, -1, 0)  # MAP_PRIVATE|ANON|FIXED
else:
    keep(P_LO, P_HI)
print("ready", child, flush=True)
while True:
    if signal.sigwait({{signal.SIGUSR1, signal.SIGUSR2}}) == signal.SIGUSR2:
        gen = 2  # the last quarter mapped again, the parent's three quarters rewritten
        fd = os.open(f"/proc/self/map_files/{{base + P_LO:x}}-{{base + 3 * N // 4:x}}", os.O_RDWR)
        got = libc.mmap(base + 3 * N // 4, N // 4, 3, 0x01 | 0x10, fd, 3 * N // 4)  # SHARED|FIXED
        os.close(fd)
        assert got == base + 3 * N // 4, got
        ctypes.memmove(base + P_LO, expect(P_LO, N), N - P_LO)
        print("done", flush=True)
        continue
    bad = []
    if view(P_LO, P_HI) != expect(P_LO, P_HI):
        bad.append("parent's bytes")
    os.kill(child, signal.SIGUSR1)
    st = os.waitpid(child, 0)[1]
    if st:
        bad.append(f"child {{st}}")
    if view(N // 2, N // 2 + 8) != b"child!!!":
        bad.append("the child's write is not the parent's")
    print("ok" if not bad else " ".join(bad), flush=True)
    sys.exit(0)
"""


def _start(mode: str, reap: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    (plo, phi), (clo, chi) = MODES[mode]
    proc = subprocess.Popen(
        [sys.executable, "-c", TARGET, mode, str(plo), str(phi), str(clo), str(chi)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    reap.append(proc.pid)
    assert proc.stdout is not None
    word, child = proc.stdout.readline().split()
    assert word == b"ready"
    reap.append(int(child))
    return proc, int(child)


def _stored(layer: Path, base: int) -> int:
    """Pages of the object this layer itself stores (not its parents)."""
    data = np.asarray(Layer.open(str(layer)).meta.pages.data, dtype=np.uint64)  # small: array('Q')
    return int(np.count_nonzero((data >= base) & (data < base + N)))


def _object_base(layer: Path) -> int:
    """Where the object starts in the processes (the root's mapping at offset 0, or the child's)."""
    for v in Layer.open(str(layer)).meta.vmas:
        if v.perms[3] == "s" and v.path.startswith("/dev/zero") and v.end - v.start <= N:
            return v.start - v.offset
    raise AssertionError("no shared anonymous mapping")


@pytest.mark.parametrize("mode", list(MODES))
def test_partly_mapped_shared_memory_is_stored_once(mode: str, tmp_path: Path, subreaper: list[int]) -> None:
    proc, child = _start(mode, subreaper)
    assert proc.stdout is not None
    d = tmp_path / "d"
    (plo, phi), (clo, chi) = MODES[mode]
    extra: tuple[str, ...] = ()
    if mode == "stale":
        first = _dump(proc.pid, d)
        assert first["restorable"], first["not_restorable"]
        base = _object_base(Path(str(first["layer"])))
        member = Path(str(first["tree"][0]["layer"]))  # type: ignore[index]
        assert _stored(member, base) == PAGES // 2  # the child stored what the parent did not map
        os.kill(proc.pid, signal.SIGUSR2)
        assert proc.stdout.readline() == b"done\n"
        extra = ("--incremental",)
    out = _dump(proc.pid, d, "--kill", *extra)
    assert out["restorable"], out["not_restorable"]
    proc.wait(30)
    _reap(subreaper)
    root = Path(str(out["layer"]))
    [m] = out["tree"]  # type: ignore[misc]
    member = Path(str(m["layer"]))
    base = _object_base(root if mode != "stale" else member)
    # Each page once: the parent's readable part in its layer, the rest of the child's in the child's.
    mine, theirs = _stored(root, base), _stored(member, base)
    assert mine == ((phi - plo) // 4096 if mode != "stale" else (phi - plo) // 4096 - 1)  # (-1: zeros)
    # (In `stale`, the child's first quarter is unchanged since its first layer: nothing new.)
    assert theirs == (((chi - clo) - max(0, min(phi, chi) - max(plo, clo))) // 4096 if mode != "stale" else 0)
    tree = Layer.open(str(root)).tree
    assert tree is not None
    pieces = sorted(
        (s - base, e - base) for p, s, e, h in tree.shared_maps if p == child and base <= s < base + N
    )
    assert all(h == proc.pid for p, s, _, h in tree.shared_maps if p == child and base <= s < base + N)
    assert pieces == ([(max(plo, clo), min(phi, chi))] if min(phi, chi) > max(plo, clo) else []), pieces
    # The restore: one object again, each process's bytes as they were.
    r, info = _restore_detached(root)
    assert r.wait(60) == 0
    pids = {x["dumped_pid"]: x["pid"] for x in info["tree"]}  # type: ignore[attr-defined]
    assert pids == {proc.pid: proc.pid, child: child}
    subreaper.extend([proc.pid, child])
    os.kill(proc.pid, signal.SIGUSR1)
    assert r.stdout is not None
    assert r.stdout.readline() == b"ok\n"
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
