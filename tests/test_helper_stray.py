"""A ckpt killed before it seized its restore helper leaves no helper behind (restore/stub.S:
the helper asks for SIGKILL when its parent dies, until the seize's PTRACE_O_EXITKILL takes over).
Seen in CI: a `ckpt serve` SIGKILLed by a test right after clone3 left a helper paused forever."""

from __future__ import annotations

import os
import select
import subprocess
import sys

from tests.util import ROOT

CODE = """
import sys
from ckpt.restore.helper import _run_stub
print(_run_stub(0), flush=True)   # the helper runs, not yet seized: ckpt dies here
sys.stdin.read()
"""


def test_helper_dies_with_ckpt_before_the_seize() -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
    )
    assert p.stdout is not None
    helper = int(p.stdout.readline())
    assert helper > 0
    pidfd = os.pidfd_open(helper)
    try:
        with open(f"/proc/{helper}/status") as f:
            assert "TracerPid:\t0" in f.read()  # paused, untraced: what a killed ckpt left behind
        p.kill()
        p.wait(30)
        # Woken by the helper's exit (a pidfd is readable once the process has ended), bounded.
        ready, _, _ = select.select([pidfd], [], [], 30)
        assert ready, f"the restore helper {helper} outlived the ckpt that made it"
    finally:
        os.close(pidfd)
        if p.poll() is None:
            p.kill()
            p.wait()
    # It is a zombie of whoever reaps orphans here (init, or a subreaper): not running.
    try:
        with open(f"/proc/{helper}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        pass
