"""A tree's chains with layers that are not tree dumps (issue 12 B3 follow-up): no lost writes.

The root's chain may hold layers dumped without a tree record (`--no-tree`, a pre-dump, a first dump
taken before the process had children). An incremental tree dump on such a chain must still store,
for every process of the tree, its memory at the freeze, page for page: checked against the frozen
processes (--leave-stopped) and again against the restored ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt.image import Layer, open_layer
from ckpt.track import available
from tests.util import PAGE, ROOT, assert_view_equals_memory, run_ckpt

pytestmark = pytest.mark.skipif(not available()["uffd-wp"][0], reason="uffd-wp unavailable on this kernel")

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
PAGES = 32

# The root and its child each own a private buffer; "w N" makes both write N into every other page
# (the child on SIGUSR1) and each says so once done. "fork" starts the child.
TARGET = f"""
import os, signal, sys
buf = bytearray({PAGES} * 4096)
for i in range(0, len(buf), 4096):
    buf[i] = 1
child = 0
def write(n, who):
    for i in range(0, len(buf), 8192):
        buf[i : i + 8] = n.to_bytes(8, "little")
    buf[4096 : 4096 + 2] = b"wx"
    os.write(1, f"{{who}} {{n}}\\n".encode())
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
import ctypes
addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
os.write(1, f"ready {{addr}}\\n".encode())
for line in sys.stdin:
    w = line.split()
    if w[0] == "fork":
        child = os.fork()
        if child == 0:  # sigwait, not a handler and pause(): a signal between the two is lost
            for rounds in range(1, 1 << 30):
                signal.sigwait({{signal.SIGUSR1}})
                write(1000 + rounds, "child")
        os.write(1, f"child {{child}}\\n".encode())
    elif w[0] == "w":
        write(int(w[1]), "root")
        if child:
            os.kill(child, signal.SIGUSR1)
os.write(1, b"idle\\n")
while True:
    signal.pause()
"""


class Tree:
    def __init__(self, reap: list[int]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TARGET],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        reap.append(self.proc.pid)
        self.reap = reap
        self.pid = self.proc.pid
        self.child = 0
        w = self._line().split()
        assert w[0] == "ready"
        self.buf = int(w[1])  # the same address in the child (a fork) and in the restored processes

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode().strip()

    def send(self, s: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(s.encode() + b"\n")
        self.proc.stdin.flush()

    def fork(self) -> int:
        self.send("fork")
        w = self._line().split()
        assert w[0] == "child"
        self.child = int(w[1])
        self.reap.append(self.child)
        return self.child

    def write(self, n: int) -> None:
        self.send(f"w {n}")
        lines = [self._line() for _ in range(2 if self.child else 1)]
        assert f"root {n}" in lines, lines
        assert not self.child or any(x.startswith("child ") for x in lines), lines


def _dump(pids: list[int], d: Path, *extra: str) -> dict[str, object]:
    """A dump that leaves every process stopped, checked against each one's memory, then let run on."""
    r = run_ckpt("dump", "--pid", str(pids[0]), "-D", str(d), "--json", "--leave-stopped", *extra, check=True)
    out: dict[str, object] = json.loads(r.stdout)
    try:
        _check(out, pids)
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
    out["stderr"] = r.stderr
    return out


def _layers(out: dict[str, object]) -> dict[int, str]:
    got = {int(out["pid"]): str(out["layer"])}  # type: ignore[call-overload]
    for m in out["tree"]:  # type: ignore[attr-defined]
        if m["layer"]:
            got[m["pid"]] = m["layer"]
    return got


def _check(out: dict[str, object], pids: list[int]) -> None:
    layers = _layers(out)
    assert sorted(layers) == sorted(pids), (layers, pids)
    for p, layer in layers.items():
        assert_view_equals_memory(p, layer)


def _restore_and_check(layer: str, pids: list[int], reap: list[int], buf: int) -> None:
    """The originals go; the top layer restores every process with the memory its layer holds."""
    layers = {pids[0]: layer}
    rec = Layer.open(layer).tree
    assert rec is not None
    for q in rec.processes[1:]:
        assert q.layer is not None
        layers[q.pid] = str(Path(layer).parent / q.layer)
    assert sorted(layers) == sorted(pids)
    for p in pids:
        os.kill(p, signal.SIGKILL)
    for p in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p, 0)
    r = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", layer, "--detach", "--json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert r.stdout is not None and r.stderr is not None
    text = r.stdout.readline().decode()
    assert text, r.stderr.read().decode()
    # The restored root, its stdin closed, says "idle" (maybe amid the restore's line) and pauses,
    # as its child does: neither writes again.
    while "idle" not in text or "}\n" not in text.replace("idle\n", ""):
        text += r.stdout.readline().decode()
    start = text.index("{")
    info, _ = json.JSONDecoder().raw_decode(text[start:].replace("idle\n", ""))
    got = {m["dumped_pid"]: m["pid"] for m in info["tree"]}
    reap.extend(got.values())
    assert r.wait(60) == 0
    # Restored, they ran a little (the root read its stdin): their buffers have not changed since.
    for p, lay in layers.items():
        have = open_layer(lay).read(buf, PAGES * PAGE)
        assert have == _read_mem(got[p], buf, PAGES * PAGE), p


