"""ckpt: checkpoint/restore of Linux processes, with incremental layers found by dirty-page tracking.

The Python surface is in ckpt.api; `import ckpt` gives the common entry points lazily, so that the
CLI's error paths stay fast and light.

`import ckpt` itself imports nothing (not even typing): the `ckpt` program (bin/ckpt: ckpt.client) must
know whether a `ckpt service` runs the command before it pays for anything else. What every other
module of ckpt needs first, dataclasses with the stand-in inspect (recorddoc.py) and the records'
cached bytecode (codecache.py), is set up by an import hook on the first import of any other module
of the package: before any of them creates a record, as when this file did it at once.
"""

import _thread
import sys

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing; mypy knows the name)
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_API = ("dump", "untrack", "open_layer", "check", "diff", "merge", "restore", "verify")
# Modules that need nothing set up: the `ckpt` program's entry and the restore stub's bytes it may
# use (ckpt/stubelf.py, a restore through `ckpt service`), and the two that do the setting up
# (codecache, imported, prepares itself; importing it here while its own import is being found
# would execute it twice).
_LIGHT = frozenset({"ckpt.client", "ckpt.stubelf", "ckpt.recorddoc", "ckpt.codecache", "ckpt.lightstd"})
_lock = _thread.RLock()
_state = 0  # 1: being set up (by the thread holding _lock), 2: done


def _prepare() -> None:
    """recorddoc and codecache, once per process, before the first record (thread-safe: a second
    thread's first import waits here until they are in place)."""
    global _state
    with _lock:  # (another thread's first import waits here; this one's own come back at once)
        if _state:
            return
        _state = 1
        # dataclasses with recorddoc's stand-in inspect, then the records' cached bytecode
        # installed into it: before any module of ckpt creates its records.
        from ckpt import codecache  # noqa: F401
        from ckpt.lightstd import prepare_pathlib

        prepare_pathlib()  # (before any module of ckpt imports pathlib: without urllib.parse)

        _state = 2
        if _Prepare in sys.meta_path:
            sys.meta_path.remove(_Prepare)


class _Prepare:
    """A meta path finder that finds nothing: it only runs _prepare() on the first import of a
    module of ckpt that needs it, then leaves sys.meta_path."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if _state != 2 and name.startswith("ckpt.") and name not in _LIGHT:
            _prepare()
        return None


sys.meta_path.insert(0, _Prepare)


def __getattr__(name: str) -> "Any":
    if name in _API:
        from ckpt import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["__version__", *_API]
