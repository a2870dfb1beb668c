"""What a dump makes before its freeze so that the freeze does not (dump._warm_questions): the
questions only the process can answer (props.ask's list) and the code that asks them
(batch.assemble_sp). In a new `ckpt dump` both were made inside the freeze, ~0.3 ms at 8 threads.
Counted, not timed: inside the freeze of an idle multi-threaded process (python3), neither is made
again; with the warm-up left out, both are (the control). The layer is right either way.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckpt.dump as dump_mod
from ckpt import api
from ckpt.image import open_layer
from ckpt.proc import props
from ckpt.ptrace import Frozen
from ckpt.ptrace import batch as bt
from tests.util import LineChannel

PROGRAM = r"""
import sys, threading
n = int(sys.argv[1])
ready = threading.Barrier(n + 1)
go = threading.Event()
def work():
    ready.wait()
    go.wait()
for _ in range(n):
    threading.Thread(target=work, daemon=True).start()
ready.wait()
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def target() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen([sys.executable, "-c", PROGRAM, "4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert LineChannel(p, 30).readline() == "ready"
        yield p
    finally:
        p.kill()
        p.wait()


def _count_in_freeze(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the questions and the code are made between a freeze's seize and its thaw."""
    made = {"questions": 0, "code": 0}
    inside = [False]
    real_freeze, real_thaw = Frozen.freeze, dump_mod.thaw_all
    real_q, real_a = props._questions, bt._assemble_sp

    def freeze(self: Frozen) -> None:
        inside[0] = True
        real_freeze(self)

    def thaw_all(*a: Any, **k: Any) -> None:
        inside[0] = False
        real_thaw(*a, **k)

    def questions(*a: Any, **k: Any) -> Any:
        made["questions"] += inside[0]
        return real_q(*a, **k)

    def assemble(*a: Any, **k: Any) -> Any:
        made["code"] += inside[0]
        return real_a(*a, **k)

    monkeypatch.setattr(Frozen, "freeze", freeze)
    monkeypatch.setattr(dump_mod, "thaw_all", thaw_all)
    monkeypatch.setattr(props, "_questions", questions)
    monkeypatch.setattr(bt, "_assemble_sp", assemble)
    return made


def _cold(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a new ckpt process: nothing cached."""
    monkeypatch.setattr(props, "_asked", None)
    monkeypatch.setattr(bt, "_sp_made", [])


@pytest.mark.parametrize("warm", [True, False])
def test_the_freeze_finds_its_questions_and_code_made(
    target: subprocess.Popen[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warm: bool
) -> None:
    d = tmp_path / "d"
    api.dump(target.pid, d)
    _cold(monkeypatch)
    if not warm:
        monkeypatch.setattr(dump_mod, "_warm_questions", lambda *a: None)
    made = _count_in_freeze(monkeypatch)
    r = api.dump(target.pid, d, incremental=True)
    if warm:
        assert made == {"questions": 0, "code": 0}
    else:
        assert made["questions"] == 1 and made["code"] == 2  # the main thread's run, the others' one
    meta = open_layer(r.layer).layers[0].meta
    assert len(meta.threads) == 5 and r.restorable
    assert target.poll() is None
