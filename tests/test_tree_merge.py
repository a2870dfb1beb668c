"""`ckpt merge` of a tree dump (issue 12 B3): each member's chain merged into a standalone layer
under tree/PID-STARTTIME/ beside the merged root layer, which holds the tree record naming them.
The merged tree restores as the chain did (tests/targets/tree.c checks itself)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ckpt.image import Layer
from tests.test_restore_tree import _check_restored_tree, _dump, _reap, _start_tree
from tests.util import run_ckpt


def test_merged_tree_restores(tmp_path: Path, subreaper: list[int]) -> None:
    """Full + incremental (--kill) tree dump, merged into another directory, the original chains
    removed: the merged tree (standalone layers only) restores, and every process checks itself."""
    proc, pids = _start_tree(subreaper)
    root = pids[0]
    d = tmp_path / "d"
    full = _dump(root, d)
    assert full["restorable"], full["not_restorable"]
    inc = _dump(root, d, "--incremental", "--kill")
    assert inc["incremental"] and inc["restorable"], inc["not_restorable"]
    proc.wait(30)
    _reap(subreaper)
    m = tmp_path / "m"
    m.mkdir()
    r = run_ckpt("merge", str(inc["layer"]), "-o", str(m), check=True)
    merged = Path(r.stdout.strip())
    assert merged.parent == m
    shutil.rmtree(d)
    top = Layer.open(str(merged))
    assert top.inventory.parent is None and top.tree is not None
    live = [p for p in top.tree.processes[1:] if not p.zombie]
    assert len(live) == 4  # A, G, P, S (Z is a zombie: no layer)
    for p in live:
        assert p.layer is not None and p.layer.startswith(f"tree/{p.pid}-")
        member = Layer.open(str(m / p.layer))
        assert member.inventory.parent is None and member.digest == p.digest
    v = run_ckpt("verify", str(merged), check=True)
    assert v.stdout.count(": ok") == 5, v.stdout
    _check_restored_tree(merged, pids, subreaper)


def test_failed_tree_merge_leaves_nothing(tmp_path: Path, subreaper: list[int]) -> None:
    """The root's merged layer is written last; when it cannot be (its name is taken), the members'
    merged layers already written are removed again, with the directories made for them."""
    proc, pids = _start_tree(subreaper)
    out = _dump(pids[0], tmp_path / "d", "--kill")
    proc.wait(30)
    _reap(subreaper)
    m = tmp_path / "m"
    m.mkdir()
    (m / "root.ckpt").write_bytes(b"taken")
    r = run_ckpt("merge", str(out["layer"]), "-o", str(m / "root.ckpt"))
    assert r.returncode == 1 and r.stderr.startswith("ckpt: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "root.ckpt" in r.stderr and "exists" in r.stderr, r.stderr
    assert sorted(x.name for x in m.iterdir()) == ["root.ckpt"]
    assert (m / "root.ckpt").read_bytes() == b"taken"
