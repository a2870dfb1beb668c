"""A tree dump closes every layer it reads back (ckpt/dumptree.py: each member's digest for the tree
record, each member's records for the refusals): none is left open for the garbage collector to
close, which a tree of many members would feel as one open file per member (and which an exception
traceback holding the frames would keep open).

Checked with the real dump of a real tree (after a first one): every Layer that dump_tree opens
is kept referenced by the test (so that no refcount drop closes it behind the code's back), and
must be closed when dump_tree returns; the process's fd table must be as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckpt.dumptree import dump_tree
from ckpt.image import Layer

CHILDREN = 3
TREE = f"""
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
kids = []
for _ in range({CHILDREN}):
    c = os.fork()
    if c == 0:
        signal.sigwait({{signal.SIGUSR1}})
        os._exit(0)
    kids.append(c)
print("ready", *kids, flush=True)
signal.sigwait({{signal.SIGUSR1}})
"""


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("incremental", [False, True])
def test_tree_dump_closes_the_layers_it_reads(
    incremental: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subreaper: list[int]
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    word, *kids = proc.stdout.readline().split()
    assert word == b"ready"
    subreaper.extend(int(k) for k in kids)
    # A first dump: the parent of the incremental one, or one into another directory (ckpt keeps
    # one signalfd for SIGCHLD per process from its first dump on: ptrace/sigchld.py).
    dump_tree(proc.pid, tmp_path if incremental else tmp_path / "first")
    if incremental:  # a chain of two under the measured one
        dump_tree(proc.pid, tmp_path, incremental=True)
    opened: list[Layer] = []
    real = Layer.open.__func__  # type: ignore[attr-defined]

    def keep(cls: Any, path: Any) -> Layer:
        lay: Layer = real(cls, path)
        opened.append(lay)
        return lay

    before = _fds()
    monkeypatch.setattr(Layer, "open", classmethod(keep))
    r = dump_tree(proc.pid, tmp_path, incremental=incremental)
    monkeypatch.undo()
    assert len(r.tree) == CHILDREN
    members = {str(m["layer"]) for m in r.tree}
    assert members <= {str(lay.path) for lay in opened}  # each member's layer was read back
    still = [str(lay.path) for lay in opened if lay._fd >= 0]
    assert not still, still
    assert _fds() == before, {f: os.readlink(f"/proc/self/fd/{f}") for f in _fds() - before}
    proc.stdout.close()
