"""tests/util.py subreaper_on/subreaper_restore: fixtures that make the runner a child subreaper
nest, and the inner one's end gives back the outer one's state instead of turning it off. Before,
test_pidns_start's `server` fixture (torn down first) turned it off, so the `echo` tree's child,
orphaned when `echo` killed its parent next, went to init and ran on after the run."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.util import subreaper_on, subreaper_restore

PR_GET_CHILD_SUBREAPER = 37

# Forks a child that waits on the pipe, says the child's pid, and exits: the child is orphaned.
ORPHAN = """
import os, sys
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    os.read(r, 1)
    os._exit(0)
print(pid, flush=True)
"""


def _state() -> int:
    v = ctypes.c_int(-1)
    ctypes.CDLL(None, use_errno=True).prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(v), 0, 0, 0)
    return v.value


def test_inner_end_keeps_the_outer_subreaper() -> None:
    start = _state()
    outer = subreaper_on()
    inner = subreaper_on()
    subreaper_restore(inner)  # (the inner fixture ends first)
    try:
        assert _state() == 1
        p = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True, timeout=60)
        orphan = int(p.stdout)
        try:
            ppid = int(Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert ppid == os.getpid()  # ours to kill and reap, not init's
        finally:
            os.kill(orphan, signal.SIGKILL)
            os.waitpid(orphan, 0)
    finally:
        subreaper_restore(outer)
    assert _state() == start