def _read_mem(pid: int, addr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


def test_incremental_tree_on_a_no_tree_layer(tmp_path: Path, subreaper: list[int]) -> None:
    """`--no-tree` dumps the root alone; the incremental tree dump on it has every member right."""
    t = Tree(subreaper)
    c = t.fork()
    t.write(1)
    d = tmp_path / "d"
    first = _dump([t.pid], d, "--no-tree")
    assert first["tree"] == [] and Layer.open(str(first["layer"])).tree is None
    t.write(2)
    inc = _dump([t.pid, c], d, "--incremental")
    assert inc["incremental"] and inc["restorable"], inc
    t.write(3)
    top = _dump([t.pid, c], d, "--incremental")
    _restore_and_check(str(top["layer"]), [t.pid, c], subreaper, t.buf)


def test_incremental_tree_on_a_dump_before_the_fork(tmp_path: Path, subreaper: list[int]) -> None:
    """The first dump found no children; the process forks and both write before the next."""
    t = Tree(subreaper)
    t.write(1)
    d = tmp_path / "d"
    first = _dump([t.pid], d)
    assert first["tree"] == []
    c = t.fork()
    t.write(2)
    inc = _dump([t.pid, c], d, "--incremental")
    t.write(3)
    top = _dump([t.pid, c], d, "--incremental")
    assert inc["restorable"] and top["restorable"]
    _restore_and_check(str(top["layer"]), [t.pid, c], subreaper, t.buf)


def test_incremental_tree_on_a_pre_dump(tmp_path: Path, subreaper: list[int]) -> None:
    """A pre-dump (of the process before it had children), then the frozen incremental tree dump."""
    t = Tree(subreaper)
    t.write(1)
    d = tmp_path / "d"
    r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--pre-dump", "--json", check=True)
    assert json.loads(r.stdout)["tree"] == []
    c = t.fork()
    t.write(2)
    top = _dump([t.pid, c], d, "--incremental")
    _restore_and_check(str(top["layer"]), [t.pid, c], subreaper, t.buf)


def test_tree_then_no_tree_then_tree(tmp_path: Path, subreaper: list[int]) -> None:
    """Members' chains one layer behind the root's (a `--no-tree` dump in between): still right."""
    t = Tree(subreaper)
    c = t.fork()
    t.write(1)
    d = tmp_path / "d"
    _dump([t.pid, c], d)
    t.write(2)
    mid = _dump([t.pid], d, "--incremental", "--no-tree")
    assert mid["tree"] == []
    t.write(3)
    top = _dump([t.pid, c], d, "--incremental")
    t.write(4)
    top = _dump([t.pid, c], d, "--incremental")
    _restore_and_check(str(top["layer"]), [t.pid, c], subreaper, t.buf)


def _sh_with_child(reap: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        ["sh", "-c", 'sleep 1000 & echo "$!"; wait'],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    reap.append(proc.pid)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    reap.append(child)
    return proc, child


def _one_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    err = r.stderr.strip()
    assert r.returncode != 0 and err.startswith("ckpt: ") and "\n" not in err, (r.stdout, err)
    for w in words:
        assert w in err, err


def _untouched(pid: int) -> None:
    st = Path(f"/proc/{pid}/status").read_text()
    assert "TracerPid:\t0" in st and "State:\tS" in st, st
    assert not [
        f for f in os.listdir(f"/proc/{pid}/fd") if "userfaultfd" in os.readlink(f"/proc/{pid}/fd/{f}")
    ]


def test_pre_dump_of_a_tree_is_refused(tmp_path: Path, subreaper: list[int]) -> None:
    proc, child = _sh_with_child(subreaper)
    d = tmp_path / "d"
    r = run_ckpt("dump", "--pid", str(proc.pid), "-D", str(d), "--pre-dump")
    _one_line(r, f"pid {proc.pid} has children (pid {child})", "pre-dump of a process tree", "runs on")
    assert not list(d.glob("layer-*")) if d.exists() else True
    _untouched(proc.pid)
