"""Two imports made lighter, as recorddoc.py makes dataclasses': a module imported by another for
one name is given, for the time of that import, by a stand-in that imports the real one when used.

- pathlib (Python 3.11) imports urllib.parse, and with it ipaddress, for quote_from_bytes, which
  only Path.as_uri() calls: ~10 M instructions of every `ckpt` command's start (prepare_pathlib,
  from ckpt/__init__.py's set-up, before any module of ckpt imports pathlib).
- zstandard imports platform (~8 M instructions: its import compiles ten regular expressions) to
  call platform.python_implementation() once, choosing its C or its cffi backend (`from
  ckpt.lightstd import zstandard` where ckpt imports it).
- socket (~14 M instructions: selectors, and four IntEnums made of _socket's constants) is imported
  by every dump and restore for the functions that handle a process's sockets, which a process
  without sockets never calls: the modules that have them bind `socket` to a proxy (`from
  ckpt.lightstd import socket`, as ckpt/lazynp.py does numpy) that imports it at its first
  attribute read, and take their module-level constants from _socket (the same ints).

Each stand-in is in sys.modules only while that one import runs, and stays only as the importer's
global; it answers its name as the real module would (python_implementation() from
sys.implementation, quote_from_bytes by the real function) and anything else by importing the real
module. A later `import urllib.parse` or `import platform` gets the real one. Nothing is done where
the importer or the module it wants was imported already (a program using the API, the tests).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

_IMPLEMENTATIONS = {"cpython": "CPython", "pypy": "PyPy", "ironpython": "IronPython", "jython": "Jython"}


class _StandIn(ModuleType):
    """A module with a few names of its own; any other is the real module's (imported then)."""

    def __getattr__(self, name: str) -> Any:
        # (while the stand-in is in sys.modules, importing "the real one" would give itself back)
        if name.startswith("__") or sys.modules.get(self.__name__) is self:
            raise AttributeError(name)
        return getattr(importlib.import_module(self.__name__), name)


def _import_with(importer: str, standin: _StandIn) -> ModuleType:
    """import `importer` with `standin` in sys.modules for its import only."""
    name = standin.__name__
    if importer in sys.modules or name in sys.modules:
        return importlib.import_module(importer)
    sys.modules[name] = standin
    try:
        return importlib.import_module(importer)
    finally:
        if sys.modules.get(name) is standin:
            del sys.modules[name]


def _python_implementation() -> str:
    impl = _IMPLEMENTATIONS.get(sys.implementation.name)
    if impl is None:
        return str(importlib.import_module("platform").python_implementation())
    return impl


def _quote_from_bytes(*args: Any, **kwargs: Any) -> str:
    from urllib.parse import quote_from_bytes

    return quote_from_bytes(*args, **kwargs)


def prepare_pathlib() -> None:
    """pathlib imported now, without urllib.parse."""
    standin = _StandIn("urllib.parse")
    standin.quote_from_bytes = _quote_from_bytes  # type: ignore[attr-defined]
    _import_with("pathlib", standin)


def _zstandard() -> ModuleType:
    standin = _StandIn("platform")
    standin.python_implementation = _python_implementation  # type: ignore[attr-defined]
    return _import_with("zstandard", standin)


class _Lazy:
    """A module imported at the first read of one of its attributes (kept here after that)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)  # next time found without __getattr__
        return value


if TYPE_CHECKING:  # (the modules themselves, as mypy knows them)
    import socket as socket

    import zstandard as zstandard
else:
    socket = _Lazy("socket")

    def __getattr__(name: str) -> Any:
        # `from ckpt.lightstd import zstandard`: imported at the first such import, not when
        # ckpt/__init__.py's set-up imports this module for pathlib.
        if name == "zstandard":
            return _zstandard()
        raise AttributeError(name)
