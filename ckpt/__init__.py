"""ckpt: checkpoint/restore of Linux processes, with incremental layers found by dirty-page tracking.

The Python surface is in ckpt.api; `import ckpt` gives the common entry points lazily, so that the
CLI's error paths stay fast and light.

`import ckpt` itself imports nothing (not even typing): the `ckpt` console script (ckpt.client) must
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
# Modules that create no record and import none: the console script's entry and what it needs.
_LIGHT = frozenset({"ckpt.client"})
_lock = _thread.RLock()
_prepared = False


def _prepare() -> None:
    """recorddoc and codecache, once per process, before the first record (thread-safe: a second
    thread's first import waits here until they are in place)."""
    global _prepared
    with _lock:
        if _prepared:
            return
        _prepared = True  # (their own imports come through the hook again)
        from ckpt import recorddoc

        recorddoc.import_dataclasses()  # first, without inspect (recorddoc.py)
        from ckpt import codecache

        codecache.install()  # before any module of ckpt creates its records
        if _Prepare in sys.meta_path:
            sys.meta_path.remove(_Prepare)


class _Prepare:
    """A meta path finder that finds nothing: it only runs _prepare() on the first import of a
    module of ckpt that needs it, then leaves sys.meta_path."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name.startswith("ckpt.") and name not in _LIGHT and not _prepared:
            _prepare()
        return None


sys.meta_path.insert(0, _Prepare)


def __getattr__(name: str) -> "Any":
    if name in _API:
        from ckpt import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["__version__", *_API]
