"""A SysV segment with id 0 (issue 12 B4): the first segment of a fresh IPC namespace, so the common
case in a container. maps shows a segment's id in its inode column, and 0 there had been taken for
anonymous memory: the segment was left out of the layer's objects and its restore refused. Now a
mapping is a segment by its path (ckpt/sysvmap.py).

Each test makes an IPC namespace of its own, kept by a waiting `sysvzero keeper` (`unshare --ipc`);
the target (tests/targets/sysvzero.c), ckpt dump and ckpt restore enter it with nsenter. The target
keeps private anonymous memory, the segment and shared anonymous memory side by side (the first
shows inode 0 too, the last the segment's device). After the restore the target checks itself, and
the keeper attaches the segment by its key: a write by either is seen by the other. At the end every
process of the namespace is killed, and the namespace goes with its segments.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt.image import Layer
from ckpt.proc.maps import read_maps
from tests.util import ROOT, LineChannel, Target, build_c

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
KEY = 0x5CE0F00D
PAGE = 4096
TIMEOUT = 60.0


class Namespace:
    """A fresh IPC namespace held by its keeper; `enter` is the nsenter prefix for it. The test
    process is a subreaper meanwhile (tests/conftest.py `subreaper`): the processes of the namespace
    that lose their parent, restored ones among them, are its to reap; `reap` lists them."""

    def __init__(self, reap: list[int]) -> None:
        self.reap = reap
        self.keeper = Target(["unshare", "--ipc", str(build_c("sysvzero")), "keeper"], TIMEOUT)
        self.ident = self._ns(self.keeper.pid)
        self.enter = ["nsenter", f"--ipc=/proc/{self.keeper.pid}/ns/ipc"]
        self.procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def _ns(pid: int) -> tuple[int, int] | None:
        try:
            st = os.stat(f"/proc/{pid}/ns/ipc")
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def members(self) -> list[int]:
        """Every process in this namespace (all the test's: the namespace is its own)."""
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and self._ns(int(p)) == self.ident]

    def end(self) -> None:
        """Kill every process in the namespace and wait until each has exited (its pidfd readable):
        with no process left, the namespace goes, and its segments with it."""
        for _ in range(10):  # (a process killed while it forks may leave a child to kill next)
            pids = self.members()
            if not pids:
                break
            for pid in pids:
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                try:
                    if self._ns(pid) == self.ident:  # (still that process: checked with the pidfd open)
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        assert select.select([fd], [], [], TIMEOUT)[0], f"pid {pid} did not end"
                        self.reap.append(pid)
                finally:
                    os.close(fd)
        for p in self.procs:  # (their pids may have been reaped already: Popen takes that as exited)
            p.wait(TIMEOUT)
            for f in (p.stdin, p.stdout, p.stderr):
                if f:
                    f.close()
        self.keeper.close()
        assert not self.members()


@pytest.fixture
def ipcns(subreaper: list[int]) -> Iterator[Namespace]:
    ns = Namespace(subreaper)
    try:
        yield ns
    finally:
        ns.end()


def _ckpt(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ns.enter, sys.executable, "-m", "ckpt", *args], capture_output=True, text=True,
        timeout=300, env=ENV, cwd=ROOT,
    )  # fmt: skip


def _dump(ns: Namespace, pid: int, d: Path, *extra: str) -> dict[str, Any]:
    r = _ckpt(ns, "dump", "--pid", str(pid), "-D", str(d), "--json", *extra)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _target(ns: Namespace) -> tuple[Target, int]:
    t = Target(
        [*ns.enter, str(build_c("sysvzero")), "target", f"{KEY:x}"], TIMEOUT, stderr=subprocess.DEVNULL
    )
    ns.procs.append(t.proc)
    _, shmid, addr = t.ready.split()
    assert int(shmid) == 0  # the namespace's first segment
    return t, int(addr, 16)


def _sysv_maps(pid: int) -> list[tuple[int, int, str, int, str]]:
    return [(v.start, v.end, v.dev, v.inode, v.path) for v in read_maps(pid) if v.path.startswith("/SYSV")]


def _around(pid: int, addr: int) -> list[tuple[int, int, int, str, bool]]:
    """The mappings of the target's pages from its private one: (start, end, inode, path, shared)."""
    return [
        (v.start, v.end, v.inode, v.path, v.shared)
        for v in read_maps(pid)
        if addr - PAGE <= v.start and v.end <= addr + 5 * PAGE
    ]


