"""The big path's wall (issue 9 part 3, branch wall9): what a big dump does before its freeze so
that the freeze does not do it, run in a fresh Python as a user's `ckpt dump` is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.util import Target

ROOT = Path(__file__).resolve().parent.parent

# Which laps of the dump (phases_ms, in order) saw numpy imported.
_LAPS = (
    "import json, sys\n"
    "from ckpt.dump import dump\n"
    "seen = {}\n"
    "def lap(name):\n"
    "    seen.setdefault(name, 'numpy' in sys.modules)\n"
    "dump(int(sys.argv[1]), sys.argv[2], track='none', on_lap=lap)\n"
    "print(json.dumps(seen))\n"
)


def _laps(pid: int, d: Path, small_max: str | None) -> dict[str, bool]:
    env = {k: v for k, v in os.environ.items() if k != "CKPT_PAGESET_SMALL_MAX"}
    if small_max is not None:
        env["CKPT_PAGESET_SMALL_MAX"] = small_max
    p = subprocess.run(
        [sys.executable, "-c", _LAPS, str(pid), str(d)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    seen: dict[str, bool] = json.loads(p.stdout)
    return seen


def test_big_dump_imports_numpy_before_its_freeze(spawn: Callable[..., Target], tmp_path: Path) -> None:
    """A process above the small-set threshold: numpy (its page arrays) is imported by the time the
    freeze begins, not on first use inside it; below the threshold it is never imported."""
    t = spawn("rounds", "256", stderr=subprocess.DEVNULL)
    assert t.cmd("mix") == "ok"
    big = _laps(t.pid, tmp_path / "big", "64")  # the 1 MiB target is "big" with a threshold of 64
    assert big["frozen: seize"] is True
    assert big["buffer"] is True  # (imported with the estimate, before the copy buffer is taken)
    small = _laps(t.pid, tmp_path / "small", None)
    assert "frozen: seize" in small and not any(small.values())
