"""A new ckpt process's first freeze (each `ckpt dump` is one) does nothing there that a process
does once: no library loaded (quickstops.c was, at the seize: ~0.3-0.4 ms of its freeze), no
function of libc looked up, no module imported, no buffer of procgrab.c's made (a mapping and its
ctypes type: ~40 us each), not the grab's list of what to read (procgrab.prime: ~50 us). Run in a
fresh interpreter, full and incremental, small and big (the dirty and hole walks beside the
collect: dump.PAGETABLES_BACKGROUND)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.dump import PAGETABLES_BACKGROUND, dump
from tests.util import PAGE, Target

ROOT = Path(__file__).resolve().parent.parent

# One dump in this new interpreter; prints what happened between the seize and the thaw.
_CHILD = r"""
import json, sys
import ckpt.dump as D
from ckpt.proc import grab
from ckpt.ptrace import freeze as F
on = [False]
seen = []
def hook(event, args):
    if on[0] and event in ("ctypes.dlopen", "ctypes.dlsym", "import", "compile"):
        seen.append(f"{event} {str(args)[:120]}")
sys.addaudithook(hook)
real_freeze, real_new, real_paths = F.Frozen.freeze, grab._new_buffer, grab.paths
def freeze(self):
    on[0] = True
    return real_freeze(self)
def new_buffer(size):
    if on[0]:
        seen.append(f"buffer {size}")
    return real_new(size)
def paths(*a):
    if on[0]:
        seen.append("the grab's list made")
    return real_paths(*a)
F.Frozen.freeze = freeze
grab._new_buffer = new_buffer
grab.paths = paths
def lap(name):
    if name == "frozen: thaw":
        on[0] = False
pid, d, incremental = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
r = D.dump(pid, d, incremental=incremental, track="uffd-wp", on_lap=lap)
print(json.dumps({"seen": seen, "freeze_ms": r.freeze_ms}))
"""


def _dump_fresh(pid: int, d: Path, incremental: bool) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(pid), str(d), "1" if incremental else "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


@pytest.mark.parametrize("pages", [256, PAGETABLES_BACKGROUND * 4 // 3 // PAGE + 1024], ids=["small", "big"])
def test_a_new_processs_freeze_loads_and_makes_nothing(
    spawn: Callable[..., Target], tmp_path: Path, pages: int
) -> None:
    t = spawn("memtarget", str(pages))
    d = tmp_path / "d"
    for incremental in (False, True):
        if incremental:
            assert t.cmd("write 3") == "ok"
        got = _dump_fresh(t.pid, d, incremental)
        assert got["seen"] == [], got
    assert t.cmd("sum").startswith("sum")  # it runs on
    r = dump(t.pid, d, incremental=True, track="uffd-wp")  # (the chain the new processes made)
    assert r.pages_dirty >= 0
