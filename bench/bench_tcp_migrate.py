"""What an established TCP connection adds to a migration's downtime (`ckpt migrate --tcp-established`).

    python bench/bench_tcp_migrate.py [--rounds 5]

Each round migrates a tests/targets/tcpconn.c process on loopback (`ckpt serve` and `ckpt migrate
--policy rounds:2 --json`) four times: holding its connection to this script with 100 bytes queued
each way, with its queues full (60000 bytes unread in its receive queue, its send queue full: this
script does not read, megabytes), with 100 bytes and the network lock made by the `nft` command
(CKPT_NETLOCK_COMMAND=1) instead of libnftables, and once after it closed it (the same process, no
connection). Per case, medians of: the downtime (the final freeze until the copy runs), the final
freeze, the final dump's phase that reads the fds (the lock and the repair-mode read are in it), the
destination's final restore and its last step (where the connection is connected, taken out of
repair mode and the lock lifted), and the CPU seconds of the migrate command (user + system).
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.util import build_c  # noqa: E402

FIELDS = ("downtime", "final freeze", "  of it: fds + tcp", "restore (dst)", "  of it: finish", "cpu migrate")


def connected(exe: Path, fill: bool) -> tuple[subprocess.Popen[bytes], socket.socket, socket.socket]:
    """The target connected to this script: with `fill`, 60000 bytes unread in its receive queue
    and its send queue full (this script does not read: megabytes); else 100 bytes each way."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    p = subprocess.Popen([str(exe), "127.0.0.1", str(lst.getsockname()[1])], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert p.stdout is not None and p.stdin is not None
    p.stdout.readline()
    conn, _ = lst.accept()
    n = 60000 if fill else 100
    conn.sendall(bytes(n))
    for line in (f"waitin {n}", "send 8000000" if fill else "send 100"):
        p.stdin.write(line.encode() + b"\n")
        p.stdin.flush()
        p.stdout.readline()
    return p, lst, conn


def migrate_once(exe: Path, tmp: str, case: str, env: dict[str, str]) -> dict[str, float]:
    p, lst, conn = connected(exe, "full" in case)
    assert p.stdin is not None and p.stdout is not None
    keep = case != "without"
    if not keep:
        p.stdin.write(b"close\n")
        p.stdin.flush()
        p.stdout.readline()
    serve = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "serve", "--listen", "127.0.0.1:0", "-D", tmp, "--once", "--json"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    assert serve.stdout is not None
    addr = json.loads(serve.stdout.readline())["listening"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    args = ["migrate", "--pid", str(p.pid), "--to", addr, "--policy", "rounds:2", "--json"]
    m = subprocess.run([sys.executable, "-m", "ckpt", *args, *(["--tcp-established"] if keep else [])],
                       capture_output=True, text=True, cwd=ROOT, env=env)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if m.returncode != 0:
        serve.kill()
        raise SystemExit(f"ckpt migrate: {m.stderr.strip()}")
    done: dict[str, Any] = json.loads(m.stdout.strip().splitlines()[-1])
    copy = int(done["pid"])
    for line in serve.stdout:
        if line.startswith(b"{") and json.loads(line).get("event") == "done":
            break
    serve.wait(60)
    os.kill(copy, 9)
    p.wait()
    conn.close()
    lst.close()
    for f in (serve.stdin, serve.stdout, serve.stderr):
        if f:
            f.close()
    fp, rp = done["final_phases_ms"], done["restore_phases_ms"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dict(
        zip(
            FIELDS,
            (
                done["downtime_ms"],
                done["final_freeze_ms"],
                fp.get("frozen: collect: fds", float("nan")),
                done["restore_ms"],
                rp.get("finish", float("nan")),
                cpu * 1e3,
            ),
            strict=True,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    exe = build_c("tcpconn")
    lib, cmd = dict(os.environ), dict(os.environ, CKPT_NETLOCK_COMMAND="1")
    cases = [
        ("queues 100 B", lib),
        ("queues full", lib),
        ("100 B, nft command", cmd),
        ("without", lib),
    ]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _ in cases}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds):
            for j, (name, env) in enumerate(cases):
                rows[name].append(migrate_once(exe, f"{tmp}/{i}-{j}", name, env))
    secs = time.perf_counter() - t0
    print(f"{a.rounds} rounds in {secs:.0f} s; load {os.getloadavg()[0]:.1f}; medians, ms")
    print(f"{'':24}" + "".join(f"{k:>20}" for k in rows))
    for f in FIELDS:
        print(f"{f:24}" + "".join(f"{statistics.median(r[f] for r in v):20.1f}" for v in rows.values()))


if __name__ == "__main__":
    main()
