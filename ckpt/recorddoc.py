"""@dataclass without its import of `inspect`: ~35 M instructions (ast, dis, tokenize, linecache and
inspect itself), about a tenth of a small `ckpt restore`'s start, for one call.

dataclasses imports inspect for a single use: a record without a docstring gets one made of its
signature, `cls.__name__ + str(inspect.signature(cls))` ("SigactionRecord(sig: 'int', ...)"), and
~40 of the records a dump or a restore defines have none. So dataclasses is imported with a stand-in
in sys.modules["inspect"] (taken out again at once: any later `import inspect` gets the real one),
which stays its global `inspect`. Its signature() writes that text for the plain case, the __init__
dataclasses itself wrote (every parameter after self annotated with a string, as under `from
__future__ import annotations`; no `*args`), the way inspect formats it: `(name: 'ann' =
repr(default), *, kwonly: 'ann') -> None` (dataclasses takes the return annotation off again). Any
other case, and any other attribute, is the real inspect's, imported then. tests/test_recorddoc.py
checks the text equals inspect's for every record of ckpt. (importlib.util.LazyLoader cannot do
this: the import statement itself reads the module's __spec__, which loads it.) Nothing is done
when inspect or dataclasses was imported already (a program using the API, the tests).
"""

from __future__ import annotations

import importlib
import sys
from types import FunctionType, ModuleType
from typing import Any

_CO_VARARGS, _CO_VARKEYWORDS = 0x04, 0x08


class _Text:
    """What str() of an inspect.Signature gives, already written."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def init_signature(cls: type) -> str | None:
    """str(inspect.signature(cls)) for a record whose __init__ dataclasses wrote with string
    annotations; None for anything else."""
    init = cls.__dict__.get("__init__")
    if (
        type(cls) is not type
        or "__new__" in cls.__dict__
        or not isinstance(init, FunctionType)
        or init.__code__.co_filename != "<string>"  # dataclasses' exec: not a hand-written one
        or init.__code__.co_flags & (_CO_VARARGS | _CO_VARKEYWORDS)
        or hasattr(init, "__wrapped__")
        or hasattr(init, "__signature__")
        or getattr(cls, "__signature__", None) is not None
    ):
        return None
    code = init.__code__
    npos, nkw = code.co_argcount, code.co_kwonlyargcount
    names = code.co_varnames[: npos + nkw]
    ann = init.__annotations__
    defaults = init.__defaults__ or ()
    kwdefaults = init.__kwdefaults__ or {}
    if npos < 1 or any(not isinstance(ann.get(n), str) for n in names[1:]):
        return None
    parts = []
    first_default = npos - len(defaults)
    for i, n in enumerate(names[1:], 1):
        if i == npos:
            parts.append("*")
        p = f"{n}: {ann[n]!r}"
        if i < npos and i >= first_default:
            p += f" = {defaults[i - first_default]!r}"
        elif i >= npos and n in kwdefaults:
            p += f" = {kwdefaults[n]!r}"
        parts.append(p)
    ret = ann.get("return", _NONE)
    tail = "" if ret is _NONE else f" -> {_annotation(ret)}"
    return f"({', '.join(parts)}){tail}"


_NONE = object()


def _annotation(a: Any) -> str:
    """inspect.formatannotation for the return annotations dataclasses writes (None, or a string)."""
    if a is None:
        return "None"
    if isinstance(a, str):
        return repr(a)
    return str(_real().formatannotation(a))


def _real() -> ModuleType:
    """The real inspect (the stand-in out of sys.modules first, should it still be there)."""
    if isinstance(sys.modules.get("inspect"), _Inspect):
        del sys.modules["inspect"]
    return importlib.import_module("inspect")


class _Inspect(ModuleType):
    """dataclasses' `inspect`: signature() of a plain record without loading inspect."""

    def signature(self, obj: Any, *args: Any, **kw: Any) -> Any:
        text = init_signature(obj) if isinstance(obj, type) and not args and not kw else None
        if text is None:
            return _real().signature(obj, *args, **kw)
        return _Text(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(_real(), name)


def import_dataclasses() -> ModuleType:
    """dataclasses, with the stand-in as its inspect if neither module was imported before."""
    if "dataclasses" not in sys.modules and "inspect" not in sys.modules:
        sys.modules["inspect"] = _Inspect("inspect")
        try:
            import dataclasses
        finally:
            if isinstance(sys.modules.get("inspect"), _Inspect):
                del sys.modules["inspect"]
    import dataclasses

    return dataclasses
