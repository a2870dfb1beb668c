"""Real names (issue 13 item 8): mapped files whose path is not UTF-8 or looks like rich markup, a
comm like `[bold]`, a dump directory named `L[/x]`. A real process maps them; dump, show, diff and
read go through the CLI as a user runs it, also with a strict UTF-8 stdout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.image import Layer
from tests.test_restore import Restored, dump, killed, restored, rounds  # noqa: F401 (restored: a fixture)
from tests.util import ROOT, Target

# File name (bytes, under the test's directory) -> the byte its 2 pages are filled with.
NAMES = {
    b"bad\xff\xfename.bin": 0x41,
    b"data[/x].bin": 0x42,  # a directory "data[" holding "x].bin"
    b"[bold]x[/bold]y.bin".replace(b"/", b"_"): 0x43,
    b"emoji :smile: \xc3.bin": 0x44,
}

_TARGET = r"""
import mmap, os, sys
d = os.fsencode(sys.argv[1])
maps = []
for arg in sys.argv[2:]:
    name, fill = os.fsencode(arg).rsplit(b"=", 1)
    path = os.path.join(d, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes([int(fill)]) * 8192)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 8192, prot=mmap.PROT_READ)
    m[0]  # fault a page in: present, file-backed, unmodified
    maps.append((path, m))
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "maps":
        print(open("/proc/self/maps", "rb").read().hex(), flush=True)
"""


def run(*args: str, encoding: str = "utf-8:strict") -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="400", PYTHONIOENCODING=encoding)
    return subprocess.run(
        [sys.executable, "-m", "ckpt", *args], capture_output=True, env=env, cwd=ROOT, timeout=300
    )


@pytest.fixture
def named(tmp_path: Path) -> Iterator[tuple[Target, Path]]:
    """A python3 whose comm is `[bold]py`, mapping every file of NAMES."""
    exe = tmp_path / "[bold]py"
    shutil.copy(sys.executable, exe)
    files = tmp_path / "files"
    files.mkdir()
    argv = [str(exe), "-c", _TARGET, str(files)]
    argv += [os.fsdecode(n + b"=" + str(fill).encode()) for n, fill in NAMES.items()]
    t = Target(argv)
    try:
        yield t, files
    finally:
        t.close()


def _mapping_of(t: Target, name: bytes) -> int:
    maps = bytes.fromhex(t.cmd("maps"))
    for ln in maps.splitlines():
        if ln.endswith(name):
            return int(ln.split(b"-")[0], 16)
    raise AssertionError(f"{name!r} not mapped")


def test_dump_show_diff_read_of_real_names(named: tuple[Target, Path], tmp_path: Path) -> None:
    t, files = named
    d = tmp_path / "L[" / "x]"  # shown as L[/x], a closing markup tag
    for _ in range(2):
        r = run("dump", "-t", str(t.pid), "-D", str(d), "--track", "hash")
        assert r.returncode == 0, r.stderr
    l1, l2 = d / "layer-0001.ckpt", d / "layer-0002.ckpt"

    with Layer.open(l2) as lay:
        paths = {os.fsencode(v.path) for v in lay.vmas}
        comm = lay.inventory.comm
    for name in NAMES:
        assert os.path.join(os.fsencode(files), name) in paths  # the exact bytes, round-tripped
    assert comm == "[bold]py"

    # `read` of each file-backed page the dump left in its file opens the right file by its exact name.
    for name, fill in NAMES.items():
        addr = _mapping_of(t, name)
        r = run("read", str(l2), "--addr", hex(addr), "--size", "4096", "--raw")
        assert r.returncode == 0, r.stderr
        assert r.stdout == bytes([fill]) * 4096

    for args in (["show", str(l2)], ["show", str(d)], ["diff", str(l1), str(l2), "--pages"]):
        for enc in ("utf-8:strict", "ascii:strict"):
            r = run(*args, encoding=enc)
            assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
            if args[0] == "show":
                out = r.stdout
                assert b"[bold]py" in out  # printed literally, not eaten as markup
                assert str(d).encode() in out
                if enc.startswith("utf-8"):
                    for name in NAMES:
                        assert name in out, name
                else:  # the non-ASCII bytes come out escaped, the rest literally
                    assert b"data[/x].bin" in out and b"[bold]x[_bold]y.bin" in out
                    assert b":smile:" in out
            else:
                assert str(d).encode() in r.stdout


def test_errors_naming_odd_paths_are_one_line(tmp_path: Path) -> None:
    d = tmp_path / "L[" / "x]\nsecond line \udcff"
    d.mkdir(parents=True)
    r = run("show", str(d))
    assert r.returncode == 1
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    assert b"L[/x]\\x0asecond line \xff" in r.stderr


def test_restore_maps_the_file_by_its_exact_name(
    tmp_path: Path, spawn: Callable[..., Target], restored: Callable[..., Restored]  # noqa: F811
) -> None:
    """A C target maps a file whose name is not UTF-8 (private, written): dump --kill, restore,
    and the restored process has the same file mapped (its exact bytes in /proc/PID/maps) and
    the same memory sum."""
    bad = os.fsencode(tmp_path) + b"/m\xff\xfe[x].bin"
    with open(bad, "wb") as f:
        f.write(bytes((i * 7) & 0xFF for i in range(16 * 4096)))
    t = rounds(spawn, "64", os.fsdecode(bad), str(tmp_path / "log"))
    t.cmd("round")
    before = t.sum()
    dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    r = restored(tmp_path / "d" / "layer-0001.ckpt")
    assert r.cmd("sum") == f"sum {before}"
    with open(f"/proc/{r.pid}/maps", "rb") as f:
        assert bad in f.read()
