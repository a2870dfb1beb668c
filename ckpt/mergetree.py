"""`ckpt merge` of a tree dump's root: every member's chain merged on its own, then the root's.

A tree dump keeps each member's chain under `tree/PID-STARTTIME/` beside the root's layers, and the
root's layer names each member's layer with its digest (ckpt/image/tree.py). The merged tree is laid
out the same way around the merged root layer: each member's merged view is written as a standalone
layer under `tree/PID-STARTTIME/` of the output's directory, then the root's merged view, holding
the tree record with the new members' paths and digests. The root is written last, so a merge that
fails leaves no root naming a missing member; the member layers it had written are removed again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from ckpt.dumptree import TREE_DIR
from ckpt.image import MergedView, next_layer_name
from ckpt.image.merge import merge, merge_layer
from ckpt.image.tree import TreeRecord
from ckpt.image.writer import ensure_dir
from ckpt.restore.tree import open_members


def merge_tree(view: MergedView, out: Path) -> Path:
    """Merge the tree whose root's chain is `view` into the standalone layer `out` (a file path),
    its members beside it; returns `out`."""
    tree = view.top.tree
    assert tree is not None
    base = out.parent
    members = open_members(view, tree)  # every member's chain checked against the tree record
    written: list[Path] = []
    made_dirs: list[Path] = []
    try:
        procs = []
        for p in tree.processes:
            mv = members.get(p.pid)
            if mv is None:  # the root (merged last) or a zombie (no layer)
                procs.append(p)
                continue
            d = base / TREE_DIR / f"{p.pid}-{p.start_time}"
            for x in (base / TREE_DIR, d):
                if not x.exists():
                    ensure_dir(x)
                    made_dirs.append(x)
            path, digest = merge_layer(mv, d / next_layer_name(d))
            written.append(path)
            procs.append(dataclasses.replace(p, layer=os.path.relpath(path, base), digest=digest))
        record = dataclasses.replace(tree, processes=procs)
        # Checked as a restore will read it (paths under tree/, digests, order).
        record = TreeRecord.from_dict(record.to_dict())
        return merge(view, out, tree=record)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        for x in reversed(made_dirs):
            with contextlib.suppress(OSError):
                x.rmdir()
        raise
    finally:
        for mv in members.values():
            mv.close()


__all__ = ["merge_tree"]
