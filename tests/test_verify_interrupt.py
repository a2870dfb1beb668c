"""Ctrl-C in `ckpt verify` as each function called inside its pass over the chunks returns
(tests/sigint_at.py): the command ends at once, with one line and 130, whatever the decompressing
threads hold. Before, the pass ran on concurrent.futures, whose Condition (Python code) a
KeyboardInterrupt in the main thread could leave locked for the workers' next step."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ckpt.dump import dump
from ckpt.image import Layer
from ckpt.image.reader import PREFETCH
from tests.util import ROOT, Target


def test_ctrl_c_at_every_step_of_verify(spawn: Callable[..., Target], tmp_path: Path) -> None:
    t = spawn("memtarget", "3072")  # (12 MiB: 3 MiB of it random, 3 text-like)
    layer = Path(dump(t.pid, tmp_path / "d", track="none").layer)
    assert len(Layer.open(layer).pages.chunks) > PREFETCH  # (more than the pass decompresses ahead)
    log = tmp_path / "fired"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CKPT_TEST_SIGINT_IN="Layer.iter_chunks")
    env["CKPT_TEST_SIGINT_LOG"] = str(log)
    k = 1
    while True:
        env["CKPT_TEST_SIGINT_AT"] = str(k)
        p = subprocess.run([sys.executable, str(ROOT / "tests" / "sigint_at.py"), "verify", str(layer)],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)  # fmt: skip
        where = log.read_text().strip()
        assert (p.returncode, p.stderr) == (130, "ckpt: interrupted\n"), (where, p.stdout, p.stderr)
        if where.startswith("end "):
            break
        k += 1
    assert k > 3
    assert subprocess.run([sys.executable, "-m", "ckpt", "verify", str(layer)], capture_output=True,
                          env=env | {"CKPT_TEST_SIGINT_IN": ""}, cwd=ROOT).returncode == 0  # fmt: skip
