"""Stop rules side by side (issue 11): rounds, downtime and bytes of qemu, xen and phaul over a grid
of dirty rates and link bandwidths (ckpt simulate), and a few real migrations next to their
prediction from a `ckpt dirtyrate` trace (--real).

    python bench/bench_policy.py [--memory 1G] [--hot 64M] [--rates 5,20,50,100,200]
                                 [--bandwidths 100Mbit,1Gbit,10Gbit] [--real] [--markdown]

Grid: a process of --memory writing uniformly at random, either over all of it or over a hot set
(--hot); the model is ckpt/teach/simulate.py with ckpt/migrate/policy.py's rules. Cells read
"rounds / downtime ms / bytes sent per byte of memory"; a '!' marks a migration that did not
converge (QEMU's test). Real runs: examples/dirtier, `ckpt serve --once` and `ckpt migrate
--bandwidth` over loopback, as a user runs them. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckpt.migrate.throttle import parse_rate  # noqa: E402
from ckpt.teach import simulate as sim  # noqa: E402
from tests.examples_util import build_example  # noqa: E402
from tests.util import LineChannel  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
POLICIES = ("qemu", "xen", "phaul")


def _cell(r: sim.SimResult) -> str:
    bang = "!" if any("did not converge" in w for w in r.warnings) else ""
    return f"{r.rounds}{bang} / {r.downtime_ms:.0f} / {r.bytes_sent / r.memory_bytes:.2f}"


def grid(memory: int, hot: int, rates: list[float], bws: list[str]) -> list[list[str]]:
    rows = []
    for label, over in (("uniform", memory // sim.PAGE), (f"hot {hot >> 20} MiB", hot // sim.PAGE)):
        for rate in rates:
            for bw in bws:
                cells = []
                for pol in POLICIES:
                    model = sim.Uniform(rate * 1e6 / sim.PAGE, over)
                    o = sim.Options(memory // sim.PAGE, parse_rate(bw), model, policy=pol)
                    cells.append(_cell(sim.run(o)))
                rows.append([label, f"{rate:g}", bw, *cells])
    return rows


# -- real migrations --------------------------------------------------------------------------------
def _ckpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckpt", *args]


def _start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([str(build_example(name)), *args], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert LineChannel(p, 60).readline().startswith("ready")
    return p


def _trace(name: str, args: list[str], path: Path) -> None:
    p = _start(name, args)
    try:
        argv = _ckpt(
            "dirtyrate", "--pid", str(p.pid), "--interval", "100", "--duration", "2", "--json", "--pages"
        )
        out = subprocess.run(argv, capture_output=True, text=True, env=ENV, check=True)
        path.write_text(out.stdout)
    finally:
        p.kill()
        p.wait()


def _real(name: str, args: list[str], policy: str, bw: str, tmp: Path) -> dict[str, Any]:
    p = _start(name, args)
    d = tmp / f"dst-{time.monotonic_ns()}"
    srv = subprocess.Popen(_ckpt("serve", "--listen", "127.0.0.1:0", "-D", str(d), "--once", "--json"),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           env=ENV)  # fmt: skip
    ch = LineChannel(srv, 120)
    addr = json.loads(ch.readline())["listening"]
    try:
        argv = _ckpt(
            "migrate", "--pid", str(p.pid), "--to", addr, "--policy", policy, "--bandwidth", bw, "--json"
        )
        m = subprocess.run(argv, capture_output=True, text=True, env=ENV)
        if m.returncode:
            raise RuntimeError(m.stderr)
        res: dict[str, Any] = json.loads(m.stdout.splitlines()[-1])
        while True:
            ev = json.loads(ch.readline())
            if ev.get("event") == "done":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(ev["pid"]), 9)
                break
        return res
    finally:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()
        srv.kill()
        srv.wait()


REAL = [
    ("dirtier: hot 1M of 16M", "dirtier", ["-m", "16M", "-p", "hot", "-H", "1M", "-r", "200", "-s", "5"]),
    ("dirtier: random over 16 MiB, 4 MB/s", "dirtier", ["-m", "16M", "-p", "random", "-r", "4", "-s", "5"]),
    ("gameserver: 16 MiB map, 30 ticks/s", "gameserver", ["-M", "16"]),
    ("cache: 16 MiB, 20k ops/s, LRU", "cache", ["-m", "16", "-a"]),
]  # fmt: skip
REAL_LINK = "8MB/s"


def real_rows() -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        bw = REAL_LINK
        for label, name, args in REAL:
            tr = tmp / "trace.jsonl"
            _trace(name, args, tr)
            for pol in POLICIES:
                model, mem = sim.load_trace(str(tr), None)
                s = sim.run(sim.Options(mem, parse_rate(bw), model, policy=pol))
                r = _real(name, args, pol, bw, tmp)
                rb = int(r["bytes_sent"])
                rows.append([label, bw, pol, f"{s.rounds} / {r['rounds']}",
                             f"{s.downtime_ms:.0f} / {r['downtime_ms']:.0f}",
                             f"{s.bytes_sent / 1e6:.1f} / {rb / 1e6:.1f}",
                             f"{(s.bytes_sent - rb) / rb:+.0%}"])  # fmt: skip
    return rows


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    w = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    return "\n".join("  ".join(x.ljust(n) for x, n in zip(r, w, strict=True)) for r in [head, *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--hot", default="64M")
    ap.add_argument("--rates", default="5,20,50,100,200", help="dirty rates, MB/s")
    ap.add_argument("--bandwidths", default="100Mbit,1Gbit,10Gbit")
    ap.add_argument("--real", action="store_true", help="also a few real migrations over loopback")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    over = f"model overheads: round {sim.ROUND_OVERHEAD_MS:g} ms, final {sim.FINAL_OVERHEAD_MS:g} ms"
    print(
        f"# {platform.node()} {platform.release()}, load {os.getloadavg()[0]:.1f}; memory {a.memory}; {over}"
    )
    t0 = time.process_time()
    rows = grid(sim.parse_size(a.memory), sim.parse_size(a.hot), [float(x) for x in a.rates.split(",")],
                a.bandwidths.split(","))  # fmt: skip
    head = ["writes over", "dirty MB/s", "link", *(f"{p}: rounds / downtime ms / sent x" for p in POLICIES)]
    print(_table(head, rows, a.markdown))
    print(f"# grid: {len(rows) * len(POLICIES)} simulations in {time.process_time() - t0:.2f} s CPU")
    if a.real:
        t1 = time.process_time()
        rr = real_rows()
        head = ["workload", "link", "policy", "rounds sim / real", "downtime ms sim / real",
                "MB sent sim / real", "bytes error"]  # fmt: skip
        print()
        print(_table(head, rr, a.markdown))
        print(f"# real: load {os.getloadavg()[0]:.1f}, {time.process_time() - t1:.1f} s CPU in this process")


if __name__ == "__main__":
    main()