def _restore(ns: Namespace, layer: Path, tmp_path: Path) -> LineChannel:
    with open(tmp_path / "restore.err", "wb") as err:
        proc = subprocess.Popen(
            [*ns.enter, sys.executable, "-m", "ckpt", "restore", str(layer)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=err, env=ENV, cwd=ROOT, bufsize=0,
        )  # fmt: skip
    ns.procs.append(proc)
    return LineChannel(proc, TIMEOUT, lambda: f"; ckpt restore: {(tmp_path / 'restore.err').read_text()}")


def _shared_with_keeper(ns: Namespace, r: LineChannel) -> None:
    """The keeper attaches the segment by its key: the same one (id 0, the restored bytes), and a
    write by either is seen by the other."""
    k = ns.keeper
    assert k.cmd(f"attach {KEY:x}") == "attached 0"
    assert k.cmd("peek 0") == r.cmd("peek 0")
    assert k.cmd("poke 100 from-keeper") == "poked"
    assert r.cmd("peek 100") == "peek from-keeper"
    assert r.cmd("poke 200 from-the-restored") == "poked"
    assert k.cmd("peek 200") == "peek from-the-restored"


@pytest.mark.parametrize("chain", ["full", "incremental"])
def test_segment_with_id_0_is_restored_and_shared(chain: str, ipcns: Namespace, tmp_path: Path) -> None:
    t, addr = _target(ipcns)
    # maps: the segment with inode 0, between private anonymous memory (inode 0) and shared
    # anonymous memory on the segment's device
    around = _around(t.pid, addr)
    assert [(s - addr, e - addr, ino == 0, sh) for s, e, ino, _, sh in around] == [
        (-PAGE, 0, True, False), (0, 3 * PAGE, True, True), (3 * PAGE, 5 * PAGE, False, True)
    ]  # fmt: skip
    assert around[1][3] == f"/SYSV{KEY:08x} (deleted)" and around[2][3] == "/dev/zero (deleted)"
    (sysv,) = _sysv_maps(t.pid)
    assert sysv[2] == next(v.dev for v in read_maps(t.pid) if v.path == "/dev/zero (deleted)")
    d = tmp_path / "d"
    if chain == "incremental":
        _dump(ipcns, t.pid, d)
        assert t.cmd("check") == "ok"  # the dump left it as it was
        assert t.cmd("write") == "written"  # the incremental layer must carry the new bytes
    out = _dump(ipcns, t.pid, d, *(["--incremental"] if chain == "incremental" else []), "--kill")
    layer = Path(out["layer"])
    assert t.proc.wait(TIMEOUT) == -signal.SIGKILL
    with Layer.open(layer) as lay:
        (obj,) = lay.meta.objects
        assert (obj.kind, obj.ino, obj.key, obj.size, obj.stored) == ("sysv", 0, KEY, 3 * PAGE, True)
        (rec,) = [v for v in lay.meta.vmas if v.path.startswith("/SYSV")]
        assert rec.inode == 0 and rec.anonymous  # (its holes read as zeros, as for any id)
    # `ckpt read` of the chain: the segment's bytes, and zeros for its hole (page 1)
    gen = 1 if chain == "incremental" else 0
    got = _ckpt(ipcns, "read", "--raw", "--addr", hex(addr), "--size", str(3 * PAGE), str(layer))
    assert got.returncode == 0, got.stderr
    assert got.stdout.encode()[: 2 * PAGE] == f"sysv-page0-{gen}".encode().ljust(2 * PAGE, b"\0")
    assert got.stdout.encode()[2 * PAGE :].startswith(f"sysv-page2-{gen}\0".encode())
    r = _restore(ipcns, layer, tmp_path)
    assert r.cmd("check") == "ok"  # its bytes, id 0 by its key, the shared anonymous memory shared
    pid = int(r.cmd("pid").split()[1])
    ipcns.reap.append(pid)
    assert _sysv_maps(pid) == [sysv]  # the same segment (id 0) at the same place
    assert [(s, e, p, sh) for s, e, _, p, sh in _around(pid, addr)] == [
        (s, e, p, sh) for s, e, _, p, sh in around
    ]
    _shared_with_keeper(ipcns, r)
    assert r.cmd("check") == "ok"  # (those writes were outside the bytes it checks)


@pytest.mark.parametrize("chain", ["full", "incremental"])
def test_tree_sharing_a_segment_with_id_0(chain: str, ipcns: Namespace, tmp_path: Path) -> None:
    """tests/targets/tree_sysv.c in the namespace: its keyed segment A (id 0) attached by the parent
    and inherited by its child, which attaches it a second time; its removed segment B. Dumped as a
    tree: A stored once, in the parent's layer; restored, the two share both segments again."""
    proc = subprocess.Popen(
        [*ipcns.enter, str(build_c("tree_sysv")), "twice"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ipcns.procs.append(proc)
    assert proc.stdout is not None
    word, kid = proc.stdout.readline().split()
    assert word == b"ready", word
    child = int(kid)
    assert [w[4] for w in map(str.split, Path(f"/proc/{child}/maps").read_text().splitlines())
            if len(w) >= 6 and w[5].startswith("/SYSV5ce1")] == ["0", "0"]  # fmt: skip
    d = tmp_path / "d"
    if chain == "incremental":
        _dump(ipcns, proc.pid, d)
    out = _dump(ipcns, proc.pid, d, *(["--incremental"] if chain == "incremental" else []), "--kill")
    assert out["restorable"], out["not_restorable"]
    layer = Path(out["layer"])
    assert proc.wait(TIMEOUT) == -signal.SIGKILL
    os.waitpid(child, 0)  # (ours: the subreaper's) its pid is free again for the restore
    with Layer.open(layer) as lay:
        mine = {o.ino: o for o in lay.meta.objects if o.kind == "sysv"}
    assert 0 in mine and len(mine) == 2 and mine[0].stored and not mine[0].held_by
    (member,) = out["tree"]
    with Layer.open(member["layer"]) as lay:
        held = {o.ino: o for o in lay.meta.objects if o.kind == "sysv"}
    assert sorted(held) == sorted(mine) and held[0].held_by == proc.pid
    r = subprocess.Popen(
        [*ipcns.enter, sys.executable, "-m", "ckpt", "restore", str(layer), "--detach", "--json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    ipcns.procs.append(r)
    assert r.stdout is not None and r.stderr is not None
    first = r.stdout.readline()
    assert first, r.stderr.read().decode()
    pids = {m["dumped_pid"]: m["pid"] for m in json.loads(first)["tree"]}
    ipcns.reap.extend(pids.values())
    assert r.wait(TIMEOUT) == 0
    root = pids[proc.pid]
    os.kill(pids[child], signal.SIGUSR1)
    os.kill(root, signal.SIGUSR1)
    assert r.stdout.readline() == b"ok\n"  # the restored root's check, on the stdout it kept


def test_a_segment_id_equal_to_a_shmem_inode_is_another_object() -> None:
    """A segment's id is its inode column, on the device of memfds and shared anonymous memory: an
    id may equal one of their inodes (any id, 0 included for the records). Each mapping finds its
    own object record, and a tree dump keys their pages apart."""
    from types import SimpleNamespace

    from ckpt.image.format import VmaRecord
    from ckpt.image.objects import ObjectRecord
    from ckpt.proc.maps import Vma
    from ckpt.restore.planobjects import find
    from ckpt.restore.treeplan import object_users
    from ckpt.treeshare import TreeShare

    for n in (0, 32769):
        sysv = VmaRecord(0x10000, 0x13000, "rw-s", 0, "00:01", n, f"/SYSV{KEY:08x} (deleted)")
        memfd = VmaRecord(0x20000, 0x21000, "rw-s", 0, "00:01", n, "/memfd:m (deleted)")
        objs = [
            ObjectRecord("memfd", os.makedev(0, 1), n, "m", PAGE, 0o100600, 0, 0),
            ObjectRecord("sysv", os.makedev(0, 1), n, "", 3 * PAGE, 0o600, 0, 0, key=KEY),
        ]
        c = SimpleNamespace(objects=objs, vmas=[sysv, memfd], fds=[])
        assert find(c, sysv) == (1, objs[1]) and find(c, memfd) == (0, objs[0])
        assert sorted(object_users(c)) == [("memfd", 1, n), ("sysv", 1, n)]
        assert sysv.anonymous  # (its holes read as zeros: for n == 0 only, inode 0 had said it)
        sv, mf = (Vma(v.start, v.end, v.perms, v.offset, v.dev, v.inode, v.path) for v in (sysv, memfd))
        assert sv.is_sysv and sv.is_file and not mf.is_sysv
        share = TreeShare()
        assert share.skip_pages(1, [sv]) == []
        assert share.skip_pages(2, [mf]) == []  # its pages: not the segment's, which pid 1 stores
        assert share.skip_pages(3, [sv, mf]) == [(sv.start, sv.end), (mf.start, mf.end)]
        assert share.maps == [(3, sv.start, sv.end, 1), (3, mf.start, mf.end, 2)]
