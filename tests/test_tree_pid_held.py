"""A tree child whose pid cannot be kept is refused, naming the pid and who holds it (issue 12 (A)):
given another pid, its parent's waitpid() or kill() of the old one would be wrong. The root's own pid
may change, as one process's does; `--new-pids` accepts new pids for the children too
(tests/test_restore_tree.py::test_pids_in_use_are_mapped), `--pidns` keeps them all.

Real trees (tests/targets/tree.c); the test process is a subreaper, so whatever a failed restore
left would come to it: nothing may."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.test_restore_tree import ENV, _dump, _reap, _start_tree
from tests.util import ROOT, LineChannel, build_c


def _children() -> set[int]:
    out: set[int] = set()
    for t in os.listdir("/proc/self/task"):
        out |= {int(k) for k in Path(f"/proc/self/task/{t}/children").read_text().split()}
    return out


def _refused_restore(layer: Path) -> str:
    """`ckpt restore` that must refuse: its one line. Nothing of the restore is left running."""
    before = _children()
    r = subprocess.run(
        [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach"], capture_output=True,
        text=True, env=ENV, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: "), r.stderr
    assert _children() == before  # no helper, no half-restored process came to us
    return lines[0]


def test_restore_beside_the_running_original_is_refused(tmp_path: Path, subreaper: list[int]) -> None:
    proc, pids = _start_tree(subreaper)
    root, a, *_ = pids
    out = _dump(root, tmp_path / "d")
    line = _refused_restore(Path(str(out["layer"])))
    assert f"pid {a} (a child of pid {root}) cannot be kept: it is in use by process {a} (tree-" in line
    assert "--pidns" in line and "--new-pids" in line
    assert proc.poll() is None  # the original runs on


def test_a_pid_taken_after_the_dump_is_named(tmp_path: Path, subreaper: list[int]) -> None:
    proc, pids = _start_tree(subreaper)
    root, a, *_ = pids
    out = _dump(root, tmp_path / "d", "--kill")
    proc.wait(30)
    _reap(subreaper)  # the original's orphans, ours: their pids are free
    holder = subprocess.Popen(
        [str(build_c("holdpid")), str(a)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    try:
        got = LineChannel(holder, 30).readline().split()
        line = _refused_restore(Path(str(out["layer"])))
        # (pid_max is small and the machine shared: another process may have taken it first)
        who = "(holdpid-" if got[0] == "held" else "("
        assert f"pid {a} (a child of pid {root}) cannot be kept: it is in use by " in line, line
        assert f" {a} {who}" in line, line
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
