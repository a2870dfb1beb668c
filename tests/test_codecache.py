"""ckpt/codecache.py: the bytecode of the methods @dataclass writes, kept across runs (issue 9 part 3).

What must hold: a record's methods are the same code whether they come from the cache or are compiled
(so the cache can only change how long an import takes), a small dump's and restore's start compiles
none of them once the cache is built, and a file of another interpreter or a damaged one is ignored.
Each start runs in its own interpreter, as a user's command does.
"""

from __future__ import annotations

import dataclasses
import json
import marshal
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt import codecache

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
# what cli.cmd_dump and cli.cmd_restore import (bench/bench_small.py's START)
START = {
    "dump": "ckpt.cli ckpt.api ckpt.prefault ckpt.image ckpt.dump ckpt.proc.tree",
    "restore": "ckpt.cli ckpt.api ckpt.restore.pipes ckpt.image ckpt.restore.run ckpt.restore.restorer",
}
REPORT = """
import importlib, json, sys
from ckpt import codecache
for m in sys.argv[1].split():
    importlib.import_module(m)
print(json.dumps({"compiled": codecache._compiled, "used": len(codecache._used)}))
"""


def _python(*argv: str) -> str:
    p = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _exec_compiled(text: str) -> object:
    """The code exec(text) compiles when called from a module without future imports, as from
    dataclasses.py (this file has `annotations`, which exec and compile here would inherit)."""
    ns: dict[str, object] = {}
    exec(compile(f"code = compile({text!r}, '<string>', 'exec')", "<plain>", "exec", dont_inherit=True), ns)
    return ns["code"]


@pytest.fixture(scope="module")
def built() -> dict[str, object]:
    _python("-c", "from ckpt import codecache; codecache.build()")
    return codecache._load(codecache.path())


def test_installed_before_any_record() -> None:
    assert getattr(dataclasses, "exec", None) is codecache._exec


def test_every_cached_method_is_what_compile_makes(built: dict[str, object]) -> None:
    # every record of every module of ckpt: the cached code equals a fresh compile of its text
    assert len(built) > 200
    for text, code in built.items():
        assert code == codecache.compile_as_exec(text), text
        assert code == _exec_compiled(text), text


@pytest.mark.parametrize("what", sorted(START))
def test_a_start_compiles_no_record(built: dict[str, object], what: str) -> None:
    got = json.loads(_python("-c", REPORT, START[what]))
    assert got["used"] > 100  # the records a dump or a restore creates came through the cache...
    assert got["compiled"] == 0  # ...and none had to be compiled


def test_a_new_record_is_compiled_and_works() -> None:
    before = codecache._compiled

    @dataclasses.dataclass(frozen=True)
    class Unseen:
        __module__ = "ckpt.codecache"  # the cache keeps only ckpt's records (dataclasses reads the module)
        codecache_test_field_a: int
        codecache_test_field_b: tuple[int, ...] = dataclasses.field(default_factory=tuple)

    assert codecache._compiled > before
    u = Unseen(1)
    assert u == Unseen(1, ()) and u != Unseen(2) and hash(u) == hash(Unseen(1))
    # the methods' annotations are the fields' types (this file's are strings), not the names of
    # the locals the generated text refers to, as they would be if compiled with this file's flags
    assert Unseen.__init__.__annotations__ == {
        "codecache_test_field_a": "int",
        "codecache_test_field_b": "tuple[int, ...]",
        "return": None,
    }
    assert repr(u) == f"{Unseen.__qualname__}(codecache_test_field_a=1, codecache_test_field_b=())"
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.codecache_test_field_a = 2  # type: ignore[misc]


def test_a_file_of_another_python_or_damaged_is_ignored(tmp_path: Path) -> None:
    code = compile("x = 1", "<string>", "exec")
    good = tmp_path / "good"
    good.write_bytes(codecache.MAGIC_NUMBER + codecache._VERSION + marshal.dumps({"x = 1": code}))
    assert codecache._load(str(good)) == {"x = 1": code}
    other = tmp_path / "other"
    other.write_bytes(b"\0\0\r\n" + marshal.dumps({"x = 1": code}))
    cut = tmp_path / "cut"
    cut.write_bytes(good.read_bytes()[:-3])
    wrong = tmp_path / "wrong"
    wrong.write_bytes(
        codecache.MAGIC_NUMBER + codecache._VERSION + marshal.dumps({"x = 1": "not code", 3: code})
    )
    old = tmp_path / "old"
    old.write_bytes(codecache.MAGIC_NUMBER + b"ckpt-dc1" + marshal.dumps({"x = 1": code}))
    for p in (other, cut, wrong, old, tmp_path / "missing"):
        assert codecache._load(str(p)) == {}, p.name


def test_records_of_other_modules_are_not_kept() -> None:
    """Another library's or a test's records do not grow the file (each entry costs every start)."""
    before, entries = codecache._compiled, len(codecache._code)

    @dataclasses.dataclass
    class Elsewhere:
        codecache_elsewhere_field: int

    assert Elsewhere(3) == Elsewhere(3) and repr(Elsewhere(3)).endswith("(codecache_elsewhere_field=3)")
    assert codecache._compiled == before and len(codecache._code) == entries
