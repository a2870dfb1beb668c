"""A dump refuses, before touching it, a process whose memory another process shares without being
one of its threads, when that process would not be frozen with it (ckpt/proc/mmshare.py): its
parent (clone(CLONE_VM[|CLONE_SIGHAND]) from it), or a child with --no-tree. Frozen alone, the
other one would run on in the same memory and handler table (an injected step's forced SIGTRAP
could reset a SIGTRAP it made ignored meanwhile), and a restore would give it its own."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.util import Target, run_ckpt

Spawn = Callable[..., Target]


def _start(spawn: Spawn, spec: str) -> tuple[int, int]:
    t = spawn("sharers", spec)
    main, child = (int(w) for w in t.ready.split()[1:])
    return main, child


def _untouched(*pids: int) -> None:
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            st = dict(ln.split(":", 1) for ln in f)
        assert st["TracerPid"].strip() == "0"
        assert st["State"].split()[0] == "S"  # pause()


@pytest.mark.parametrize(("spec", "what"), [("0VH", "memory and signal handlers"), ("0V", "memory")])
def test_a_child_sharing_its_parent_memory_is_refused(
    spawn: Spawn, tmp_path: Path, spec: str, what: str
) -> None:
    main, child = _start(spawn, spec)
    p = run_ckpt("dump", "--pid", str(child), "-D", str(tmp_path / "d"))
    assert p.returncode != 0
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("ckpt: "), p.stderr
    assert f"process {child} shares its {what} with process {main} (its parent" in p.stderr
    assert not list(tmp_path.glob("d/layer-*"))
    _untouched(main, child)


def test_a_parent_dumped_without_its_sharing_child_is_refused(spawn: Spawn, tmp_path: Path) -> None:
    main, child = _start(spawn, "0VH")
    p = run_ckpt("dump", "--pid", str(main), "--no-tree", "-D", str(tmp_path / "d"))
    assert p.returncode != 0 and p.stderr.count("\n") == 1, p.stderr
    assert f"process {main} shares its memory and signal handlers with process {child} (its child" in p.stderr
    _untouched(main, child)
    # The tree names the pair too (proc/tree.shared_tables), as before.
    p = run_ckpt("dump", "--pid", str(main), "-D", str(tmp_path / "t"))
    assert p.returncode != 0 and "share one signal handlers (CLONE_SIGHAND)" in p.stderr, p.stderr
    _untouched(main, child)


def test_a_child_with_its_own_memory_is_dumped(spawn: Spawn, tmp_path: Path) -> None:
    _, child = _start(spawn, "0F")  # (shares only the fd table: not this refusal's)
    p = run_ckpt("dump", "--pid", str(child), "-D", str(tmp_path / "d"))
    assert "shares its memory" not in p.stderr, p.stderr
    assert os.path.exists(f"/proc/{child}")
