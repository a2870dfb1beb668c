"""What a `ckpt` command imports (issue 9 part 3): a small process's dump or restore is mostly Python's
start and imports, so a heavy import creeping into the common path must fail here, not only show in a
benchmark. Each command runs as a user runs it (a separate interpreter), under `python -X importtime`,
which lists every module the command imported. No time is asserted (bench/bench_small.py measures).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.util import LineChannel, Target

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
CKPT = [sys.executable, "-X", "importtime", "-m", "ckpt"]
_IMPORT = re.compile(r"import time:\s+\d+ \|\s+\d+ \| *(\S+)$")

# Drawing, testing and the commands of other subjects: never needed to dump or restore a process.
NEVER = ("rich", "plotext", "matplotlib", "hypothesis", "pytest", "ckpt.migrate", "ckpt.teach.dirtyrate",
         "ckpt.teach.simulate", "ckpt.teach.plot", "ckpt.diff", "ckpt.diffview", "ckpt.show",
         # python-ptrace (ckpt.ptrace.binding has its call and struct); secrets (hashlib, random) for
         # the network lock's name, which only a process with TCP connections needs
         "ptrace", "secrets",
         # shutil (with bz2, lzma) only to find nft; argparse's sizes come from os (cli._help_width)
         "shutil", "bz2", "lzma",
         # pathlib's urllib.parse (ipaddress) and zstandard's platform (ckpt/lightstd.py)
         "urllib", "ipaddress", "platform")  # fmt: skip
# A dump checks that its layer could be restored (restore.plan), but builds no process; the tree
# dump only for a process with children. It starts no program (nft: only to lock TCP connections).
NOT_IN_DUMP = ("ckpt.restore.restorer", "ckpt.restore.memory", "ckpt.restore.run", "ckpt.restore.helper",
               "ckpt.restore.tree", "ckpt.dumptree", "subprocess")  # fmt: skip
# Not for a small process (these tests' 1 MiB): concurrent.futures (logging, traceback, tokenize: ~30 M
# instructions) only where a restore's fill has chunks to decompress in threads; the writer's pool is
# ckpt/threadpool.py; socket (selectors, its IntEnums: ~14 M) only for a process with sockets
# (ckpt/lightstd.py).
SMALL = ("concurrent", "logging", "traceback", "socket", "selectors")
# A restore reads layers and writes none.
NOT_IN_RESTORE = ("ckpt.dump", "ckpt.dumptree", "ckpt.image.writer", "ckpt.image.sink", "ckpt.track")


def _modules(stderr: str) -> set[str]:
    mods = {m.group(1) for ln in stderr.splitlines() if (m := _IMPORT.match(ln))}
    assert "ckpt.cli" in mods, "no -X importtime output"
    return mods


def imported(argv: list[str]) -> tuple[set[str], str]:
    """The modules `ckpt ARGV` imported, and its stdout."""
    p = subprocess.run(
        [*CKPT, *argv], capture_output=True, text=True, env=ENV, timeout=120, stdin=subprocess.DEVNULL
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return _modules(p.stderr), p.stdout


def below(mods: set[str], names: tuple[str, ...]) -> list[str]:
    """The modules of `mods` that are one of `names` or inside one of them."""
    return sorted(m for m in mods if any(m == n or m.startswith(n + ".") for n in names))


def test_dump_and_incremental_import_no_drawing_and_no_restorer(
    spawn: Callable[..., Target], tmp_path: Path
) -> None:
    t = spawn("rounds", "256")
    assert t.cmd("mix") == "ok"
    d = tmp_path / "chain"
    mods, out = imported(["dump", "--pid", str(t.pid), "-D", str(d)])
    assert "full dump" in out
    assert below(mods, NEVER + SMALL + NOT_IN_DUMP) == []
    t.cmd("round")
    mods, out = imported(["dump", "--pid", str(t.pid), "-D", str(d), "--incremental", "--final"])
    assert "incremental dump" in out
    assert below(mods, NEVER + SMALL + NOT_IN_DUMP) == []
    assert len(list(d.glob("layer-*.ckpt"))) == 2


@pytest.mark.parametrize("pages", ["256", "8192"], ids=["small", "numpy"])
def test_restore_imports_no_drawing_and_no_writer(
    spawn: Callable[..., Target], subreaper: list[int], tmp_path: Path, pages: str
) -> None:
    """A small restore (1 MiB), and one whose table takes numpy and whose fill decompresses its
    chunks in threads (32 MiB): neither imports concurrent.futures and its logging (ckpt's own pool,
    ckpt/threadpool.py), nor drawing, nor the writer."""
    t = spawn("rounds", pages, stderr=subprocess.DEVNULL)  # fds 0-2: pipes the restore gives its own
    assert t.cmd("mix") == "ok"
    want = t.cmd("sum")
    d = tmp_path / "d"
    argv = [
        sys.executable,
        "-m",
        "ckpt",
        "dump",
        "--pid",
        str(t.pid),
        "-D",
        str(d),
        "--track",
        "none",
        "--kill",
    ]
    subprocess.run(argv, check=True, capture_output=True, env=ENV, timeout=120)
    t.proc.wait()
    layer = str(next(d.glob("layer-*.ckpt")))
    # the restored process's fds 0-2 are the command's: it answers through them
    p = subprocess.Popen([*CKPT, "restore", layer, "--detach", "--json"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, bufsize=0)  # fmt: skip
    try:
        chan = LineChannel(
            p, 120, lambda: f": {p.stderr.read1().decode(errors='replace')}" if p.stderr else ""
        )
        subreaper.append(json.loads(chan.readline())["pid"])
        assert chan.cmd("sum") == want
        chan.send("exit 0")
        assert p.wait(60) == 0
        assert p.stderr is not None
        mods = _modules(p.stderr.read().decode(errors="replace"))
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    never = NEVER if pages == "256" else tuple(n for n in NEVER if n != "platform")  # (numpy's own)
    assert below(mods, never + SMALL + NOT_IN_RESTORE) == []
    assert ("numpy" in mods) == (pages != "256")  # (the path each size is meant to take)
