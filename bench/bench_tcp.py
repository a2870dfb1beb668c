"""What `--tcp-established` costs: the freeze of a dump that reads a connection, and its restore.

    python bench/bench_tcp.py [--rounds 5]

A tests/targets/tcpconn.c process holds a loopback connection to this script, with 60000 bytes
unread in its receive queue and its send queue full (this script does not read: megabytes). Each
round: `ckpt dump --tcp-established --track none` leaving it running, and the network lock alone
(nft: make and lift a table, timed in this process). Then one `dump --tcp-established --kill` and
its restore. Medians of wall and CPU (user + system of the command); freeze_ms is what the target
felt. Not a test.
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

from ckpt import netlock  # noqa: E402
from tests.util import build_c  # noqa: E402


def run(*args: str) -> tuple[dict[str, Any], float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ckpt", *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"ckpt {' '.join(args)}: {p.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return (json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}), wall * 1e3, cpu * 1e3


def connected(exe: Path) -> tuple[subprocess.Popen[bytes], socket.socket, socket.socket, int]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    p = subprocess.Popen([str(exe), "127.0.0.1", str(lst.getsockname()[1])], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert p.stdout is not None and p.stdin is not None
    p.stdout.readline()
    conn, _ = lst.accept()
    conn.sendall(bytes(60000))

    def cmd(line: str) -> str:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(line.encode() + b"\n")
        p.stdin.flush()
        return p.stdout.readline().decode().strip()

    cmd("waitin 60000")
    wrote = int(cmd("send 8000000").split()[1])
    return p, lst, conn, wrote


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    exe = build_c("tcpconn")
    rows: dict[str, list[tuple[float, float, float]]] = {"lock": []}
    p, lst, conn, wrote = connected(exe)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds):
            out, wall, cpu = run(
                "dump",
                "--pid",
                str(p.pid),
                "-D",
                f"{tmp}/r{i}",
                "--json",
                "--tcp-established",
                "--track",
                "none",
            )
            rows.setdefault("dump --tcp-established (runs on)", []).append((wall, cpu, out["freeze_ms"]))
            t = time.perf_counter()
            netlock.unlock(
                netlock.lock([netlock.Flow(2, bytes([127, 0, 0, 2]), 1, bytes([127, 0, 0, 2]), 1)])
            )
            rows["lock"].append(((time.perf_counter() - t) * 1e3, float("nan"), float("nan")))
        out, wall, cpu = run(
            "dump",
            "--pid",
            str(p.pid),
            "-D",
            f"{tmp}/k",
            "--json",
            "--tcp-established",
            "--track",
            "none",
            "--kill",
        )
        rows["dump --tcp-established --kill"] = [(wall, cpu, out["freeze_ms"])]
        p.wait()
        with open(os.devnull, "rb") as null:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "ckpt", "restore", out["layer"], "--detach", "--json"],
                               stdin=null, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
            wall = (time.perf_counter() - t) * 1e3
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        cpu = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1e3
        rows["restore"] = [(wall, cpu, float("nan"))]
        os.kill(json.loads(r.stdout)["pid"], 9)
    conn.close()
    lst.close()
    print(f"target wrote {wrote} bytes (its send queue full), 60000 unread; load {os.getloadavg()[0]:.1f}")
    print(f"{'step':40} {'wall ms':>9} {'cpu ms':>9} {'freeze ms':>10}")
    for k, v in rows.items():
        med = [statistics.median(x[i] for x in v) for i in range(3)]
        print(f"{k:40} {med[0]:9.1f} {med[1]:9.1f} {med[2]:10.1f}")


if __name__ == "__main__":
    main()
