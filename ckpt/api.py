"""The Python surface of ckpt. The CLI calls only these."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt.errors import CkptError, LayerError

# Each command imports only the modules it uses, when it runs: a `ckpt` command's wall time on a
# small process is mostly Python's start and its imports (numpy alone is ~0.1 s here).
if TYPE_CHECKING:
    from ckpt.check import CheckReport
    from ckpt.dump import DumpResult
    from ckpt.image import MergedView


def check() -> CheckReport:
    """Probe the kernel's features for real and say which tracker `auto` picks."""
    from ckpt.check import check as _check

    return _check()


def dump(pid: int, directory: str | Path, *, tree: bool | None = None, **options: Any) -> DumpResult:
    """Add one layer for process `pid` to `directory`. Options: incremental, track, parent,
    leave_stopped, kill, force, final, fallback_full, level, threads, max_buffer, progress, ghost_limit,
    precopy (an incremental's live pre-copy, ckpt/precopy.py: True, False, None for ckpt's choice).
    `tree`: dump `pid` with all its descendants (ckpt/dumptree.py); None (the default) does so when
    it has children, as CRIU does, unless this is a pre-dump."""
    from ckpt.dump import dump as _dump

    if tree is None:
        # proc.tree, not dumptree: a process without children (most) needs no tree dump code
        from ckpt.proc.tree import children

        if options.get("pre_dump"):
            from ckpt.dumptree import refuse_children

            refuse_children(
                pid, "a pre-dump of a process tree is not supported yet (--no-tree pre-dumps it alone)"
            )
        tree = not options.get("pre_dump") and bool(children(pid))
    if tree:
        from ckpt.dumptree import dump_tree

        return dump_tree(pid, directory, **options)
    return _dump(pid, directory, **options)


def _is_dir(p: Path) -> bool:
    """Whether `p` is a directory; a path that cannot be looked at is one sentence, not a traceback."""
    try:
        return stat.S_ISDIR(os.stat(p).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False  # what is missing is said by whoever opens it
    except OSError as e:
        raise LayerError(f"cannot look at {p}: {e.strerror}") from None
    except ValueError:
        raise LayerError(f"cannot look at {p!r}: the name contains a NUL character") from None


def untrack(pid: int, fds: list[int] | None = None) -> list[int]:
    """Remove ckpt's dirty tracking from process `pid`; the userfaultfds closed (see ckpt.dump)."""
    from ckpt.dump import untrack as _untrack

    return _untrack(pid, fds)


def open_layer(path: str | Path) -> MergedView:
    """The merged view of a layer and all its parents (the chain is checked when opened)."""
    from ckpt.image import Layer, MergedView, find_layers

    p = Path(path)
    if _is_dir(p):
        from ckpt.image import find_layers

        layers = find_layers(p)
        if not layers:
            raise LayerError(f"no layers in directory {p}")
        p = layers[-1]
    return MergedView(Layer.open(p))


def verify(path: str | Path) -> list[str]:
    """Check every checksum of a layer and of its parents; returns the layers checked, newest first."""
    view = open_layer(path)
    view.verify()
    done = [str(layer.path) for layer in view.layers]
    tree = view.top.tree
    if tree is not None:  # every member's chain too, and each is the layer the tree names
        from ckpt.restore.tree import open_members

        for mv in open_members(view, tree).values():
            try:
                mv.verify()
                done += [str(layer.path) for layer in mv.layers]
            finally:
                mv.close()
    return done


def merge(path: str | Path, out: str | Path) -> Path:
    """Write the merged view of a chain as one standalone layer."""
    from ckpt.image import merge as _merge

    view = open_layer(path)
    outp = Path(out)
    if _is_dir(outp):
        from ckpt.image import next_layer_name

        outp = outp / next_layer_name(outp)
    if view.top.tree is not None and len(view.top.tree.processes) > 1:
        from ckpt.mergetree import merge_tree  # each member's chain merged too, beside the root

        return merge_tree(view, outp)
    return _merge(view, outp)


def diff(a: str | Path, b: str | Path, **options: Any) -> Any:
    """Compare the merged views of two layers (see ckpt.diff)."""
    from ckpt.diff import diff as _diff

    return _diff(open_layer(a), open_layer(b), **options)


def restore(path: str | Path, **options: Any) -> Any:
    """Rebuild the process of a layer's merged view (see ckpt.restore)."""
    from ckpt.restore import restore as _restore

    return _restore(open_layer(path), **options)


__all__ = ["CkptError", "check", "diff", "dump", "merge", "open_layer", "restore", "untrack", "verify"]
