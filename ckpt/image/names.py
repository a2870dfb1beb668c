"""Layer files in a dump directory: naming, listing, and how a child refers to its parent."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from ckpt.errors import LayerError
from ckpt.image.format import ParentRef
from ckpt.image.reader import Layer

_LAYER_RE = re.compile(r"layer-(\d{4,})\.ckpt\Z")


def _number(p: Path) -> int | None:
    m = _LAYER_RE.match(p.name)
    return int(m.group(1)) if m else None


def _is_file(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return False  # gone, or a dangling or looping symlink: not a layer
        raise LayerError(f"cannot look at {p} in the dump directory: {e.strerror}") from None


def find_layers(directory: Path) -> list[Path]:
    """The layers in a dump directory, oldest first; [] if the directory does not exist yet."""
    d = Path(directory)
    try:
        entries = list(d.iterdir())
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise LayerError(f"{d} is not a dump directory") from None
    except PermissionError:
        raise LayerError(f"cannot list dump directory {d}: permission denied") from None
    except OSError as e:
        raise LayerError(f"cannot list dump directory {d}: {e.strerror}") from None
    numbered = [(n, p) for p in entries if (n := _number(p)) is not None and _is_file(p)]
    return [p for _, p in sorted(numbered)]


def next_layer_name(directory: Path) -> str:
    """The name the next layer in `directory` gets: one past the highest number present."""
    layers = find_layers(directory)
    last = _number(layers[-1]) if layers else 0
    return f"layer-{(last or 0) + 1:04d}.ckpt"


def parent_ref(parent: Layer, child_dir: Path) -> ParentRef:
    """How a child written into `child_dir` names `parent`: relative path (so a dump directory can
    be moved as a whole) and the parent's digest."""
    rel = os.path.relpath(Path(parent.path).absolute(), Path(child_dir).absolute())
    return ParentRef(path=rel, digest=parent.digest)
