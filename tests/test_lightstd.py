"""ckpt/lightstd.py: pathlib without urllib.parse, zstandard without platform, socket only at its
first use, in a fresh interpreter as a command starts; what the stand-ins answer equals the real
modules' answers, and a later import of urllib.parse or platform gets the real module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CODE = """
import json, sys
import ckpt.cli, ckpt.image.writer, ckpt.image.reader, ckpt.dump, ckpt.restore.run, ckpt.restore.tcp
import ckpt.proc.sockopts as so
out = {"early": sorted(m for m in ("urllib.parse", "ipaddress", "platform", "socket", "selectors")
                       if m in sys.modules)}
lazy = so.socket.socket  # the first use
import socket
out["socket"] = [lazy is socket.socket, so.TIME_OPTIONS["so_rcvtimeo_us"] == socket.SO_RCVTIMEO]
import pathlib, zstandard
out["backend"] = zstandard.backend
out["impl"] = zstandard.platform.python_implementation()
out["uri"] = pathlib.Path("/tmp/a b/\\u00e9").as_uri()
import platform, urllib.parse
out["real"] = [type(sys.modules[m]).__name__ == "module" and hasattr(sys.modules[m], "__file__")
               for m in ("platform", "urllib.parse")]
out["impl_real"] = platform.python_implementation()
out["uri_real"] = "file://" + urllib.parse.quote_from_bytes("/tmp/a b/\\u00e9".encode())
print(json.dumps(out))
"""


def test_fresh_start_imports_neither_and_answers_the_same() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=60,
                       cwd=ROOT)  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["early"] == []
    assert out["backend"] == "cext"
    assert out["impl"] == out["impl_real"] == "CPython"
    assert out["uri"] == out["uri_real"] == "file:///tmp/a%20b/%C3%A9"
    assert out["real"] == [True, True]
    assert out["socket"] == [True, True]
