"""Issue 10: --auto-converge's cgroup v2 `cpu.max` throttle, on a kernel where the cpu controller is
on cgroup v2 (the project's machines bind it to v1, so this path never runs there).

tests/vm/test_cgthrottle_guest.py runs this in the QEMU guest (Debian's kernel, nothing mounted on
/sys/fs/cgroup). It mounts cgroup2 there itself and runs, against real processes (the CPU-bound
tests/targets/cpuhog), the checks tests/test_cgthrottle.py runs on the host's v1 path:
- the root cgroup without cpu in its subtree_control: v2 refused, saying why (ckpt does not change
  the root), and the freezer's duty cycle chosen (no v1 hierarchy here; cgthrottle.FreezeCycle);
- `+cpu` in the root's subtree_control (the set-up a v2 machine has): the target in the root; the
  quota steps 20%, 30%, ... 90% as stated in cpu.max; every thread in the throttle cgroup; the
  kernel throttles it (cpu.stat nr_throttled > 0 after a fixed amount of CPU work); back in the
  root, the cgroup gone;
- the target alone in a cgroup of its own (/app): the no-internal-process rule handled (moved into
  the child first, +cpu on /app, undone before it goes back);
- /app shared with another process: v2 cpu.max refused, saying why (the freezer's cycle chosen);
- with --migrations (the host test passes it under CKPT_VM_FULL=1: ~3 min of TCG, so not in every CI
  run): `ckpt migrate --auto-converge` in the guest, once succeeding and once failing before the
  commit: v2 cpu.max reported per round, the original back in its cgroup, no cgroup left.
Writes JSON to --out; exits 1 if a check failed. Runs only in the guest (CKPT_VM=1): it mounts
cgroup2 and changes the root cgroup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

CG = Path("/sys/fs/cgroup")


class Check:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.done: list[str] = []
        self.facts: dict[str, Any] = {}

    def __call__(self, ok: object, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def run(self, name: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic()
        try:
            fn()
            self.done.append(name)
        except Exception:
            self.failures.append(f"{name}: {traceback.format_exc()}")
        self.facts.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpuhog", required=True)
    ap.add_argument("--dirtier", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--migrations", action="store_true", help="also two whole migrations (~3 min of TCG)")
    a = ap.parse_args()
    if os.environ.get("CKPT_VM") != "1":
        print(
            "guest_cgthrottle.py mounts cgroup2 and changes the root cgroup: it runs only in the VM",
            file=sys.stderr,
        )
        return 2

    from ckpt.migrate.cgthrottle import PERIOD_US, PREFIX, AutoConverge, CpuMax, membership
    from tests.util import Target

    c = Check()
    started: list[Target] = []

    def hog() -> Target:
        t = Target([a.cpuhog], timeout=120)
        started.append(t)
        return t

    def tasks(pid: int) -> dict[int, str | None]:
        return {int(x): membership(pid, int(x)).v2 for x in os.listdir(f"/proc/{pid}/task")}

    def leftovers() -> list[str]:
        return sorted(str(p) for p in CG.rglob(f"{PREFIX}*"))

    def emptied(cg: Path) -> None:
        """Until cgroup `cg` holds no process: the target's forked child dies of its PDEATHSIG only
        after the target, and rmdir right after the kill can meet it (EBUSY). cgroup.events
        signals each change (POLLPRI), so the wait is woken by it."""
        with open(cg / "cgroup.events") as f:
            while True:
                f.seek(0)
                if "populated 0" in f.read():
                    return
                if not select.select([], [], [f], 60)[2]:
                    raise TimeoutError(f"{cg} still populated after 60 s")

    def cpu_max(q: CpuMax) -> str:
        return (q.child / "cpu.max").read_text().strip()

    subprocess.run(["mount", "-t", "cgroup2", "cgroup2", str(CG)], check=True)
    c.facts["mounted"] = Path("/proc/self/cgroup").read_text().strip()

    def root_without_cpu() -> None:
        t = hog()
        ac = AutoConverge([t.pid])
        try:
            c.facts["root_without_cpu"] = {"mechanism": ac.mechanism, "not_used": ac.not_used}
            # (the freezer's cycle: no controller needed, before the signals' cycle)
            c(ac.mechanism.startswith("cgroup v2 freezer duty cycle"), f"no cpu in the root: {ac.mechanism}")
            c(any("root cgroup's cgroup.subtree_control" in w for w in ac.not_used), f"reason: {ac.not_used}")
        finally:
            ac.close()
        c(leftovers() == [], f"left: {leftovers()}")

    def steps(where: str) -> None:
        """The host test's checks, in cgroup `where` (created if not the root)."""
        t = hog()
        home = CG / where.lstrip("/")
        if where != "/":
            home.mkdir()
            (home / "cgroup.procs").write_text(str(t.pid))
        before = tasks(t.pid)
        c(set(before.values()) == {where} and len(before) == 2, f"{where}: before: {before}")
        ac = AutoConverge([t.pid])
        q = ac.impl
        fact: dict[str, Any] = {"mechanism": ac.mechanism, "not_used": ac.not_used}
        c.facts[f"steps {where}"] = fact
        try:
            assert isinstance(q, CpuMax) and q.v2, f"{where}: {ac.mechanism} {ac.not_used}"
            fact["enabled_cpu"] = q.enabled_cpu
            c(q.enabled_cpu == (where != "/"), f"{where}: enabled_cpu {q.enabled_cpu}")
            ours = q.child.parent == home and q.child.name.startswith(f"{PREFIX}{t.pid}.")
            c(ours, f"{where}: child {q.child}")
            if q.enabled_cpu:  # moved in first, so that /app may hand cpu to its child
                c("cpu" in (home / "cgroup.subtree_control").read_text().split(), f"{where}: no +cpu")
            c(t.cmd("burn 50") == "burnt 50", "burn 50")
            quotas = []
            for i in range(8):
                frac = round(0.2 + 0.1 * i, 2)
                ac.set(frac)
                assert q.base is not None
                want = max(1000, int(PERIOD_US * q.base * (1 - frac)))
                quotas.append(cpu_max(q))
                c(cpu_max(q) == f"{want} {PERIOD_US}", f"{where}: {frac}: cpu.max {cpu_max(q)} != {want}")
                c(ac.setting == f"cpu.max {want}/{PERIOD_US} us", f"{where}: setting {ac.setting}")
                inside = str(Path(where) / q.child.name)
                c(set(tasks(t.pid).values()) == {inside}, f"{where}: threads {tasks(t.pid)}")
            fact["quotas"] = quotas
            fact["base"] = q.base
            ints = [int(x.split()[0]) for x in quotas]
            c(ints == sorted(ints, reverse=True) and len(set(ints)) == len(ints), f"{where}: {quotas}")
            c(t.cmd("burn 30") == "burnt 30", "burn 30")
            stat = dict(ln.split() for ln in (q.child / "cpu.stat").read_text().splitlines())
            fact["cpu.stat"] = stat
            c(
                int(stat["nr_throttled"]) > 0 and int(stat["throttled_usec"]) > 0,
                f"{where}: not throttled: {stat}",
            )
            ac.pause()
            c(cpu_max(q) == f"max {PERIOD_US}", f"{where}: paused: {cpu_max(q)}")
            ac.resume()
            c(cpu_max(q) == quotas[-1], f"{where}: resumed: {cpu_max(q)}")
            child = int(t.cmd("fork").split()[1])
            c(membership(child).v2 == inside, f"{where}: forked child in {membership(child).v2}")
        finally:
            ac.close()
        fact["report"] = ac.report()
        c(tasks(t.pid) == before, f"{where}: after: {tasks(t.pid)} != {before}")
        c(membership(child).v2 == where, f"{where}: forked child after: {membership(child).v2}")
        c(not q.child.exists() and leftovers() == [], f"{where}: left: {leftovers()}")
        c(
            "cpu" not in (home / "cgroup.subtree_control").read_text().split() or where == "/",
            f"{where}: +cpu left on",
        )
        c(fact["report"]["nr_throttled"] > 0, f"{where}: report {fact['report']}")
        c(t.cmd("burn 1") == "burnt 1", "runs on")
        t.close()
        if where != "/":
            emptied(home)
            home.rmdir()

    def shared() -> None:
        t, other = hog(), hog()
        home = CG / "shared"
        home.mkdir()
        for p in (t.pid, other.pid):
            (home / "cgroup.procs").write_text(str(p))
        ac = AutoConverge([t.pid])
        try:
            c.facts["shared"] = {"mechanism": ac.mechanism, "not_used": ac.not_used}
            c(ac.mechanism.startswith("cgroup v2 freezer duty cycle"), f"shared: {ac.mechanism}")
            c(any("1 other process(es)" in w for w in ac.not_used), f"shared: {ac.not_used}")
        finally:
            ac.close()
        c(leftovers() == [], f"left: {leftovers()}")
        t.close()
        other.close()
        emptied(home)
        home.rmdir()

    def migrations() -> None:
        """ckpt serve + ckpt migrate --auto-converge in the guest, in a cgroup of the target's own."""
        import ctypes

        from tests.test_migrate import ENV, PR_SET_CHILD_SUBREAPER, Server

        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # the guest boots with lo down
        # The restored copy is serve's orphan: ours to reap.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        out: dict[str, Any] = {}
        c.facts["migrations"] = out
        for fail in (False, True):
            name = "failing migration" if fail else "migration"
            home = CG / "mig"
            home.mkdir()
            t = Target([a.dirtier, "512", "300"], timeout=120, stderr=subprocess.DEVNULL)
            started.append(t)
            (home / "cgroup.procs").write_text(str(t.pid))
            srv = Server(Path(tempfile.mkdtemp()) / "dst")
            try:
                menv = dict(ENV, CKPT_MIGRATE_TEST_FAIL_AT_READY="1") if fail else ENV
                m = subprocess.run(
                    [sys.executable, "-m", "ckpt", "migrate", "--pid", str(t.pid), "--to", srv.addr, "--json",
                     "--policy", "rounds:5", "--bandwidth", "2MB/s", "--auto-converge"],
                    capture_output=True, text=True, env=menv, timeout=600,
                )  # fmt: skip
                lines = [json.loads(x) for x in m.stdout.splitlines() if x.strip()]
                rec = {
                    "rc": m.returncode,
                    "stderr": m.stderr[-2000:],
                    "rounds": [
                        (x.get("throttle"), x.get("throttle_setting")) for x in lines if x.get("kind")
                    ],
                    "throttle": lines[-1].get("throttle") if lines else None,
                }
                out[name] = rec
                if fail:
                    c(
                        m.returncode == 1 and f"the original process {t.pid} runs on" in m.stderr,
                        f"{name}: {rec}",
                    )
                    c(
                        "; the CPU throttle (cgroup v2 cpu.max" in m.stderr,
                        f"{name}: throttle not said: {rec}",
                    )
                    c(membership(t.pid).v2 == "/mig", f"{name}: after: {membership(t.pid)}")
                    c(t.cmd("check").startswith("ok "), f"{name}: the original is not well")
                else:
                    c(m.returncode == 0, f"{name}: {rec}")
                    thr = rec["throttle"] or {}
                    mech = str(thr.get("mechanism", ""))
                    c(mech.startswith(f"cgroup v2 cpu.max ({home}/{PREFIX}"), f"{name}: {thr}")
                    c(
                        any(f and f > 0 and str(s).startswith("cpu.max ") for f, s in rec["rounds"]),
                        f"{name}: {rec}",
                    )
                    srv.done()
                    c(srv.chan.cmd("check").startswith("ok "), f"{name}: the copy is not well")
                sub = (home / "cgroup.subtree_control").read_text().split()
                c(leftovers() == [] and "cpu" not in sub, f"{name}: left {leftovers()} {sub}")
            finally:
                srv.close()
                t.close()
            emptied(home)
            home.rmdir()

    try:
        c.run("root without cpu", root_without_cpu)
        (CG / "cgroup.subtree_control").write_text("+cpu")
        c.run("root", lambda: steps("/"))
        c.run("own cgroup", lambda: steps("/app"))
        c.run("shared cgroup", shared)
        if a.migrations:
            c.run("migrations", migrations)
    finally:
        for t in started:
            with contextlib.suppress(Exception):
                t.close()
    res = {"failures": c.failures, "done": c.done, "facts": c.facts, "kernel": os.uname().release}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    for x in c.failures:
        print(x, file=sys.stderr)
    return 1 if c.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
