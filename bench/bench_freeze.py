"""How long a dump holds its target frozen, phase by phase (issue 9, part 2).

    python bench/bench_freeze.py [--modes sigwait,nanosleep,read,busy] [--threads 1,8] [--mib 8]
                                 [--repeat 7] [--track uffd-wp] [--markdown] [--scale 256,1024]
                                 [--precopy default,on,off] [--stream PAGES_PER_MS]

For each target (bench/freezetarget.c: every thread idle in sigwaitinfo, clock_nanosleep or read(),
or busy writing a few pages in a loop; MIB MiB of random data) and each thread count: a full dump
(arming the tracker) and an incremental dump on top of it, in this process through the API, so
Python's start is not counted. A fresh target for each run (a full dump of an armed target would
find its mappings held by the earlier chain's userfaultfd). Prints the median freeze and the median
of each frozen phase of `phases_ms`, `collect` also step by step (`frozen: collect: ...`).
--scale MIB,...: instead, for each size a full dump, then 1% of the pages written (evenly spread), then
an incremental dump: the incremental's freeze beside the full one's (aim: at most 1/20 of it);
--precopy default,on,off: one incremental row per setting of its live pre-copy (ckpt/precopy.py);
--stream N: a thread of the target writes N pages a millisecond from before the incremental on.
--floor MIB,...: the least an incremental's freeze holds (seize, scans, one batch, smaps, thaw).
--flagwatch off,on: one row per setting, runs alternating: on, the dumps share a PageTablesCache and
the incremental keeps the full dump's smaps walk while the flag counters (ckpt/proc/flagwatch.py) stay
at zero (what a migration's rounds and an API caller that keeps the cache get).
--idlepoll on,off: one row per setting, runs alternating: off, the freezes leave idle CPUs to halt
(ckpt/idlepoll.py: each stop's wake-up of a halted CPU, which in a VM goes through the host).
--base DIR: another tree of ckpt and this one, one run each in turn (with --scale: those sizes).
--spread (with --base): each incremental phase as median / least / most, beside the table's "incr wait"
(freeze - the dumper's CPU: time the target was held while no thread of the dumper ran, i.e. waiting for the
target to be scheduled at its stops, or for a CPU): a median far above the least there is the load's.
--quick N: an injected mmap + munmap pair, N times with one stop per call and with two, alternated.
--cli N: instead, per target a full dump and N incremental ones, each a new `ckpt dump` process as a
user runs it (nothing warm: every first call of the freeze's code is in it); --modes dirty --mib 256:
a target that writes 1% of its pages before each incremental; with --base, both trees;
with --served, also each through a `ckpt service` of its tree (CKPT_SERVICE), all alternated.
--stopfloor N: instead, what the freeze's stops cost a tracer written in C (bench/stopfloor.c): every
thread seized, interrupted, waited for and detached, N times, and N injected getpid() round trips.
--counts: also count, per freeze, what does not depend on the load (bench/freezecounts.py): ptrace
requests, stop reports waited for, PAGEMAP_SCAN ioctls, /proc files of the target opened, threads
started, garbage collections (medians; the counting wrappers cost time: take times from a run without).
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:
    from ckpt.ptrace import sigchld

    with sigchld.blocked():  # as the CLI does: numpy's OpenBLAS thread must not take SIGCHLD
        from ckpt.dump import dump
except ImportError:  # an older ckpt, for a "before" figure
    from ckpt.dump import dump
from ckpt import sysno as nr  # noqa: E402
from ckpt.ptrace import Frozen  # noqa: E402
from tests.util import LineChannel, build_c  # noqa: E402

if TYPE_CHECKING:
    from bench_service import Service

PHASES = (
    "frozen: seize", "frozen: track", "frozen: collect", "frozen: scan", "frozen: copy", "frozen: smaps",
    "frozen: flagwatch", "frozen: thaw",
)  # fmt: skip
# Before the freeze, not in it: an incremental's live pre-copy (ckpt/precopy.py).
LIVE = ("precopy: scan", "precopy: copy")
CPU = "cpu: frozen"  # the dumper's CPU time (user+sys, all threads) during the freeze
WAIT = "wait"  # freeze - cpu: the target held while no thread of the dumper ran (scheduling, stops)
COUNTS = ("n: ptrace", "n: stops", "n: scans", "n: proc", "n: threads", "n: gc")  # --counts
COLLECT = "frozen: collect"


def phases(r: Any) -> dict[str, float]:
    """The frozen phases of a DumpResult; `collect` is the sum of its steps (older ckpt: one figure)."""
    row = {k: v for k, v in r.phases_ms.items() if k.startswith(("frozen", "precopy", "cpu"))}
    steps = {k: v for k, v in row.items() if k.startswith(COLLECT + ": ")}
    if steps:
        row[COLLECT] = sum(steps.values())
    row["freeze"] = r.freeze_ms
    row["held"] = getattr(r, "held_ms", 0.0)  # (to the thaw's end: older ckpt has none)
    if CPU in row:  # frozen while the dumper was not running: waiting for the target's stops, or preempted
        row[WAIT] = max(r.freeze_ms - row[CPU], 0.0)
    row["dirty"] = r.pages_dirty
    row["live"] = getattr(r, "pages_precopied", 0)
    return row


def _attach(rows: list[dict[str, float]]) -> None:
    """--counts: each dump's freeze counts into its row."""
    fc = sys.modules.get("freezecounts")
    if fc is not None:
        fc.attach(rows)


