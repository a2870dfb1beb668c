"""`ckpt migrate --on-commit/--on-abort`: the hooks get every connection in one environment string,
CKPT_TCP_CONNECTIONS (migrate/netmove.py), which an exec takes only up to 128 KiB. A process with
more connections than fit is refused before the first round, in one line, and runs on untouched;
not at the commit, inside the downtime, where the hook could not start. Real process, real
loopback connections (both ends in the process: each end is one of its connections)."""

from __future__ import annotations

import subprocess
import sys

from ckpt.migrate.netmove import MAX_ARG_STRLEN
from tests.test_migrate import ENV, ROOT, _ckpt

PAIRS = 2200  # loopback pairs: 4400 connections of ~32 bytes each in the string, beyond 128 KiB

# Opens PAIRS connections to its own listener (both ends kept), says "ready", then echoes lines
# until stdin ends.
_MANY = """
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
lst = socket.create_server(("127.0.0.1", 0))
keep = []
for _ in range(int(sys.argv[1])):
    c = socket.create_connection(lst.getsockname())
    keep += [c, lst.accept()[0]]
print("ready", flush=True)
for line in sys.stdin:
    print(line.strip(), flush=True)
"""


def test_too_many_connections_for_the_hooks_env_refused_first() -> None:
    assert PAIRS * 2 * len("127.0.0.1:40000>127.0.0.1:40000 ") > MAX_ARG_STRLEN
    t = subprocess.Popen(
        [sys.executable, "-c", _MANY, str(PAIRS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert t.stdin is not None and t.stdout is not None
        assert t.stdout.readline() == "ready\n"
        argv = _ckpt("migrate", "--pid", str(t.pid), "--to", "127.0.0.1:1", "--tcp-established",
                     "--on-commit", "true", "--on-abort", "true")  # fmt: skip
        m = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
        assert m.returncode != 0 and "Traceback" not in m.stderr, m.stderr
        lines = m.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ckpt: "), m.stderr
        assert f"{PAIRS * 2} TCP connections" in lines[0] and "CKPT_TCP_CONNECTIONS" in lines[0], lines[0]
        assert "runs on" in lines[0], lines[0]
        t.stdin.write("still here\n")
        t.stdin.flush()
        assert t.stdout.readline() == "still here\n"
    finally:
        t.kill()
        t.communicate()
