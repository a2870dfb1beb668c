"""Ctrl-C at every step of a tree dump (tests/test_interrupt_points.py for one process): whenever
dump_tree() raises KeyboardInterrupt, every member runs on untraced and holds no userfaultfd
injected by it, and no layer of any member's chain (nor a temp file) is left, also when some members'
layers were already published. At the end the tree checks its own pids and memory (tree ok).

The SIGINT is sent from the progress callback and the on_lap hook, which every member's dump
calls: at the first member that reaches each step, and at each member's publish (so 0..4 layers
of the others are already out when it comes).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import untrack
from ckpt.dumptree import dump_tree
from ckpt.image import find_layers
from tests.test_restore_tree import _line_within, _reap, _start_tree

UFFD = "anon_inode:[userfaultfd]"


def _files(d: Path) -> list[Path]:
    """The layers of the root's chain and of every member's (DIR/tree/*/)."""
    dirs = [d, *(d / "tree").glob("*")] if d.exists() else []
    return sorted(x for c in dirs for x in find_layers(c))


def _uffds(p: int) -> set[str]:
    return {n for n in os.listdir(f"/proc/{p}/fd") if os.readlink(f"/proc/{p}/fd/{n}") == UFFD}


def _check_untouched(
    live: list[int], d: Path, files: list[Path], uffds: dict[int, set[str]], where: str
) -> None:
    assert _files(d) == files, where
    assert not [x for x in d.rglob("*") if ".tmp" in x.name], where
    for p in live:
        stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert stat in ("S", "R"), (where, p, stat)
        for tid in os.listdir(f"/proc/{p}/task"):
            assert "TracerPid:\t0\n" in Path(f"/proc/{p}/task/{tid}/status").read_text(), (where, p)
        # None injected by this dump; a member it never reached keeps its chain's own tracker.
        assert _uffds(p) <= uffds[p], (where, p)


def _points(root: int, options: dict[str, Any], prepare: Callable[[Path], None], tmp: Path) -> list[str]:
    """Every progress phase and lap of a successful tree dump of this kind, then each publish."""
    seen: list[str] = []
    publishes = [0]

    def phase(p: str, done: int, total: int) -> None:
        if f"progress {p} 1" not in seen:
            seen.append(f"progress {p} 1")

    def lap(name: str) -> None:
        if f"lap {name} 1" not in seen:
            seen.append(f"lap {name} 1")
        publishes[0] += name == "publish"

    d = tmp / "reference"
    prepare(d)
    dump_tree(root, d, progress=phase, on_lap=lap, **options)
    assert {"progress copy 1", "lap publish 1"} <= set(seen), seen
    assert publishes[0] == 5, publishes  # R A G P S (Z is a zombie)
    return seen + [f"lap publish {n}" for n in range(2, publishes[0] + 1)]


def _interrupt_at(point: str, here: bool = False) -> dict[str, Any]:
    """`here`: to the thread that reaches the point (pthread_kill), not to the process."""
    kind, rest = point.split(" ", 1)
    name, nth = rest.rsplit(" ", 1)
    count = [0]

    def hit(n: str) -> None:
        if n == name:
            count[0] += 1
            if count[0] == int(nth):
                if here:
                    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
                else:
                    os.kill(os.getpid(), signal.SIGINT)

    if kind == "progress":
        return {"progress": lambda p, done, total: hit(p)}
    return {"on_lap": hit}


def _nothing(d: Path) -> None:
    pass


KINDS: dict[str, tuple[dict[str, Any], Callable[[int], Callable[[Path], None]]]] = {
    "full": ({}, lambda root: _nothing),
    "incremental": ({"incremental": True}, lambda root: lambda d: (dump_tree(root, d), None)[1]),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_tree_interrupt_at_every_step(tmp_path: Path, subreaper: list[int], kind: str) -> None:
    options, make_prepare = KINDS[kind]
    proc, pids = _start_tree(subreaper)
    root, a, g, _z, p, s = pids  # Z: a zombie
    live = [root, a, g, p, s]
    prepare = make_prepare(root)
    points = _points(root, options, prepare, tmp_path)
    for i, point in enumerate(points):
        d = tmp_path / f"d{i}"
        for x in live:
            untrack(x)  # the last chain's: only this point's own is left to take out
        prepare(d)
        files = _files(d)
        uffds = {x: _uffds(x) for x in live}
        assert kind != "full" or not any(uffds.values())
        with pytest.raises(KeyboardInterrupt):
            dump_tree(root, d, **options, **_interrupt_at(point))
        _check_untouched(live, d, files, uffds, f"{kind}: SIGINT at {point}")
        assert d.exists() == (kind != "full"), point  # a new directory goes, member chains and all
    # Still dumpable, and every member's pids and memory are as they were.
    r = dump_tree(root, tmp_path / "after")
    assert len(r.tree) == 5
    for x in (g, a, p, s, root):
        os.kill(x, signal.SIGUSR1)
    assert proc.stdout is not None
    assert _line_within(proc.stdout, 120, "the tree's root") == "tree ok"
    assert proc.wait(60) == 0
    _reap(subreaper)