def counting() -> None:
    """--counts: count from here on (bench/freezecounts.py, beside this file)."""
    sys.path.append(str(Path(__file__).resolve().parent))
    import freezecounts

    freezecounts.install()


def count_table(rows: list[tuple[str, list[dict[str, float]]]], markdown: bool) -> None:
    """Means of the counts of each (target and dump, its runs' rows)."""
    rows = [(name, runs) for name, runs in rows if runs and COUNTS[0] in runs[0]]
    if not rows:
        return
    print()
    print("per freeze, means over the runs (load-independent counts): " + ", ".join(c[3:] for c in COUNTS))
    table(
        ["target", *(c[3:] for c in COUNTS)],
        [[name, *(f"{statistics.mean(r[c] for r in runs):.1f}" for c in COUNTS)] for name, runs in rows],
        markdown,
    )


def build_target(name: str = "freezetarget") -> Path:
    """bench/NAME.c built once per content (tests/util.build_c). One binary per name in /tmp, rebuilt
    when its source looked newer, was rebuilt from a --base tree's older source (checked out later),
    and this tree's bench then ran that target: its "dirty" mode unknown, a busy loop that never
    answered."""
    return build_c(name, ["-O2"], where=ROOT / "bench")


def stopfloor(exe: Path, a: argparse.Namespace) -> None:
    """--stopfloor N: what the stops of a freeze cost a tracer in C here (bench/stopfloor.c), per
    target: every thread seized, interrupted, waited for and detached, N times; and N injected
    getpid() round trips by single-step. The least a ptrace freeze of that process can be, against
    which ckpt's seize and thaw phases (the table without this option) are to be read."""
    prog = build_target("stopfloor")
    rows: list[list[str]] = []
    for mode in a.modes.split(","):
        for nt in (int(x) for x in a.threads.split(",")):
            argv = [str(exe), mode, str(nt), str(a.mib)]
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            try:
                line = LineChannel(p, 60).readline()
                assert line.startswith("ready"), line
                out = subprocess.run(
                    [str(prog), str(p.pid), str(a.stopfloor)], capture_output=True, text=True, check=True
                ).stdout
            finally:
                p.kill()
                p.wait()
            got = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()}
            rows.append([f"{mode} {a.mib} MiB", str(nt), *got["freeze"], *got["step"][:3]])
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"a tracer in C (bench/stopfloor.c), us over {a.stopfloor} rounds: every thread seized,")
    print("interrupted, waited for and detached (freeze); one injected getpid() by single-step (step)")
    cols = ["target", "thr", "freeze p10", "p50", "p90", "p99", "step p10", "p50", "p90"]
    table(cols, rows, a.markdown)


def watch_kw(flagwatch: bool) -> dict[str, Any]:
    """--flagwatch on: both dumps share a PageTablesCache (as a migration's rounds do), so the
    incremental keeps the full dump's smaps walk while the flag counters (ckpt/proc/flagwatch.py)
    stay at zero."""
    if not flagwatch:
        return {}
    from ckpt.proc.ptcache import PageTablesCache

    return {"walks_cache": PageTablesCache()}


def settings(a: argparse.Namespace) -> list[tuple[str, str]]:
    """Each run's (--flagwatch, --idlepoll) settings, in the order the runs alternate."""
    return [(fw, ip) for fw in a.flagwatch.split(",") for ip in a.idlepoll.split(",")]


