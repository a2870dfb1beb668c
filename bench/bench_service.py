"""`ckpt` through a `ckpt service` (CKPT_SERVICE) beside the same command in-process, same minutes.

    python bench/bench_service.py [--sizes 1,256] [--repeat 5] [--markdown] [--no-restore] [--no-dump]

One service (`python -m ckpt service`) for the whole run. Per size, a target of bench_dump.py's
mixed data (1/4 zero, 1/4 random, 1/2 text) and --repeat pairs of full dumps (`dump --track none`,
a fresh directory each), the in-process one and the service's alternated (which goes first flips
each pair), as a user runs them: a separate process of the installed `ckpt` program
(bench_dump.ckpt_program). Then, unless --no-restore, `restore --detach` of a layer of a killed
target (bench_restore.py's way: the restored process must answer with the dumped checksum) through
the service and in-process, alternated likewise: through
the service the client starts the helper as its own child and the service's child restores into it
(ckpt/restore/caller.py); the service's log must say it ran it.
Reported (medians, and min-max): wall time of the command as its caller sees it (Python's start
included), CPU seconds of everything the command took: the `ckpt` process (user + system) and,
through the service, its child that ran the command (the service's children's times), less the
restored process's own CPU (its checksum over its memory, asked for to check it: ~0.4 s at 256
MiB, which the column counted before); ckpt's own `elapsed_ms`. For the restores, a second table:
the medians of the restore's phases (its `timings_ms`) and `start`, the wall before and after them
(Python's start, the imports or the service's fork, opening the layer, printing the pid).
CRIU 4.2's walls quoted from issue 9. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dump import CRIU_DUMP, ROOT, Target, ckpt_program, machine

from tests.util import LineChannel, build_c

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
ENV.pop("PYTHONDONTWRITEBYTECODE", None)  # as an installed ckpt runs (bench_dump.py's note)
ENV.pop("CKPT_SERVICE", None)
CRIU_RESTORE = {1: "0.051", 256: "0.24", 1024: "0.9-2.2"}  # seconds, quoted
TICK = os.sysconf("SC_CLK_TCK")
# a restore's, in ms
RESTORE_PHASES = ("start", "check", "helper", "map", "fill_setup", "fill", "finish", "total")


def _stat_cpu(pid: int, children: bool) -> float:
    """utime + stime of `pid` (cutime + cstime: of the children it has reaped) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    k = 13 if children else 11
    return (int(fields[k]) + int(fields[k + 1])) / TICK


def _children_cpu(pid: int) -> float:
    """The CPU of the children `pid` has reaped (the service's commands)."""
    return _stat_cpu(pid, True)


def _own_children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def tree_env(root: Path) -> dict[str, str]:
    """The environment that runs `python -m ckpt` from the tree at `root`."""
    return dict(ENV, PYTHONPATH=str(root))


class Service:
    def __init__(self, work: Path, root: Path = ROOT) -> None:
        self.root, self.env = root, tree_env(root)
        self.sock = work / "svc" / "sock"
        argv = [sys.executable, "-m", "ckpt", "service", "--socket", str(self.sock), "--json"]
        pipe, null = subprocess.PIPE, subprocess.DEVNULL
        self.p = subprocess.Popen(argv, stdin=null, stdout=pipe, env=self.env, cwd=root)
        self.log = LineChannel(self.p, 120)  # type: ignore[arg-type]
        assert "listening" in json.loads(self.log.readline())

    def outcome(self) -> dict[str, object]:
        return json.loads(self.log.readline())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(60)


def dump(pid: int, d: Path, svc: Service | None, root: Path = ROOT) -> dict[str, float]:
    env = dict(svc.env, CKPT_SERVICE=str(svc.sock)) if svc else tree_env(root)
    c0, z0 = _own_children_cpu(), _children_cpu(svc.p.pid) if svc else 0.0
    t0 = time.perf_counter()
    argv = [*ckpt_program(), "dump", "--pid", str(pid), "-D", str(d), "--track", "none", "--json"]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=root)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"ckpt dump: {p.stderr.strip()}")
    if svc:
        got = svc.outcome()
        if got.get("outcome") != "ran":
            raise RuntimeError(f"the service did not run the dump: {got}")
    cpu = _own_children_cpu() - c0 + (_children_cpu(svc.p.pid) - z0 if svc else 0.0)
    out = json.loads(p.stdout)
    got = {"wall": wall, "cpu": cpu, "own": out["elapsed_ms"] / 1e3}
    got.update({f"phase:{k}": v / 1e3 for k, v in _phases(out).items()})
    return got


