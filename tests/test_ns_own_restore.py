"""A root started by `unshare --uts --ipc --fork`: its namespaces are its own (neither ckpt's nor an
ancestor's), so a restore elsewhere would silently put it in ckpt's. Refused, naming each, unless
the restore runs in that very namespace (by id, ckpt/proc/nsid.py: an inode is reused by the next
namespace at once); run inside them, the restore gives them back by inheritance (issue 12 (A))."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt.image import Layer
from tests.util import ROOT, LineChannel

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
CODE = """
import os, socket, sys
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    if line.strip() == "host":
        print(socket.gethostname(), flush=True)
    elif line.strip() == "exit":
        break
"""
HOST = "ckpt-own-uts"
Original = tuple[subprocess.Popen[bytes], int]


@pytest.fixture
def original() -> Iterator[Original]:
    """`unshare --uts --ipc --fork` whose child (the target, its pid given) named its host HOST."""
    p = subprocess.Popen(
        ["unshare", "--uts", "--ipc", "--fork", "sh", "-c",
         f"hostname {HOST}; exec {sys.executable} -c '{CODE}'"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
    )  # fmt: skip
    try:
        word, pid = LineChannel(p, 30).readline().split()
        assert word == "ready"
        yield p, int(pid)
    finally:
        p.kill()  # (the target is its child: --fork kills it with it, PR_SET_PDEATHSIG)
        p.wait(30)
        for f in (p.stdin, p.stdout):
            if f:
                f.close()


def _restore(layer: Path, prefix: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "ckpt", "restore", str(layer)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT, bufsize=0,
    )  # fmt: skip


def _refused(r: subprocess.Popen[bytes]) -> str:
    out, err = r.communicate(timeout=300)
    text = err.decode()
    assert r.returncode == 1 and out == b"" and "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: "), text
    return lines[0]


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_own_namespaces_refused_unless_restored_inside(tmp_path: Path, original: Original) -> None:
    _, pid = original
    r = subprocess.run(
        [sys.executable, "-m", "ckpt", "dump", "--pid", str(pid), "-D", str(tmp_path / "d")],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    layer = Layer.open(str(sorted((tmp_path / "d").glob("layer-*.ckpt"))[-1]))
    props = layer.props
    assert props is not None
    assert sorted(k for k, _ in props.namespaces) == ["ipc", "uts"]
    assert sorted(k for k, _ in props.namespace_ids) == ["ipc", "uts"]
    path = Path(layer.path)
    layer.close()

    # Outside: both named.
    line = _refused(_restore(path, []))
    assert "a uts namespace of its own" in line and "a ipc namespace of its own" in line, line
    # Inside one of them only: the other named.
    line = _refused(_restore(path, ["nsenter", f"--uts=/proc/{pid}/ns/uts"]))
    assert "a uts namespace of its own" not in line and "a ipc namespace of its own" in line, line

    # Inside both (the original still runs: the copy gets another pid, noted): restored there.
    r2 = _restore(path, ["nsenter", f"--uts=/proc/{pid}/ns/uts", f"--ipc=/proc/{pid}/ns/ipc"])
    chan = LineChannel(r2, 60, lambda: f"\n{r2.stderr.read().decode() if r2.stderr else ''}")
    try:
        assert chan.cmd("host") == HOST
        copy = [int(k) for k in Path(f"/proc/{r2.pid}/task/{r2.pid}/children").read_text().split()]
        assert len(copy) == 1 and copy[0] != pid
        for kind in ("uts", "ipc"):
            assert _ns(copy[0], kind) == _ns(pid, kind)
        chan.send("exit")
        assert r2.wait(60) == 0
    finally:
        if r2.poll() is None:
            r2.kill()
            r2.wait(60)
        for f in (r2.stdin, r2.stdout, r2.stderr):
            if f:
                f.close()


def test_a_new_namespace_with_the_same_inode_is_not_it(tmp_path: Path, original: Original) -> None:
    """Once the namespaces are gone, a restore in new ones is refused, even when the kernel gave
    them the same inode numbers (it gives the lowest free: usually the same)."""
    p, pid = original
    r = subprocess.run(
        [sys.executable, "-m", "ckpt", "dump", "--pid", str(pid), "-D", str(tmp_path / "d"), "--json"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    path = sorted((tmp_path / "d").glob("layer-*.ckpt"))[-1]
    p.kill()
    p.wait(30)  # the target goes with it (unshare --fork's child): its namespaces end
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    line = _refused(_restore(path, ["unshare", "--uts", "--ipc"]))
    assert "a uts namespace of its own" in line and "a ipc namespace of its own" in line, line


def test_namespace_inodes_read_from_the_links_are_stats(original: Original) -> None:
    """props.ns_inodes reads each namespace's inode from its link's text ("uts:[N]"): the inode
    stat() gives, for a process in namespaces of its own and for ckpt's."""
    from ckpt.proc.props import NS_TYPES, ns_inodes

    _, pid = original
    for p in (pid, os.getpid()):
        kinds = [t for t in NS_TYPES if os.path.exists(f"/proc/{p}/ns/{t}")]
        want = {t: os.stat(f"/proc/{p}/ns/{t}").st_ino for t in kinds}
        assert ns_inodes(p) == want
    assert ns_inodes(pid)["uts"] != ns_inodes(os.getpid())["uts"]