def poll(setting: str) -> None:
    """--idlepoll: the freezes of the next run with idle CPUs polling ("on") or halting ("off")."""
    with contextlib.suppress(ImportError):  # (a ckpt from before ckpt/idlepoll.py: always off)
        from ckpt import idlepoll

        idlepoll.ENABLED = setting != "off"


def label(setting: str) -> str:
    """A row's kind suffix for a "FLAGWATCH/IDLEPOLL" pair of settings()."""
    fw, ip = setting.split("/")
    return (" flagwatch" if fw == "on" else "") + (" no-idle-poll" if ip == "off" else "")


def one_run(
    exe: Path, mode: str, threads: int, mib: int, track: str, flagwatch: bool = False
) -> list[dict[str, float]]:
    """A full dump then an incremental one of a fresh target; the freeze and phases of each."""
    p = subprocess.Popen(
        [str(exe), mode, str(threads), str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    try:
        line = LineChannel(p, 60).readline()
        assert line.startswith("ready"), line
        out = []
        with tempfile.TemporaryDirectory(prefix="ckpt-bench-freeze-") as d:
            kw = watch_kw(flagwatch)
            for incremental in (False, True):
                out.append(phases(dump(p.pid, d, incremental=incremental, track=track, **kw)))
        _attach(out)
        return out
    finally:
        p.kill()
        p.wait()


def scale_run(
    exe: Path, mib: int, track: str, precopy: bool | None = None, stream: int = 0, flagwatch: bool = False
) -> list[dict[str, float]]:
    """A full dump, 1% of the pages written, an incremental dump: the freeze and phases of each.
    ``precopy``: the incremental's live pre-copy (None: ckpt's default; an older ckpt: not passed).
    ``stream``: pages a millisecond a thread of the target writes all over its memory from before the
    incremental dump on (a busy writer)."""
    p = subprocess.Popen(
        [str(exe), "dirty", "1", str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    try:
        ch = LineChannel(p, 120)
        assert ch.readline().startswith("ready")
        with tempfile.TemporaryDirectory(prefix="ckpt-bench-freeze-") as d:
            wk = watch_kw(flagwatch)
            full = phases(dump(p.pid, d, track=track, **wk))
            assert ch.cmd("write 10").startswith("written")
            if stream:
                assert ch.cmd(f"stream {stream}").startswith("streaming")
            kw = ({} if precopy is None else {"precopy": precopy}) | wk
            incr = phases(dump(p.pid, d, incremental=True, track=track, **kw))
        _attach([full, incr])
        return [full, incr]
    finally:
        p.kill()
        p.wait()


def floor_run(exe: Path, mib: int) -> dict[str, float]:
    """What no incremental dump can do without, on a target that wrote 1% of its pages since a full
    dump: seize every thread, the uffd-wp dirty and hole scans (ckpt.track.uffdwp), one injected
    batch of a single call (its code mapped, run, unmapped), smaps' VmFlags (the page-table walk a
    dump must take frozen), the thaw. ms for each, in that order, in one freeze."""
    from ckpt.image import open_layer
    from ckpt.proc import read_maps
    from ckpt.proc.props import read_vmflags
    from ckpt.ptrace.batch import Call, Plan
    from ckpt.track import ParentInfo
    from ckpt.track.uffdwp import UffdWpTracker

    p = subprocess.Popen(
        [str(exe), "dirty", "1", str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    try:
        ch = LineChannel(p, 120)
        assert ch.readline().startswith("ready")
        with tempfile.TemporaryDirectory(prefix="ckpt-bench-freeze-") as d:
            meta = open_layer(dump(p.pid, d, track="uffd-wp").layer).layers[0].meta
            assert ch.cmd("write 10").startswith("written")
            tracker = UffdWpTracker()
            parent = ParentInfo([v.to_dict() for v in meta.vmas], meta.inventory.tracker_state)
            out: dict[str, float] = {}
            with sigchld.blocked():
                fz = Frozen(p.pid)
                if hasattr(fz, "prepare"):  # its checks run beside the process, as a dump's do
                    fz.prepare()
                t = [time.perf_counter()]

                def lap(name: str) -> None:
                    t.append(time.perf_counter())
                    out[name] = (t[-1] - t[-2]) * 1e3

                fz.freeze()
                lap("seize")
                vmas = read_maps(p.pid)
                tracker.finish_dirty(fz, tracker.begin_dirty(fz, vmas, parent))
                lap("scan")
                plan = Plan()
                plan.add("pid", Call(nr.GETPID))
                plan.run(fz, vmas)
                fz.release_code()
                lap("batch")
                read_vmflags(p.pid)
                lap("smaps")
                fz.thaw()
                lap("thaw")
        return out
    finally:
        p.kill()
        p.wait()


def quick_pairs(exe: Path, n: int) -> None:
    """--quick N: an mmap and a munmap of a page injected into a frozen idle target (what each batch
    does for its code), N times each way, alternated: one stop per call (Frozen.syscall(quick=True):
    a single-step over the syscall) and two (PTRACE_SYSCALL's entry and exit). The freezing thread's
    wall and CPU time per pair, ms."""
    from ckpt.ptrace import deferred_signals

    p = subprocess.Popen([str(exe), "sigwait", "1", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    got: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    try:
        assert LineChannel(p, 60).readline().startswith("ready")
        with sigchld.blocked(), deferred_signals(), Frozen(p.pid) as f:
            for _ in range(n):
                for quick in (True, False):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    addr = f.syscall(nr.MMAP, 0, 4096, 3, 0x22, -1, 0, quick=quick)
                    assert addr > 0 and f.syscall(nr.MUNMAP, addr, 4096, quick=quick) == 0
                    got[quick][0].append((time.perf_counter() - t0) * 1e3)
                    got[quick][1].append((time.thread_time() - c0) * 1e3)
    finally:
        p.kill()
        p.wait()
    print(f"an injected mmap + munmap pair in a frozen idle target, ms over {n} pairs each way (alternated)")
    print("  stops per call   wall median / least   cpu median / least")
    for quick in (True, False):
        w, c = got[quick]
        print(
            f"  {1 if quick else 2:<16} {statistics.median(w):7.3f} / {min(w):.3f}"
            f"       {statistics.median(c):7.3f} / {min(c):.3f}"
        )


def steps_of(runs: list[dict[str, float]]) -> list[str]:
    """The collect steps seen, in the order a dump took them."""
    out: list[str] = []
    for r in runs:
        out += [k for k in r if k.startswith(COLLECT + ": ") and k not in out]
    return out


def table(cols: list[str], rows: list[list[str]], markdown: bool) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    if markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def inject_latency(exe: Path, n: int, foreign: bool) -> list[float]:
    """ms per injected getpid() in a frozen idle target, one after another. ``foreign``: a thread
    of this process that ckpt did not start, with SIGCHLD unblocked, idles meanwhile (a program
    using the API; before the fix, ckpt's own compression pool and numpy's OpenBLAS thread)."""
    p = subprocess.Popen([str(exe), "sigwait", "1", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    stop = threading.Event()
    th = threading.Thread(target=stop.wait)
    if foreign:
        th.start()
    try:
        assert LineChannel(p, 60).readline().startswith("ready")
        out = []
        with Frozen(p.pid) as f:
            for _ in range(n):
                t0 = time.perf_counter()
                f.syscall(nr.GETPID)
                out.append((time.perf_counter() - t0) * 1e3)
        return out
    finally:
        stop.set()
        if foreign:
            th.join()
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="sigwait,nanosleep,read,busy")
    ap.add_argument("--threads", default="1,8")
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--track", default="uffd-wp")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--inject", type=int, default=300, help="injected syscalls per latency row (0: none)")
    ap.add_argument("--scale", default="", help="MiB,...: full vs incremental of 1%% written, per size")
    ap.add_argument(
        "--precopy",
        default="default",
        help="with --scale: the incremental's live pre-copy, one row each: default,on,off (a list)",
    )
    ap.add_argument(
        "--stream", type=int, default=0, help="with --scale: a thread writes N pages/ms all the while"
    )
    ap.add_argument("--floor", default="", help="MiB,...: the least an incremental's freeze must hold")
    ap.add_argument(
        "--flagwatch",
        default="off",
        help="off,on (a list): the smaps walk read in every freeze, or kept while the flag counters "
        "stay at zero (the dumps share a PageTablesCache); runs alternate between the settings",
    )
    ap.add_argument(
        "--idlepoll",
        default="on",
        help="on,off (a list): idle CPUs polling while frozen (ckpt/idlepoll.py), or not; runs alternate",
    )
    ap.add_argument(
        "--base", default="", help="another tree of ckpt (git worktree or archive): it and this one in turn"
    )
    ap.add_argument(
        "--quick", type=int, default=0, help="N: mmap+munmap pairs in a frozen target, one stop each vs two"
    )
    ap.add_argument("--counts", action="store_true", help="count ptrace calls, stops, scans... per freeze")
    ap.add_argument(
        "--stopfloor", type=int, default=0, help="N: instead, what the same stops cost a C tracer (N rounds)"
    )
    ap.add_argument(
        "--cli",
        type=int,
        default=0,
        help="N: per target, a full dump then N incremental ones, each a new `ckpt dump` process (what a "
        "user runs: nothing warm); with --base, that tree's beside this one's, alternated",
    )
    ap.add_argument(
        "--served",
        action="store_true",
        help="with --cli: each tree's dumps also through a `ckpt service` of that tree, alternated",
    )
    ap.add_argument(
        "--spread", action="store_true", help="with --base: each incremental phase as median / least / most"
    )
    a = ap.parse_args()
    if a.counts:
        counting()
    exe = build_target()
    if a.inject and not a.scale and not a.floor and not a.base and not a.stopfloor:
        print(f"one injected getpid() in a frozen idle target, ms over {a.inject} calls")
        print("  another thread with SIGCHLD unblocked   median     p90     max  >=20ms")
        for foreign in (False, True):
            lat = sorted(inject_latency(exe, a.inject, foreign))
            print(
                f"  {'yes' if foreign else 'no':<38}{statistics.median(lat):7.3f} "
                f"{lat[int(len(lat) * 0.9)]:7.3f} {lat[-1]:7.1f} {sum(x >= 20 for x in lat):7d}"
            )
        print()
    if a.quick:
        quick_pairs(exe, a.quick)
        return
    if a.stopfloor:
        stopfloor(exe, a)
        return
    if a.cli:
        cli(exe, a)
        return
    if a.base:
        ab(a)
        return
    if a.scale:
        scale(exe, a)
        return
    if a.floor:
        floor(exe, a)
        return
    results: dict[tuple[str, int, str], list[list[dict[str, float]]]] = {}
    for mode in a.modes.split(","):
        for nt in (int(x) for x in a.threads.split(",")):
            for _ in range(a.repeat):
                for fw, ip in settings(a):
                    poll(ip)
                    results.setdefault((mode, nt, f"{fw}/{ip}"), []).append(
                        one_run(exe, mode, nt, a.mib, a.track, fw == "on")
                    )
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    steps = steps_of([r for runs in results.values() for run in runs for r in run])
    keys = ["freeze", CPU, WAIT, *PHASES[:3], *steps, *PHASES[3:]]
    names = [k.removeprefix("frozen: ").removeprefix("collect: ").replace(CPU, "cpu") for k in keys]
    cols = ["target", "thr", "dump", "dirty", "min", *names]
    rows: list[list[str]] = []
    for (mode, nt, fw), runs in results.items():
        for i, kind in enumerate(("full", "incr")):
            kind += label(fw)
            med = {k: statistics.median(r[i].get(k, 0.0) for r in runs) for k in ("dirty", *keys)}
            low = min(r[i]["freeze"] for r in runs)
            rows.append(
                [
                    f"{mode} {a.mib}MiB",
                    str(nt),
                    kind,
                    f"{med['dirty']:.0f}",
                    f"{low:.1f}",
                    *(f"{med[k]:.1f}" for k in keys),
                ]
            )
    print(f"freeze and frozen phases in ms, median of {a.repeat} runs (min: the least freeze), ", end="")
    print(f"tracker {a.track}; ", end="")
    print(f"{', '.join(s.removeprefix('frozen: collect: ') for s in steps)}: the steps of collect")
    table(cols, rows, a.markdown)
    count_table(
        [
            (f"{mode} {a.mib}MiB {nt} thr {kind}{label(fw)}", [r[i] for r in runs])
            for (mode, nt, fw), runs in results.items()
            for i, kind in enumerate(("full", "incr"))
        ],
        a.markdown,
    )


def _cli_dump(root: str, pid: int, d: str, incremental: bool, svc: Service | None = None) -> dict[str, float]:
    """One `ckpt dump --json` of ``root``'s tree in a new process (through the `ckpt service` ``svc``,
    if given: its environment, and its log's word that it ran the dump); its freeze and phases."""
    py = str(Path(root) / ".venv" / "bin" / "python")
    py = py if Path(py).exists() and svc is None else sys.executable  # (the service's own Python)
    argv = [py, "-m", "ckpt", "dump", "--pid", str(pid), "-D", d, "--json"]
    argv += ["--incremental"] if incremental else []
    if svc is None:
        env = {k: v for k, v in os.environ.items() if k != "CKPT_SERVICE"}
    else:
        env = dict(svc.env, CKPT_SERVICE=str(svc.sock))
    r = subprocess.run(argv, capture_output=True, text=True, cwd=root, env=env)
    if r.returncode:
        raise RuntimeError(f"ckpt dump failed: {r.stderr.strip()}")
    if svc is not None and (got := svc.outcome()).get("outcome") != "ran":
        raise RuntimeError(f"the service did not run the dump: {got}")
    out = json.loads(r.stdout)
    row = {k: float(v) for k, v in out["phases_ms"].items() if k.startswith("frozen")}
    row["freeze"] = float(out["freeze_ms"])
    return row


def cli(exe: Path, a: argparse.Namespace) -> None:
    """--cli N: each dump a new `ckpt dump` process (Python's start and every first call inside the
    freeze are a user's), N incrementals per target after a full one; with --base, the two trees'
    dumps alternate, each tree with a target of its own (one process takes one chain's tracking).
    --served: each tree's dumps also through a `ckpt service` of that tree, alternated with the rest."""
    trees = {"this": str(ROOT)} if not a.base else {"base": a.base, "this": str(ROOT)}
    ways = [(t, root, False) for t, root in trees.items()]
    if a.served:
        ways += [(t, root, True) for t, root in trees.items()]
    cols = ["target", "thr", "tree", "way", "full", "incr median", "incr least", "incr inject", "incr thaw"]
    rows: list[list[str]] = []
    services: dict[str, Service] = {}
    sockdir = tempfile.mkdtemp(prefix="ckpt-bench-svc-")
    try:
        if a.served:
            sys.path.append(str(ROOT / "bench"))
            from bench_service import Service as Started

            for t, root in trees.items():
                (Path(sockdir) / t).mkdir()
                services[t] = Started(Path(sockdir) / t, Path(root))
        for mode in a.modes.split(","):
            for nt in (int(x) for x in a.threads.split(",")):
                rows += _cli_rows(exe, a, mode, nt, ways, services)
                print(".", end="", file=sys.stderr, flush=True)
    finally:
        for svc in services.values():
            svc.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    print(file=sys.stderr)
    print(f"`ckpt dump`, a new process each: freeze_ms of a full dump, and of {a.cli} incrementals after it")
    print("(median, least; the inject step and the thaw, medians), ms; the thaw is not in freeze_ms;")
    print("way: new process, or through a `ckpt service` of the tree (--served)")
    table(cols, rows, a.markdown)


Way = tuple[str, str, bool]  # (tree's name, its root, through its service)


def _cli_rows(
    exe: Path, a: argparse.Namespace, mode: str, nt: int, ways: list[Way], services: dict[str, Service]
) -> list[list[str]]:
    """One target per way, a full dump of each, then N rounds of one incremental of each in turn."""
    procs: list[subprocess.Popen[bytes]] = []
    chans: list[LineChannel] = []
    dirs: list[str] = []
    try:
        for _ in ways:
            argv = [str(exe), mode, str(nt), str(a.mib)]
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            procs.append(p)
            chans.append(LineChannel(p, 60))
            assert chans[-1].readline().startswith("ready")
            dirs.append(tempfile.mkdtemp(prefix="ckpt-bench-cli-"))

        def one(i: int, incremental: bool) -> dict[str, float]:
            t, root, served = ways[i]
            if incremental and mode == "dirty":  # (--modes dirty: 1% of its pages written before each)
                assert chans[i].cmd("write 10").startswith("written")
            return _cli_dump(root, procs[i].pid, dirs[i], incremental, services[t] if served else None)

        full = [one(i, False) for i in range(len(ways))]
        incr: list[list[dict[str, float]]] = [[] for _ in ways]
        for _ in range(a.cli):
            for i in range(len(ways)):
                incr[i].append(one(i, True))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    rows = []
    for i, (t, _, served) in enumerate(ways):
        runs = incr[i]

        def med(k: str, runs: list[dict[str, float]] = runs) -> str:
            return f"{statistics.median(r.get(k, 0.0) for r in runs):.2f}"

        rows.append(
            [
                f"{mode} {a.mib} MiB",
                str(nt),
                t,
                "service" if served else "new process",
                f"{full[i]['freeze']:.1f}",
                med("freeze"),
                f"{min(r['freeze'] for r in runs):.2f}",
                med("frozen: collect: inject"),
                med("frozen: thaw"),
            ]
        )
    return rows


def scale(exe: Path, a: argparse.Namespace) -> None:
    rows: list[list[str]] = []
    counted: list[tuple[str, list[dict[str, float]]]] = []
    modes = {"default": None, "on": True, "off": False}
    cols_ph = [CPU, WAIT, *LIVE, *PHASES]
    for mib in (int(x) for x in a.scale.split(",")):
        for pc in a.precopy.split(","):
            by_fw: dict[str, list[list[dict[str, float]]]] = {}
            for _ in range(a.repeat):
                for fw, ip in settings(a):
                    poll(ip)
                    by_fw.setdefault(f"{fw}/{ip}", []).append(
                        scale_run(exe, mib, a.track, modes[pc], a.stream, fw == "on")
                    )
            for fw, runs in by_fw.items():
                for i, kind in enumerate(("full", f"incr 1% ({pc})")):
                    kind += label(fw)
                    if i == 0 and pc != a.precopy.split(",")[0]:
                        continue  # one full row per size
                    counted.append((f"{mib} MiB {kind}", [r[i] for r in runs]))
                    keys = ("freeze", "dirty", "live", *cols_ph)
                    med = {k: statistics.median(r[i].get(k, 0.0) for r in runs) for k in keys}
                    low = min(r[i]["freeze"] for r in runs)
                    ratio = statistics.median(r[0]["freeze"] / max(r[1]["freeze"], 1e-9) for r in runs)
                    rows.append(
                        [
                            f"{mib} MiB",
                            kind,
                            f"{med['dirty']:.0f}",
                            f"{med['live']:.0f}",
                            f"{med['freeze']:.1f}",
                            f"{low:.1f}",
                            "" if i == 0 else f"1/{ratio:.0f}",
                            *(f"{med[ph]:.1f}" for ph in cols_ph),
                        ]
                    )
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    busy = f", a thread writing {a.stream} pages/ms all the while" if a.stream else ""
    print(f"full dump, then 1% of pages written{busy}, then incremental; ms, median of {a.repeat}, {a.track}")
    print("live: pages copied before the freeze; precopy: its scan and copy (the process runs meanwhile)")
    names = [ph.replace("precopy: ", "live ").replace(CPU, "cpu").split(": ")[-1] for ph in cols_ph]
    cols = ["target", "dump", "dirty", "live", "freeze", "min", "incr/full", *names]
    table(cols, rows, a.markdown)
    count_table(counted, a.markdown)


# One run with the ckpt of a given tree (its own bench_freeze's one_run / scale_run), as JSON.
# --counts: COUNTS_FROM names this tree's bench folder, whose freezecounts.py counts in either tree.
_ONE = """
import json, sys
root, kind, mode, nt, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sys.path[:0] = [root + "/bench", root]
import bench_freeze as bf  # first: it imports ckpt (and numpy) with SIGCHLD blocked
if len(sys.argv) > 6:
    sys.path.append(sys.argv[6])
    import freezecounts
    freezecounts.install()
exe = bf.build_target()
runs = bf.one_run(exe, mode, nt, mib, "uffd-wp") if kind == "idle" else bf.scale_run(exe, mib, "uffd-wp")
if len(sys.argv) > 6:
    freezecounts.attach(runs)
print(json.dumps(runs))
"""


def ab(a: argparse.Namespace) -> None:
    """--base DIR: that tree's ckpt and this one, one run each in turn (a process each), per target."""
    cfgs = [
        ("idle", m, nt, a.mib) for m in a.modes.split(",") for nt in (int(x) for x in a.threads.split(","))
    ]
    if a.scale:
        cfgs = [("scale", "dirty", 1, int(x)) for x in a.scale.split(",")]
    rows = []
    counted: list[tuple[str, list[dict[str, float]]]] = []
    spread: list[tuple[str, list[dict[str, float]]]] = []
    extra = [str(ROOT / "bench")] if a.counts else []
    for kind, mode, nt, mib in cfgs:
        got: dict[str, list[list[dict[str, float]]]] = {"base": [], "this": []}
        for _ in range(a.repeat):
            for tree, root in (("base", a.base), ("this", str(ROOT))):
                argv = [sys.executable, "-c", _ONE, root, kind, mode, str(nt), str(mib), *extra]
                out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
                got[tree].append(json.loads(out.strip().splitlines()[-1]))
        for tree, runs in got.items():
            f = [r[0]["freeze"] for r in runs]
            i = [r[1]["freeze"] for r in runs]
            cpu = [r[1][CPU] for r in runs if CPU in r[1]]
            # (an older tree's rows have no "wait": taken from its freeze and cpu here)
            wait = [max(r[1]["freeze"] - r[1][CPU], 0.0) for r in runs if CPU in r[1]]
            ratio = statistics.median(x / max(y, 1e-9) for x, y in zip(f, i, strict=True))
            ph = [f"{statistics.median(r[1].get(k, 0.0) for r in runs):.1f}" for k in AB_PHASES]
            name = f"{mode} {mib} MiB" if kind == "idle" else f"{mib} MiB, 1% written"
            counted += [(f"{name} {nt} thr {tree} full", [r[0] for r in runs])]
            counted += [(f"{name} {nt} thr {tree} incr", [r[1] for r in runs])]
            rows.append(
                [
                    name,
                    str(nt),
                    tree,
                    f"{statistics.median(f):.1f} / {min(f):.1f}",
                    f"{statistics.median(i):.1f} / {min(i):.1f}",
                    f"1/{ratio:.0f}",
                    f"{statistics.median(cpu):.1f} / {min(cpu):.1f}" if cpu else "-",
                    f"{statistics.median(wait):.1f} / {min(wait):.1f}" if wait else "-",
                    ", ".join(ph),
                ]
            )
            spread.append((f"{name} {nt} thr {tree}", [r[1] for r in runs]))
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"base {a.base} and this tree, alternated, {a.repeat} runs each; freeze ms median / least;")
    print("incremental phases (medians): " + ", ".join(k.removeprefix("frozen: ") for k in AB_PHASES))
    print("incr cpu: the dumper's CPU while frozen; incr wait: freeze - cpu (held while no thread of the")
    print("dumper ran: the target's stops, a CPU to be had); both median / least")
    cols = ["target", "thr", "tree", "full freeze", "incr freeze", "incr/full", "incr cpu", "incr wait"]
    cols.append("incr phases")
    table(cols, rows, a.markdown)
    if a.spread:
        spread_table(spread, a.markdown)
    count_table(counted, a.markdown)


def _spread(v: list[float]) -> str:
    return f"{statistics.median(v):.1f} / {min(v):.1f} / {max(v):.1f}"


def spread_table(rows: list[tuple[str, list[dict[str, float]]]], markdown: bool) -> None:
    """--spread: each incremental phase as median / least / most over the runs: a phase whose median
    is far above its least while its CPU is not is waiting (for the target to be scheduled)."""
    keys = ["freeze", CPU, *AB_PHASES]
    print()
    print("incremental, per phase: median / least / most (ms)")
    table(
        ["target", *(k.removeprefix("frozen: ").removeprefix("collect: ").replace(CPU, "cpu") for k in keys)],
        [
            [
                name,
                *(_spread([r.get(k, 0.0) for r in runs]) for k in keys),
            ]
            for name, runs in rows
        ],
        markdown,
    )


AB_PHASES = (
    "frozen: seize", "frozen: track", "frozen: collect: inject", "frozen: scan", "frozen: copy",
    "frozen: smaps", "frozen: thaw",
)  # fmt: skip


def floor(exe: Path, a: argparse.Namespace) -> None:
    keys = ("seize", "scan", "batch", "smaps", "thaw")
    rows = []
    for mib in (int(x) for x in a.floor.split(",")):
        runs = [floor_run(exe, mib) for _ in range(a.repeat)]
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        total = statistics.median(sum(r.values()) for r in runs)
        bare = statistics.median(sum(v for k, v in r.items() if k != "smaps") for r in runs)
        rows.append([f"{mib} MiB", f"{bare:.1f}", f"{total:.1f}", *(f"{med[k]:.1f}" for k in keys)])
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"the floor of an incremental's freeze (1% written), ms, median of {a.repeat}: seize,")
    print("uffd-wp scans, one injected batch of one call, smaps walk, thaw; 'bare' leaves smaps out")
    table(["target", "bare", "with smaps", *keys], rows, a.markdown)


if __name__ == "__main__":
    main()