# The dump's phases_ms grouped into the steps of the phase table (s), and what lies outside the
# dump's own clock (the command's start and exit: Python's or the client's, the service's check,
# fork and child set-up, the exit and the reply).
DUMP_PHASES = ("outside", "before freeze", "frozen", "compress", "metadata", "publish")


def _phases(out: dict[str, object]) -> dict[str, float]:
    ph = out["phases_ms"]
    assert isinstance(ph, dict)
    got = dict.fromkeys(DUMP_PHASES, 0.0)
    for k, v in ph.items():
        if k.startswith("cpu:"):
            continue
        if k.startswith("frozen"):
            got["frozen"] += v
        elif k.startswith("compress"):
            got["compress"] += v
        elif k in ("metadata", "publish"):
            got[k] += v
        else:  # prepare, buffer, smaps (before the freeze)
            got["before freeze"] += v
    return got


def restore(layer: Path, want: str, svc: Service | None) -> dict[str, float]:
    env = dict(ENV, CKPT_SERVICE=str(svc.sock)) if svc else ENV
    c0, z0 = _own_children_cpu(), _children_cpu(svc.p.pid) if svc else 0.0
    t0 = time.perf_counter()
    argv = [*ckpt_program(), "restore", str(layer), "--detach", "--json"]
    pipe = subprocess.PIPE
    p = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, env=env, cwd=ROOT)
    io = LineChannel(p, 300)
    pid = 0
    own = 0.0  # the restored process's CPU (its checksum), not the restore's
    try:
        try:
            out = json.loads(io.readline())
        except EOFError:
            p.wait(60)
            err = p.stderr.read().decode(errors="replace").strip() if p.stderr else ""
            raise RuntimeError(f"ckpt restore: exit {p.returncode}: {err}") from None
        wall = time.perf_counter() - t0
        pid = out["pid"]
        if io.cmd("sum").split()[1] != want:
            raise RuntimeError("the restored process reports another checksum")
        own = _stat_cpu(pid, False)
        p.wait(60)
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # ours: we are a subreaper
        if p.poll() is None:
            p.kill()
        p.wait()
    if svc and (got := svc.outcome()).get("outcome") != "ran":
        raise RuntimeError(f"the service did not run the restore: {got}")
    # (the restored process, reaped here, is our child: its own CPU is taken out)
    cpu = _own_children_cpu() - c0 + (_children_cpu(svc.p.pid) - z0 if svc else 0.0) - own
    t = out["timings_ms"]
    phases = {f"ms {k}": float(t.get(k, 0.0)) for k in RESTORE_PHASES if k != "start"}
    phases["ms start"] = wall * 1e3 - phases["ms total"]
    return {"wall": wall, "cpu": cpu, "own": t["total"] / 1e3, **phases}


def restore_layer(mib: int, work: Path) -> tuple[Path, str]:
    pipe = subprocess.PIPE
    argv = [str(build_c("rounds")), str(mib * 256)]
    t = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=subprocess.DEVNULL)
    io = LineChannel(t, 300)
    try:
        assert io.readline().startswith("ready")
        assert io.cmd("mix") == "ok"
        want = io.cmd("sum").split()[1]
        d = work / f"restore-{mib}"
        p = subprocess.run([sys.executable, "-m", "ckpt", "dump", "--pid", str(t.pid), "-D", str(d), "--kill",
                            "--json"], capture_output=True, text=True, env=ENV, cwd=ROOT)  # fmt: skip
        if p.returncode:
            raise RuntimeError(p.stderr)
    finally:
        t.kill()
        t.wait()
    return Path(json.loads(p.stdout)["layer"]), want


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.2f}-{max(xs):.2f})"


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.0f} ({min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f})"


def _cols(r: list[dict[str, float]]) -> list[str]:
    return [_fmt([x[k] for x in r]) for k in ("wall", "cpu", "own")]


