"""Build the example workloads of examples/ (dirtier, gameserver, cache) for the precopy tests."""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.util import BIN, ROOT, Target

EXAMPLES = ROOT / "examples"


def build_example(name: str) -> Path:
    src = EXAMPLES / f"{name}.c"
    out = BIN / f"example-{name}-{hashlib.sha256(src.read_bytes()).hexdigest()[:12]}"
    if out.exists():
        return out
    BIN.mkdir(exist_ok=True)
    with open(BIN / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(src), "-lm"], check=True)
            tmp.rename(out)
    return out


def dirtier(*args: str, **popen: object) -> Target:
    """examples/dirtier with its readiness line read; its base address and page count parsed."""
    t = Target([str(build_example("dirtier")), *args], **popen)
    words = dict(w.split("=", 1) for w in t.ready.split()[1:])
    t.base = int(words["base"], 16)  # type: ignore[attr-defined]
    t.npages = int(words["pages"])  # type: ignore[attr-defined]
    return t


def step(t: Target, n: int) -> list[int]:
    """Make a step-mode dirtier write n pages; the page addresses it wrote, in order."""
    words = t.cmd(f"step {n}").split()
    assert words[0] == "wrote", words
    return [t.base + int(i) * 4096 for i in words[1:]]  # type: ignore[attr-defined]


def uffds(pid: int) -> int:
    import contextlib
    import os

    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    return n


__all__: Sequence[str] = ["build_example", "dirtier", "step", "uffds"]
