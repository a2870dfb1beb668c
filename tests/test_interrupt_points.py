"""Ctrl-C at every step of a dump: whenever dump() raises KeyboardInterrupt, the target runs on
untraced, holds no injected userfaultfd, its memory is as it was, and no layer (nor temp file) is left.

The SIGINT is sent by the dumper to itself from the progress callback (each phase) and from the
on_lap hook (each step of phases_ms), in whatever thread the dump runs that step: the freezing
thread, a compression thread, or the main thread after the thaw. The steps are those a reference
dump of the same kind goes through, so a new step is covered without naming it here.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import dump, untrack
from ckpt.image import find_layers
from tests.test_idlepoll import held
from tests.util import Target

Spawn = Callable[..., Target]
UFFD = "anon_inode:[userfaultfd]"


def _fds(t: Target) -> list[str]:
    return [os.readlink(f"/proc/{t.pid}/fd/{n}") for n in os.listdir(f"/proc/{t.pid}/fd")]


def _layers(d: Path) -> list[Path]:
    return find_layers(d) if d.exists() else []


def _check_untouched(t: Target, d: Path, layers: list[Path], before: str, where: str) -> None:
    assert _layers(d) == layers, where
    assert not d.exists() or not [p for p in os.listdir(d) if ".tmp" in p], where
    assert t.state() in ("S", "R"), (where, t.state())
    for tid in os.listdir(f"/proc/{t.pid}/task"):
        with open(f"/proc/{t.pid}/task/{tid}/status") as f:
            assert "TracerPid:\t0\n" in f.read(), where
    assert UFFD not in _fds(t), where
    assert t.sum() == before, where
    assert held() == 0, where  # no CPU latency request of the freeze's left open (idlepoll.py)


def _points(options: dict[str, Any], prepare: Callable[[Path], None], t: Target, tmp: Path) -> list[str]:
    """Every progress phase and lap a successful dump of this kind goes through."""
    seen: list[str] = []

    def phase(p: str, done: int, total: int) -> None:
        if f"progress {p}" not in seen:
            seen.append(f"progress {p}")

    def lap(name: str) -> None:
        if f"lap {name}" not in seen:
            seen.append(f"lap {name}")

    d = tmp / "reference"
    prepare(d)
    dump(t.pid, d, progress=phase, on_lap=lap, **options)
    untrack(t.pid)  # its tracking is no interrupted dump's
    assert {"progress copy", "lap publish"} <= set(seen), seen
    return seen


def _interrupt_at(point: str) -> dict[str, Any]:
    kind, name = point.split(" ", 1)
    fired = [False]

    def fire() -> None:
        if not fired[0]:
            fired[0] = True
            os.kill(os.getpid(), signal.SIGINT)

    if kind == "progress":
        return {"progress": lambda p, done, total: fire() if p == name else None}
    return {"on_lap": lambda n: fire() if n == name else None}


def _nothing(d: Path) -> None:
    pass


KINDS: dict[str, tuple[dict[str, Any], Callable[[Target], Callable[[Path], None]]]] = {
    "full": ({}, lambda t: _nothing),
    "full-untracked": ({"track": "none"}, lambda t: _nothing),
    "incremental": (
        {"incremental": True},
        lambda t: lambda d: (dump(t.pid, d), t.cmd("write 1 7 20")),
    ),
    "pre-dump": ({"pre_dump": True}, lambda t: _nothing),
    "pre-dump-incremental": (
        {"pre_dump": True, "incremental": True},
        lambda t: lambda d: (dump(t.pid, d, pre_dump=True), t.cmd("write 2 9")),
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_interrupt_at_every_step(spawn: Spawn, tmp_path: Path, kind: str) -> None:
    options, make_prepare = KINDS[kind]
    t = spawn("memtarget", "64")
    prepare = make_prepare(t)
    points = _points(options, prepare, t, tmp_path)
    for i, point in enumerate(points):
        d = tmp_path / f"d{i}"
        untrack(t.pid)  # the last chain's: only this point's own is left to take out
        prepare(d)
        layers = _layers(d)
        before = t.sum()
        with pytest.raises(KeyboardInterrupt):
            dump(t.pid, d, **options, **_interrupt_at(point))
        _check_untouched(t, d, layers, before, f"{kind}: SIGINT at {point}")
    # The target is still dumpable afterwards: nothing of an interrupted dump is in its way.
    r = dump(t.pid, tmp_path / "after")
    assert r.pages_dumped > 0
