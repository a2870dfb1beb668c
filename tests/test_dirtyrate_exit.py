"""`ckpt dirtyrate` of a target killed at any moment: the run ends "target exited" (or, when the
target died before the first freeze was done, one clear line), never an internal error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.examples_util import dirtier
from tests.util import ROOT, LineChannel

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="200")


def test_target_killed_at_every_moment() -> None:
    # Each run kills the target after a different number of its 5 ms intervals have been printed,
    # so that the kill lands inside a freeze, a scan or the close in some of them.
    for after in range(10):
        t = dirtier("-m", "4M")
        try:
            argv = [sys.executable, "-m", "ckpt", "dirtyrate", "--pid", str(t.pid), "--interval", "5",
                    "--duration", "30", "--json"]  # fmt: skip
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
            ch = LineChannel(p, 60)
            for _ in range(after):
                line = ch.readline()
                if not line or "event" not in json.loads(line):
                    break
            os.kill(t.pid, signal.SIGKILL)
            t.proc.wait(30)
            out, err = p.communicate(timeout=60)
            text = err.decode()
            assert "internal error" not in text and "Traceback" not in text, text
            if p.returncode == 0:
                last = json.loads((ch._buf.decode() + out.decode()).strip().splitlines()[-1])
                assert last["end"] == "target exited", last
            else:
                assert text.startswith("ckpt: ") and len(text.strip().splitlines()) == 1, text
        finally:
            t.close()
