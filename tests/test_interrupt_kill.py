"""Ctrl-C at every step of `ckpt dump --kill` (tests/test_interrupt_points.py for the dumps that
leave the target running): before the point of no return the target runs on, untraced and as it
was, and no layer is left; from it on, the layer is complete and the target is gone. Never a mix:
a target killed without its layer, or a layer beside a target that runs on.

The point of no return is just after the layer's publication: the dump looks for a Ctrl-C once
the layer is out (and unlinks it if one came), then kills. One that comes after that look is taken
after the kill (KeyboardInterrupt, the CLI's exit status 130) with the layer whole and the target
gone (docs/internals.md, "Ctrl-C during a dump"). Every step the dump reports (progress, on_lap) is
before that look, so each must leave the target running. The SIGINT goes to the thread that
reaches the step, as a Ctrl-C the kernel hands to any thread of ckpt would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import dump
from ckpt.dumptree import dump_tree
from ckpt.image import find_layers
from tests.test_interrupt_points import _check_untouched, _layers
from tests.test_restore_tree import _reap, _start_tree
from tests.test_tree_interrupt import _check_untouched as _tree_untouched
from tests.test_tree_interrupt import _files
from tests.test_tree_interrupt import _interrupt_at as _tree_interrupt_at
from tests.test_tree_interrupt import _points as _tree_points
from tests.util import Target, run_ckpt

Spawn = Callable[..., Target]


def _interrupt_at(point: str) -> dict[str, Any]:
    """SIGINT to the thread that reaches `point` (pthread_kill): when that is not the main thread,
    the main thread, waiting in a join, runs no Python handler until the dump's thread has ended.
    The Ctrl-C must still be seen there (ptrace/signals.py held(): the wakeup fd), not after the kill."""
    kind, name = point.split(" ", 1)
    fired = [False]

    def fire() -> None:
        if not fired[0]:
            fired[0] = True
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    if kind == "progress":
        return {"progress": lambda p, done, total: fire() if p == name else None}
    return {"on_lap": lambda n: fire() if n == name else None}


def _points(spawn: Spawn, tmp: Path) -> list[str]:
    """Every progress phase and lap of a successful --kill dump."""
    seen: list[str] = []

    def phase(p: str, done: int, total: int) -> None:
        if f"progress {p}" not in seen:
            seen.append(f"progress {p}")

    def lap(name: str) -> None:
        if f"lap {name}" not in seen:
            seen.append(f"lap {name}")

    t = spawn("memtarget", "16")
    dump(t.pid, tmp / "reference", kill=True, progress=phase, on_lap=lap)
    assert t.proc.wait(30) == -signal.SIGKILL
    assert {"progress copy", "lap publish"} <= set(seen), seen
    return seen


def _gone(t: Target) -> bool:
    return t.proc.poll() is not None


def test_kill_interrupted_at_every_step(spawn: Spawn, tmp_path: Path) -> None:
    points = _points(spawn, tmp_path)
    outcomes: dict[str, str] = {}
    for i, point in enumerate(points):
        t = spawn("memtarget", "16")
        t.cmd("write 3 5")
        d = tmp_path / f"d{i}"
        before = t.sum()
        done: Any = None
        with pytest.raises(KeyboardInterrupt):
            done = dump(t.pid, d, kill=True, **_interrupt_at(point))
        assert done is None
        where = f"--kill: SIGINT at {point}"
        if _layers(d):
            # Past the point of no return: the layer whole, the target killed.
            assert t.proc.wait(30) == -signal.SIGKILL, where
            (layer,) = find_layers(d)
            v = run_ckpt("verify", str(layer))
            assert v.returncode == 0, (where, v.stdout, v.stderr)
            assert not [p for p in os.listdir(d) if ".tmp" in p], where
            outcomes[point] = "killed"
        else:
            assert not _gone(t), where
            _check_untouched(t, d, [], before, where)
            outcomes[point] = "runs"
        t.close()
    # Runs on up to the publication; killed from it on.
    # Every step a dump reports comes before its last look for a Ctrl-C (after the publication).
    assert set(outcomes.values()) == {"runs"}, outcomes


def _dead(p: int) -> bool:
    """Killed and reaped (ours: the subreaper's), or a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _end(proc: subprocess.Popen[bytes], pids: list[int], reap: list[int]) -> None:
    """Every process of the tree killed and reaped (its members are orphans of ours by then)."""
    for x in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(x, signal.SIGKILL)
    proc.communicate(timeout=60)
    _reap(reap)
    reap.clear()


def test_tree_kill_interrupted_at_every_step(tmp_path: Path, subreaper: list[int]) -> None:
    """The same for `dump --kill` of a tree: every member runs on and no member's layer is left,
    or every member's layer is out and the whole tree is killed."""
    proc, pids = _start_tree(subreaper)
    points = _tree_points(pids[0], {}, lambda d: None, tmp_path)  # (not killed: for the points)
    _end(proc, pids, subreaper)
    outcomes: dict[str, str] = {}
    for i, point in enumerate(points):
        proc, pids = _start_tree(subreaper)
        root, a, g, _z, p, s = pids  # Z: a zombie
        live = [root, a, g, p, s]
        d = tmp_path / f"d{i}"
        where = f"tree --kill: SIGINT at {point}"
        with pytest.raises(KeyboardInterrupt):
            dump_tree(root, d, kill=True, **_tree_interrupt_at(point, here=True))
        files = _files(d)
        if files:
            assert proc.wait(30) == -signal.SIGKILL, where
            assert all(_dead(x) for x in live), where
            assert len(files) == 5, (where, files)  # R A G P S
            v = run_ckpt("verify", str(files[0].parent if files[0].parent == d else d))
            assert v.returncode == 0, (where, v.stdout, v.stderr)
            outcomes[point] = "killed"
        else:
            _tree_untouched(live, d, [], {x: set() for x in live}, where)
            outcomes[point] = "runs"
        _end(proc, pids, subreaper)
    # The root's layer, published last, is followed by a last look for a Ctrl-C before the kill.
    assert set(outcomes.values()) == {"runs"}, outcomes


def test_held_sees_a_ctrl_c_given_to_another_thread() -> None:
    """The main thread waits in a join: the SIGINT that the kernel gave another thread has run no
    Python handler yet, and that thread must see it all the same (ptrace/signals.py: wakeup fd)."""
    from ckpt.ptrace.signals import deferred_signals, held

    seen: list[bool] = []
    r, w = os.pipe()

    def worker() -> None:
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        seen.append(held())
        os.write(w, b"x")

    try:
        with pytest.raises(KeyboardInterrupt), deferred_signals():
            th = threading.Thread(target=worker)
            th.start()
            os.read(r, 1)  # (a read, not the join: no Python code runs here until the worker is done)
            th.join()
    finally:
        os.close(r)
        os.close(w)
    assert seen == [True]  # (out of the block: the re-raised Ctrl-C would replace a failure inside)
