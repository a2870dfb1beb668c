"""A tree's members as dumped, told to the migration's guard (ckpt/migrate/guard.py `members`) with
the start times the dump read in its freeze: nothing read in the downtime, and more than one
message's worth of members (each message below PIPE_BUF) applied as one set by the last.

A stand-in plays ckpt: it starts a real guard, tells it a first walk (an outsider among it), then
the members as dumped (three real processes at the first, a middle and the last place among 250,
the others a pid whose start time never matches: dropped by the guard's own check), then the
COMMIT as written, and is killed. The guard must kill exactly the three members; the outsider,
which left the tree since the first walk, runs on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tests.test_cgthrottle_guard import WAIT, _exited
from tests.test_migrate import ENV, ROOT

STANDIN = """
import json, sys
from ckpt.migrate.guard import Guard, start_time
real = json.loads(sys.argv[1])
g = Guard([])
g.add([real[3]])  # the first walk: the outsider, which leaves the tree before the dump
known = [(1, -1)] * 247  # (a start time that never matches: the guard's own check drops them)
for at, p in zip((0, 150, 249), real[:3]):
    known.insert(at, (p, start_time(p)))
assert len(known) == 250
g.members(known)
g.phase("committed")
print(g.proc.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_members_as_dumped_in_several_messages() -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"], stdin=subprocess.DEVNULL)
        for _ in range(4)
    ]
    s: subprocess.Popen[str] | None = None
    try:
        s = subprocess.Popen(
            [sys.executable, "-c", STANDIN, json.dumps([p.pid for p in procs])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
        )  # fmt: skip
        assert s.stdout is not None
        guard = int(s.stdout.readline())
        s.kill()
        assert s.wait(WAIT) == -signal.SIGKILL
        _exited(guard)
        for p in procs[:3]:
            assert p.wait(WAIT) == -signal.SIGKILL
        assert procs[3].poll() is None  # not a member as dumped: untouched
    finally:
        for p in [*procs, *([s] if s else [])]:
            if p.poll() is None:
                p.kill()
            p.wait()
