"""ckpt/recorddoc.py: records made without importing inspect (issue 9 part 3) have the docstrings
inspect would have given them, and a restore's start imports no inspect (nor its ast, dis, tokenize).
Each check runs in an interpreter of its own, as a command does: in pytest's, inspect is imported
long before ckpt, and the stand-in is (rightly) never used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.util import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT))

EVERY_RECORD = """
import importlib, json, pkgutil, sys
import ckpt
import ckpt.codecache  # first: ckpt's set-up imports dataclasses with the stand-in (`import ckpt` alone
import dataclasses  # imports nothing: ckpt/__init__.py)
from ckpt import recorddoc
assert "inspect" not in sys.modules, "ckpt's import loaded inspect"
for m in pkgutil.walk_packages(ckpt.__path__, "ckpt."):
    if m.name != "ckpt.__main__":
        try:
            importlib.import_module(m.name)
        except ImportError:  # an optional dependency (matplotlib) not installed
            pass
records = [c for mod in list(sys.modules.values()) if getattr(mod, "__name__", "").startswith("ckpt")
           for c in vars(mod).values()
           if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == mod.__name__]
docs = {f"{c.__module__}.{c.__qualname__}": c.__doc__ for c in records}
mine = {f"{c.__module__}.{c.__qualname__}": recorddoc.init_signature(c) for c in records}
import inspect
theirs = {f"{c.__module__}.{c.__qualname__}": str(inspect.signature(c)) for c in records}
made = {f"{c.__module__}.{c.__qualname__}": c.__name__ + str(inspect.signature(c)).replace(" -> None", "")
        for c in records}
print(json.dumps({"docs": docs, "mine": mine, "theirs": theirs, "made": made}))
"""

START = """
import sys
import ckpt.cli
ckpt.cli.build_parser().parse_args(["restore", "l"])
import ckpt.api, ckpt.restore.pipes, ckpt.image, ckpt.restore.run, ckpt.restore.restorer
print(" ".join(m for m in ("inspect", "ast", "dis", "tokenize") if m in sys.modules))
import ckpt.dump, ckpt.proc.tree, ckpt.prefault  # (its thread pools' logging brings tokenize)
print(" ".join(m for m in ("inspect", "ast", "dis") if m in sys.modules))
"""


def _python(code: str) -> str:
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_every_record_has_inspects_signature() -> None:
    """For every record of every module of ckpt: the signature text written without inspect is
    inspect's own, and a record without a docstring got the one dataclasses makes with inspect."""
    got = json.loads(_python(EVERY_RECORD))
    assert len(got["mine"]) > 100
    written = {k: v for k, v in got["mine"].items() if v is not None}
    assert len(written) == len(got["mine"])  # ckpt's records are all plain: inspect never needed
    assert written == {k: got["theirs"][k] for k in written}
    generated = {k for k, d in got["docs"].items() if d == got["made"][k]}
    assert len(generated) > 30  # the records without a docstring of their own
    for k, doc in got["docs"].items():
        if doc.startswith(k.rsplit(".", 1)[1] + "("):
            assert doc == got["made"][k]


def test_commands_start_without_inspect() -> None:
    """A restore's modules, imported as the command does: no inspect, ast, dis, tokenize; a dump's
    then: no inspect, ast, dis."""
    assert _python(START).splitlines() == ["", ""]


def test_inspect_still_imports_for_others(tmp_path: Path) -> None:
    """After ckpt, `import inspect` is the real module (the stand-in left sys.modules), and a
    record of a program's own (no string annotations: inspect's text) gets inspect's docstring."""
    code = (
        "import ckpt, dataclasses, sys\n"
        "import inspect\n"
        "assert type(inspect).__name__ == 'module' and inspect.getsource is not None\n"
        "@dataclasses.dataclass\n"
        "class Own:\n"
        "    a: int\n"
        "    b: list = dataclasses.field(default_factory=list)\n"
        "print(Own.__doc__)\n"
    )
    assert _python(code).strip() == "Own(a: int, b: list = <factory>)"
