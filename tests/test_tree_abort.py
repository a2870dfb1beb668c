"""A tree restore that fails once it has made the tree's shared objects undoes them
(restore/treeobjects.py `TreeObjects.abort`, restore/tree.py): the SysV segment it created is
removed, the memfd and the deleted file it recreated are closed with ckpt's fds and the killed
helpers, the deleted file is under no name, and no restored process is left.

The tree: a python parent and its child sharing a memfd, a deleted file and a keyed SysV segment,
each mapped (or attached) in both. Dumped with --kill; the original segment is removed afterwards,
so the restore must create its own. The restore is the real one (restore_tree in a tracer thread,
as the API runs it) and fails at its last step, where a migration's commit goes (`before_run`): every
process built, every object made and filled.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt.image import open_layer
from ckpt.restore.resume import in_tracer_thread
from ckpt.restore.tree import restore_tree
from tests.test_restore import alive
from tests.test_restore_tree import _dump, _reap

_libc = ctypes.CDLL(None, use_errno=True)
KEY = 0x5CE2_0000  # with the tree's pid in the low half

TREE = """
import ctypes, mmap, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
where, key = sys.argv[1], int(sys.argv[2]) | os.getpid() & 0xFFFF
mfd = os.memfd_create("tree-abort", os.MFD_CLOEXEC)
os.ftruncate(mfd, 8192)
mem = mmap.mmap(mfd, 8192)
mem[:5] = b"memfd"
gfd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.unlink(where)
os.ftruncate(gfd, 8192)
ghost = mmap.mmap(gfd, 8192)
ghost[:5] = b"ghost"
shmid = libc.shmget(key, 3 * 4096, 0o1000 | 0o600)  # IPC_CREAT
addr = libc.shmat(shmid, None, 0)
if shmid < 0 or addr in (None, 2**64 - 1):
    sys.exit(f"shm: {ctypes.get_errno()}")
ctypes.memmove(addr, b"sysv", 4)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
c = os.fork()
if c == 0:
    signal.sigwait({signal.SIGUSR1})
    os._exit(0)
print("ready", c, shmid, key, flush=True)
signal.sigwait({signal.SIGUSR1})
"""


class Commit(Exception):
    """The failure the test brings about at the restore's last step."""


def _segments() -> dict[int, int]:
    """shmid -> key of this IPC namespace's SysV segments."""
    with open("/proc/sysvipc/shm") as f:
        next(f)
        return {int(w[1]): int(w[0]) & 0xFFFFFFFF for w in (ln.split() for ln in f)}


def _our_fds() -> dict[int, str]:
    """The test process's fds, but for the SIGCHLD signalfd a tracing thread keeps (ptrace/sigchld.py)."""
    out = {}
    for n in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(n)] = os.readlink(f"/proc/self/fd/{n}")
    return {n: w for n, w in out.items() if w != "anon_inode:[signalfd]"}


def test_failed_tree_restore_undoes_its_objects(tmp_path: Path, subreaper: list[int]) -> None:
    where = tmp_path / "ghost"
    proc = subprocess.Popen(
        [sys.executable, "-c", TREE, str(where), str(KEY)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    word, child, shmid, key = proc.stdout.readline().split()
    assert word == b"ready", proc.stderr.read() if proc.stderr else word
    subreaper.append(int(child))
    try:
        out = _dump(proc.pid, tmp_path / "d", "--kill")
        assert out["restorable"], out["not_restorable"]
        proc.wait(30)
        _reap(subreaper)
    finally:
        # The keyed segment outlives its killed processes: removed, so the restore makes its own.
        _libc.shmctl(int(shmid), 0, None)  # IPC_RMID
    assert int(key) not in _segments().values()
    built: list[int] = []

    def commit(root: int) -> None:
        built.append(root)
        made = [i for i, k in _segments().items() if k == int(key)]
        assert len(made) == 1, made  # made by the restore, attached by both processes
        raise Commit

    view = open_layer(Path(str(out["layer"])))
    try:
        gc.collect()  # an earlier test's leaked Popen must not close its pipes in the middle of the count
        fds = _our_fds()
        segments = _segments()  # (others' segments come and go: runs beside this one)
        with pytest.raises(Commit):
            in_tracer_thread(lambda: restore_tree(view, before_run=commit))
        assert built, "the restore failed before its last step"
        ours = [i for i, k in _segments().items() if k == int(key)]
        assert ours == [i for i, k in segments.items() if k == int(key)]  # the one it made is gone
        left = {n: w for n, w in _our_fds().items() if fds.get(n) != w}
        assert not left  # ckpt's fds of the memfd and the deleted file closed
    finally:
        view.close()
    assert not where.exists() and not list(tmp_path.glob("ghost*"))
    assert not alive(built[0]) and not alive(proc.pid) and not alive(int(child))
    proc.communicate(timeout=60)  # its pipes closed here, not by the garbage collector in a later test
    maps = [Path(f"/proc/{p}/maps") for p in os.listdir("/proc") if p.isdigit()]
    for m in maps:  # nothing anywhere maps the restore's objects
        with contextlib.suppress(OSError):
            text = m.read_text()
            assert "memfd:tree-abort" not in text and str(where) not in text, m
