"""The standing fuzz test of issue 13: mutations of real layers through every reading command.

A real python3 process is dumped twice (full, then incremental) into a chain; each case mutates
the top layer (bit flips, truncation, crafted metadata with checksums recomputed, parent
references and mapping paths naming a FIFO, a directory, a symlink loop, /dev/zero, /dev/urandom,
a 1 TiB sparse file, metadata bombs, chunk records pointing elsewhere) and runs verify, show,
show --json, read, diff, merge and restore's planning in a child process (tests/fuzzing.py).
Rules: exit code 0, 1 or 2; one line on stderr, never a traceback; no temp file left; the
child's peak RSS under fuzzing.RSS_LIMIT (512 MiB).

CKPT_FUZZ_SEED replays a run (the seed is printed); CKPT_FUZZ_CASES sets how many cases (default
30, about a minute here). Longer runs: bench/fuzz_layers.py --cases N --seed S.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzzing import odd_files, run_case
from tests.util import Target, run_ckpt

_TARGET = r"""
import sys
buf = bytearray(b"x" * (1 << 20))
print("ready", flush=True)
for line in sys.stdin:
    for i in range(0, len(buf), 8192):
        buf[i] = 0x79
    print("ok", flush=True)
"""


def make_chain(d: Path) -> Path:
    """A real chain of two layers of a python3 process; returns the top layer."""
    t = Target([sys.executable, "-c", _TARGET])
    try:
        run_ckpt("dump", "-t", str(t.pid), "-D", str(d), "--track", "hash", check=True)
        assert t.cmd("touch") == "ok"
        run_ckpt("dump", "-t", str(t.pid), "-D", str(d), "--incremental", check=True)
    finally:
        t.close()
    return d / "layer-0002.ckpt"


@pytest.fixture(scope="module")
def real_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("fuzzchain") / "chain"
    yield d, make_chain(d)


def test_fuzz_reading_commands(real_chain: tuple[Path, Path], tmp_path: Path) -> None:
    chain_dir, top = real_chain
    seed = int(os.environ.get("CKPT_FUZZ_SEED", random.randrange(1 << 32)))
    cases = int(os.environ.get("CKPT_FUZZ_CASES", "30"))
    print(f"fuzz seed {seed} ({cases} cases): replay with CKPT_FUZZ_SEED={seed}")
    rng = random.Random(seed)
    odd = odd_files(tmp_path / "odd")
    failures = []
    for i in range(cases):
        out = run_case(rng, chain_dir, top, tmp_path, odd)
        if out.problems:
            failures.append(f"case {i} ({out.case.kind}: {out.case.detail}): " + "; ".join(out.problems))
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)
