"""Bytecode for the methods that @dataclass writes, kept across runs.

@dataclass writes each record's __init__, __repr__, __eq__ (and a frozen one's __setattr__,
__delattr__, __hash__) as source text and compiles it with exec() every time the class is created,
that is at every import: about 2 M instructions per record, 4 M per frozen one, ~165 M over the
records a dump or a restore imports (a quarter of a small command's start, more than numpy's
import). The text depends only on the fields, so the compiled code can be kept as a .pyc keeps a
module's: this module gives dataclasses an exec() that looks the text up in a table of code objects
loaded from one file, compiles what is not there, and runs the same code either way (compile() of
the same text with the same flags by the same interpreter: an equal code object). The file lives
beside the package's bytecode, is named for the interpreter (cache tag) and starts with its bytecode
magic, so another Python ignores it; scripts/setup.sh writes it (`build()`), and a run that had to
compile adds what it compiled at its exit, unless bytecode is not to be written
(PYTHONDONTWRITEBYTECODE), as the import system does for .pyc files.
"""

from __future__ import annotations

from ckpt import recorddoc

recorddoc.import_dataclasses()  # first, without inspect (recorddoc.py)

import atexit  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import marshal  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from importlib.util import MAGIC_NUMBER  # noqa: E402
from types import CodeType  # noqa: E402
from typing import Any  # noqa: E402

_VERSION = b"ckpt-dc2"  # after the interpreter's magic; 1 held code compiled with this module's future flags
_MAX_ENTRIES = 1024  # a file grown past this by edits of the records is rewritten with this run's texts
# (ckpt has ~300 texts; every entry costs each start its share of marshal.loads)
_code: dict[str, CodeType] = {}
_used: dict[str, CodeType] = {}
_compiled = 0
_owner = 0
_builtin_exec = exec


def path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    tag = sys.implementation.cache_tag or "none"
    return os.path.join(here, "__pycache__", f"dataclass-code.{tag}.marshal")


def _load(p: str) -> dict[str, CodeType]:
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError:
        return {}
    head = MAGIC_NUMBER + _VERSION
    if not data.startswith(head):
        return {}
    try:
        table = marshal.loads(data[len(head) :])
    except (EOFError, ValueError, TypeError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, CodeType)}


def compile_as_exec(source: str) -> CodeType:
    """What exec(source) runs when dataclasses calls it: the file name "<string>", and the future
    flags of dataclasses.py (none), not this module's (its `annotations` would turn the methods'
    annotations into strings)."""
    return compile(source, "<string>", "exec", flags=0, dont_inherit=True)


def _exec(source: Any, globals: Any = None, locals: Any = None, /, **kw: Any) -> None:
    global _compiled
    # Only ckpt's own records: another library's or a test's classes would grow the file without end.
    if (
        isinstance(source, str)
        and isinstance(globals, dict)
        and (str(globals.get("__name__", "")) + ".").startswith("ckpt.")  # (not ckpt_foo's)
    ):
        code = _code.get(source)
        if code is None:
            code = _code[source] = compile_as_exec(source)
            _compiled += 1
        _used[source] = code
        source = code
    elif isinstance(source, str):
        # Compiled here too, not by exec: exec(text) would take this module's future flags, and
        # `annotations` made another module's records' __init__ annotations the strings '_type_x'.
        source = compile_as_exec(source)
    _builtin_exec(source, globals, locals, **kw)


def install() -> None:
    """Give dataclasses the cached exec (once per process; before any record is created)."""
    global _owner
    if getattr(dataclasses, "exec", None) is _exec:
        return
    _code.update(_load(path()))
    _owner = os.getpid()
    # a global of the module: dataclasses' exec() calls find it before the builtin
    dataclasses.exec = _exec  # type: ignore[attr-defined]
    atexit.register(_save_new)


def _save_new() -> None:
    if _compiled and os.getpid() == _owner and not sys.dont_write_bytecode:
        save(_code if len(_code) <= _MAX_ENTRIES else _used)


def save(table: dict[str, CodeType]) -> None:
    """Write `table` as the cache file, atomically; a directory we cannot write is left alone."""
    p = path()
    tmp = f"{p}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        # As importlib writes a .pyc: a new file (never through a link, never another's), then renamed.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC_NUMBER + _VERSION + marshal.dumps(dict(table)))
        os.replace(tmp, p)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def build() -> int:
    """Import every module of ckpt and write the code of all their records; the number of texts."""
    import importlib
    import pkgutil

    import ckpt

    install()
    _code.clear()  # this run's texts only: stale ones go
    for m in pkgutil.walk_packages(ckpt.__path__, "ckpt."):
        if m.name != "ckpt.__main__":
            try:
                importlib.import_module(m.name)
            except ImportError:  # an optional dependency (matplotlib) not installed
                pass
            except Exception as e:  # a cache is never worth a failed set-up
                print(f"codecache: {m.name} not imported: {e!r}", file=sys.stderr)
    save(_code)
    return len(_code)


# Imported (by ckpt/__init__.py's hook, before any other module of ckpt): in place at once.
install()