def _phase_cols(r: list[dict[str, float]]) -> list[str]:
    return [f"{statistics.median(x[f'ms {k}'] for x in r):.0f}" for k in RESTORE_PHASES]


def _print_table(head: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        for r in [head, *rows]:
            print("  ".join(f"{c:<28}" if i == 1 else f"{c:<22}" for i, c in enumerate(r)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,256", help="MiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-restore", action="store_true")
    ap.add_argument("--no-dump", action="store_true")
    ap.add_argument("--base", type=Path, help="another tree (e.g. a `git archive` of main): its dumps, "
                    "through a service of its own and in-process, alternated with this tree's")  # fmt: skip
    a = ap.parse_args()
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: restored processes come to us
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-svc-"))
    svc = Service(work)
    if a.base:
        (work / "base").mkdir()
    base = Service(work / "base", a.base.resolve()) if a.base else None
    # (name, service or None, tree): each dump of a round in turn, the order rotated every round
    modes: list[tuple[str, Service | None, Path]] = [("in-process", None, ROOT), ("service", svc, ROOT)]
    if base is not None:
        modes += [("base in-process", None, base.root), ("base service", base, base.root)]
    rows: list[list[str]] = []
    dump_rows: list[list[str]] = []
    phase_rows: list[list[str]] = []
    load0 = os.getloadavg()[0]
    started = time.strftime("%H:%M:%S", time.gmtime())
    try:
        for mib in [int(x) for x in a.sizes.split(",")]:
            res: dict[str, list[dict[str, float]]] = {m[0]: [] for m in modes}
            t = Target(mib) if not a.no_dump else None
            try:
                for i in range(a.repeat if t is not None else 0):
                    k = i % len(modes)
                    for name, s, root in modes[k:] + modes[:k]:
                        d = work / f"d-{mib}-{name.replace(' ', '-')}-{i}"
                        r1 = dump(t.pid, d, s, root)
                        r1["phase:outside"] = r1["wall"] - r1["own"]
                        res[name].append(r1)
                        shutil.rmtree(d)
            finally:
                if t is not None:
                    t.close()
            for name in [m[0] for m in modes] if t is not None else ():
                r = res[name]
                criu = CRIU_DUMP.get(mib, ("-",))[0]
                rows.append([f"{mib} MiB", f"dump, {name}", *_cols(r), criu])
                cells = (_ms([x[f"phase:{k}"] for x in r]) for k in DUMP_PHASES)
                dump_rows.append([f"{mib} MiB", name, *cells])
            if a.no_restore:
                continue
            layer, want = restore_layer(mib, work)
            rres: dict[str, list[dict[str, float]]] = {"in-process": [], "service": []}
            for i in range(a.repeat):
                order2 = [("in-process", None), ("service", svc)]
                for name, s in order2 if i % 2 == 0 else order2[::-1]:
                    rres[name].append(restore(layer, want, s))
            for name in ("in-process", "service"):
                r = rres[name]
                criu = CRIU_RESTORE.get(mib, "-")
                rows.append([f"{mib} MiB", f"restore --detach, {name}", *_cols(r), criu])
                phase_rows.append([f"{mib} MiB", f"restore --detach, {name}", *_phase_cols(r)])
    finally:
        svc.close()
        if base is not None:
            base.close()
        shutil.rmtree(work, ignore_errors=True)
    head = ["size", "command", "wall s", "CPU s", "ckpt's own s", "CRIU 4.2 wall s (quoted)"]
    print(f"{machine()}; {started}-{time.strftime('%H:%M:%S', time.gmtime())} UTC; "
          f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}; median (min-max) of {a.repeat}")  # fmt: skip
    _print_table(head, rows, a.markdown)
    if dump_rows:
        # Where each dump's wall went: "outside" is wall - elapsed_ms (start-up, the service's check,
        # fork and child set-up, exit and reply); the rest is the dump's phases_ms grouped.
        print(f"\nphases of the dumps above, median (min-max) ms of {a.repeat}")
        _print_table(["size", "dump", *(f"{k} ms" for k in DUMP_PHASES)], dump_rows, a.markdown)
    if phase_rows:
        print("\nthe restore's phases, median ms (start: the wall before and after them)")
        _print_table(["size", "command", *RESTORE_PHASES], phase_rows, a.markdown)


if __name__ == "__main__":
    main()
