"""--auto-converge through the CFS bandwidth controller: the target moved into a child cgroup of its
own cgroup whose quota is (1 - fraction) of the CPU it used, and moved back when the throttle ends.

The order of choice (`AutoConverge`): cgroup v2 `cpu.max`, then the cgroup v1 `cpu` hierarchy
(`cpu.cfs_quota_us` / `cpu.cfs_period_us`, which hybrid systems such as this project's machines
still have), then a duty cycle of the cgroup v2 freezer (`FreezeCycle`: no controller needed, and
no job control touched), then, last, the SIGSTOP/SIGCONT duty cycle (throttle.DutyCycle), whose
signals are job control: it never ends a stop of someone else's it can tell, and the one it cannot
(a stop sent while its own SIGSTOP is on its way) is why it comes last. Each mechanism not used
says why (`AutoConverge.not_used`).

The throttle cgroup is always a child of the cgroup the target is in, never a sibling or a new
top-level group: hierarchical limits (cpu.max or cfs quota, memory.max, pids.max of the target's
cgroup and its ancestors) then still hold for it, pages it allocates while throttled are charged
inside its own subtree, and a delegated (non-root) user can create it, since it lies in the subtree
delegated to them. A sibling would let the process escape its limits for the length of the
migration.

cgroup v2 allows no processes in a non-root cgroup that hands a controller to its children. Where
the target's cgroup has `cpu` available but not enabled for children, and holds only the target's
processes and no child cgroups, the target is first moved into the new child, then `+cpu` is
written to its cgroup's `cgroup.subtree_control`, and undone (`-cpu`) before it goes back. A cgroup
shared with other processes, or one with children of its own, is not changed: the next mechanism
is used instead. ckpt never enables a controller in the root cgroup (that would change every
top-level cgroup of the machine).

The child is created for this migration and removed with it, on every path (success, failure,
Ctrl-C/SIGTERM/SIGHUP/SIGQUIT, which are held off while processes move): every process in it,
also any the target forked meanwhile, goes back to exactly the cgroup the target came from. A
cgroup that cannot be removed is said, never left silently. A SIGKILL of ckpt runs none of that:
the guard (ckpt/migrate/guard.py), a tiny process that outlives ckpt, does it then. Where the guard
died too, the cgroup is an orphan: its name, `ckpt-throttle-TARGET.OWNER.START[.cpu]`, names the
ckpt process that made it (pid and start time, so a reused pid is not taken for it, and `.cpu`
where it enabled cpu in its parent), and the next `ckpt migrate` of a process in it or beside it
removes it once that owner is gone (`reap_orphans`)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt.migrate.guard import Guard, empty_cgroup, start_time
from ckpt.migrate.throttle import DutyCycle, cycle_setting
from ckpt.ptrace.signals import deferred_signals
from ckpt.threadpool import start as start_thread

PERIOD_US = 100_000
PREFIX = "ckpt-throttle-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)\.(\d+)\.(\d+)(\.cpu)?")


def child_name(target: int, enable: bool) -> str:
    """The throttle cgroup's name: the target, and the ckpt process that owns it (see above)."""
    return f"{PREFIX}{target}.{os.getpid()}.{start_time(os.getpid())}" + (".cpu" if enable else "")


@dataclass(frozen=True)
class Mount:
    point: str
    root: str  # the directory of the hierarchy mounted there ("/" unless a bind or a cgroup namespace)
    fstype: str  # "cgroup" | "cgroup2"
    options: tuple[str, ...]  # super options: the v1 controllers bound to the hierarchy


def mounts() -> list[Mount]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                out.append(Mount(fields[4], fields[3], tail[0], tuple(tail[2].split(","))))
    return out


@dataclass(frozen=True)
class Membership:
    """Where a task is: its v2 path (the "0::" line) and its path in the v1 hierarchy that holds the
    cpu controller, each None where there is none."""

    v2: str | None
    v1cpu: str | None


def membership(pid: int, tid: int | None = None) -> Membership:
    v2 = v1 = None
    where = f"/proc/{pid}/task/{tid}/cgroup" if tid is not None else f"/proc/{pid}/cgroup"
    with open(where) as f:
        for line in f:
            hid, ctrl, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and ctrl == "":
                v2 = path
            elif "cpu" in ctrl.split(","):
                v1 = path
    return Membership(v2, v1)


def _resolve(ms: list[Mount], fstype: str, path: str) -> Path | None:
    """The directory of cgroup `path` under a mount of the hierarchy, or None where none shows it."""
    for m in ms:
        if m.fstype != fstype or (fstype == "cgroup" and "cpu" not in m.options):
            continue
        root = m.root.rstrip("/")
        if path == root or path.startswith(root + "/"):
            return Path(m.point) / path[len(root) :].lstrip("/")
    return None


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of the processes (all their threads)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _write(p: Path, s: str) -> None:
    with open(p, "w") as f:
        f.write(s)


def _procs(cg: Path) -> list[int]:
    return [int(x) for x in (cg / "cgroup.procs").read_text().split()]


def _empty(cg: Path, home: Path, cpu_on: bool) -> tuple[bool, list[int]]:
    return empty_cgroup(str(cg), str(home), cpu_on)  # (guard.py: the one copy, stdlib only)


def _stat(cg: Path) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in (cg / "cpu.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[k] = int(v)
    return out


def _limit(cg: Path, v2: bool) -> float | None:
    """The CPUs cgroup `cg`'s own quota allows, None where it has none."""
    try:
        if v2:
            q, _, per = (cg / "cpu.max").read_text().partition(" ")
        else:
            q, per = (cg / "cpu.cfs_quota_us").read_text(), (cg / "cpu.cfs_period_us").read_text()
        return int(q) / int(per) if q.strip() not in ("max", "-1") else None
    except (OSError, ValueError):
        return None  # the root has no cpu.max


class Refused(Exception):
    """This mechanism cannot be used here; the message says why."""


def _where(pids: Sequence[int]) -> tuple[list[Mount], Membership]:
    """The cgroup mounts and the one cgroup every thread of the processes is in (else Refused)."""
    ms = mounts()
    homes = {membership(p) for p in pids}
    for p in pids:
        for tid in os.listdir(f"/proc/{p}/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                if membership(p, int(tid)) not in homes:
                    raise Refused(f"the threads of pid {p} are in different cgroups")
    if len(homes) != 1:
        raise Refused("the processes are in different cgroups")
    (where,) = homes
    return ms, where


class CpuMax:
    """A child cgroup holding the target's processes, with a CPU quota. `mechanism` says which kind."""

    def __init__(
        self, pids: Sequence[int], home: Path, child: Path, v2: bool, cpus: float, guard: Guard | None = None
    ) -> None:
        self.pids, self.home, self.child, self.v2, self.cpus = list(pids), home, child, v2, cpus
        self.guard = guard
        self.fraction = 0.0
        self.inside = False
        self.enabled_cpu = False  # we wrote +cpu to home's cgroup.subtree_control
        # A quota caps CPU time; it slows a process only below what it gets anyway. On a loaded
        # machine a process may get a tenth of a CPU, where a quota of "50% of a CPU" changes
        # nothing. So the throttle is relative to the CPU the process used before it began.
        self.t0, self.cpu0 = time.monotonic(), _cpu_seconds(self.pids)
        self.base: float | None = None  # CPUs the process used unthrottled
        self.quota_us: int | None = None  # the quota last written (None: no limit)
        self.stats: dict[str, int] = {}  # the child's cpu.stat, read just before it is removed
        self.left: str | None = None  # why the child could not be removed (None: it was)
        self.closed = False
        self.mechanism = f"cgroup {'v2 cpu.max' if v2 else 'v1 cpu.cfs_quota_us'} ({child})"

    @classmethod
    def open(cls, pid: int) -> CpuMax | None:
        """A throttle for `pid`, or None where no cgroup CPU controller can be used."""
        return cls.choose([pid], [])

    @classmethod
    def choose(cls, pids: Sequence[int], why: list[str], guard: Guard | None = None) -> CpuMax | None:
        """v2 first, then v1; None where neither can be used, with the reasons appended to `why`."""
        try:
            ms, where = _where(pids)
            cpus = float(min(sum(len(os.listdir(f"/proc/{p}/task")) for p in pids), os.cpu_count() or 1))
        except (OSError, ValueError, Refused) as e:
            why.append(f"cgroups: {e}")
            return None
        for v2, path in ((True, where.v2), (False, where.v1cpu)):
            kind = "v2 cpu.max" if v2 else "v1 cpu"
            home = _resolve(ms, "cgroup2" if v2 else "cgroup", path) if path is not None else None
            if home is None:
                why.append(f"{kind}: no {'cgroup2' if v2 else 'cgroup v1 cpu'} hierarchy holds the process")
                continue
            try:
                with deferred_signals():
                    return cls._make(pids, home, v2, cpus, guard)
            except Refused as e:
                why.append(f"{kind}: {e}")
            except OSError as e:
                why.append(f"{kind}: {home}: {e.strerror or e}")
        return None

    @classmethod
    def _make(cls, pids: Sequence[int], home: Path, v2: bool, cpus: float, guard: Guard | None) -> CpuMax:
        enable = False
        if v2:
            if "cpu" not in (home / "cgroup.controllers").read_text().split():
                raise Refused(
                    f"the cpu controller is not available in {home} "
                    "(bound to a v1 hierarchy, or not enabled above)"
                )
            if "cpu" not in (home / "cgroup.subtree_control").read_text().split():
                if os.path.ismount(home):
                    raise Refused(
                        "cpu is not enabled in the root cgroup's cgroup.subtree_control "
                        "(ckpt does not change the root)"
                    )
                others = set(_procs(home)) - set(pids)
                if others:
                    raise Refused(
                        f"{home} holds {len(others)} other process(es): v2 lets no cgroup with processes "
                        "give cpu to a child"
                    )
                if any(d.is_dir() for d in home.iterdir()):
                    raise Refused(f"{home} has child cgroups, whose cpu control enabling it would change")
                enable = True
        elif not (home / "cpu.cfs_quota_us").exists():
            raise Refused(f"no cpu.cfs_quota_us in {home} (a kernel without CONFIG_CFS_BANDWIDTH)")
        # The process cannot use more than its cgroup's quota; v1 would refuse a child quota above
        # it (EINVAL), v2 would ignore the excess.
        if (lim := _limit(home, v2)) is not None:
            cpus = min(cpus, lim)
        child = home / child_name(pids[0], enable)
        if guard is not None:  # told first: a SIGKILL right after the mkdir is undone too
            guard.tell({"cg": str(child), "home": str(home), "enabled": enable})
        child.mkdir(mode=0o755)
        t = cls(pids, home, child, v2, cpus, guard)
        try:
            if enable:
                # No processes may stay in home while it hands cpu to its child: in first.
                t._move_in()
                _write(home / "cgroup.subtree_control", "+cpu")
                t.enabled_cpu = True
            if v2 and not (child / "cpu.max").exists():
                raise Refused(f"{child} has no cpu.max")
            t._quota(None)
        except BaseException:
            t.close()
            raise
        return t

    def _move_in(self) -> None:
        # cgroup.procs moves every thread of the process, in v1 as in v2.
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                _write(self.child / "cgroup.procs", str(pid))
        self.inside = True

    def _quota(self, fraction: float | None) -> None:
        if fraction is None or fraction <= 0:
            self.quota_us = None
            q = "max" if self.v2 else "-1"
        else:
            self.quota_us = max(1000, int(PERIOD_US * (self.base or self.cpus) * (1 - fraction)))
            q = str(self.quota_us)
        if self.v2:
            _write(self.child / "cpu.max", f"{q} {PERIOD_US}")
        else:
            _write(self.child / "cpu.cfs_period_us", str(PERIOD_US))
            _write(self.child / "cpu.cfs_quota_us", q)

    @property
    def setting(self) -> str:
        """The quota as written, for the round's report."""
        if self.quota_us is None:
            return "no limit"
        return f"{'cpu.max' if self.v2 else 'cpu.cfs_quota_us'} {self.quota_us}/{PERIOD_US} us"

    def set(self, fraction: float) -> None:
        if self.base is None:
            spent = time.monotonic() - self.t0
            used = (_cpu_seconds(self.pids) - self.cpu0) / spent if spent > 0 else self.cpus
            self.base = min(max(used, 0.01), self.cpus)
        self.fraction = min(max(fraction, 0.0), 0.99)
        with deferred_signals():
            if not self.inside:
                self._move_in()
            self._quota(self.fraction)

    def pause(self) -> None:
        """No quota while a round freezes the process (a throttled thread would make the freeze
        wait for the next period)."""
        if self.inside:
            with contextlib.suppress(OSError):
                self._quota(None)

    def resume(self) -> None:
        if self.inside and self.fraction > 0:
            with contextlib.suppress(OSError):
                self._quota(self.fraction)

    def close(self) -> None:
        """Every process of the child back into the cgroup the target came from; the child removed.
        Safe to call again."""
        if self.closed:
            return
        with deferred_signals():
            self.stats = _stat(self.child)
            self.enabled_cpu = _give_back(self, self.enabled_cpu)

    def report(self) -> dict[str, Any]:
        s = self.stats
        ns = s.get("throttled_time", s.get("throttled_usec", 0) * 1000)
        return {
            "cgroup": str(self.child),
            "base_cpus": self.base,  # exact: the quotas reported per round follow from it
            "nr_periods": s.get("nr_periods"),
            "nr_throttled": s.get("nr_throttled"),
            "throttled_ms": round(ns / 1e6, 3),
        }


def _give_back(t: CpuMax | FreezeCycle, cpu_on: bool) -> bool:
    """The close of a throttle cgroup (signals deferred by the caller): every process of `t.child`
    back into `t.home`, the child removed (`t.left` says why not, and the guard keeps it then), the
    guard told once it is gone. Returns whether home still gives cpu to its children."""
    cpu_on, _ = _empty(t.child, t.home, cpu_on)
    t.inside = False
    try:
        t.child.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        t.left = f"{t.child} could not be removed: {e.strerror or e}"
    t.closed = True
    if t.guard is not None and t.left is None:
        t.guard.tell({"cg": None})
    return cpu_on


class FreezeCycle:
    """The duty cycle without job control: the processes moved into a child of their own cgroup v2
    cgroup (as CpuMax does, named so too: its guard and reap_orphans treat it alike), which is
    frozen (`cgroup.freeze`) for `fraction` of every 100 ms period and thawed for the rest.

    For where no CPU quota can be set (the cpu controller bound to v1, or not delegated) while the
    freezer, core in every non-root v2 cgroup, is there. Unlike the SIGSTOP/SIGCONT cycle it never
    sends a signal: a stop of someone else's (a shell's Ctrl-Z, a debugger's SIGSTOP) that comes
    while frozen stays pending and takes effect at the thaw; one in effect is left as it is (a
    stopped task counts as frozen, and a thaw does not continue it). Each freeze is waited for on
    `cgroup.events` ("frozen 1", poll POLLPRI: the kernel notifies the file), not by sleeping."""

    PERIOD = 0.1

    def __init__(self, pids: Sequence[int], home: Path, child: Path, guard: Guard | None = None) -> None:
        self.pids, self.home, self.child, self.guard = list(pids), home, child, guard
        self.fraction = 0.0
        self.inside = False
        self.periods_frozen = 0  # periods whose freeze completed (cgroup.events "frozen 1")
        self.left: str | None = None  # why the child could not be removed (None: it was)
        self.halted = ""  # why the cycle ended by itself (a write refused)
        self.closed = False
        self.mechanism = f"cgroup v2 freezer duty cycle ({child})"
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # pause() wakes the cycle
        self._stop = False
        self._thread: threading.Thread | None = None

    @classmethod
    def choose(cls, pids: Sequence[int], why: list[str], guard: Guard | None = None) -> FreezeCycle | None:
        """A freezer cycle for the processes, or None with the reason appended to `why`."""
        try:
            ms, where = _where(pids)
        except (OSError, ValueError, Refused) as e:
            why.append(f"v2 freezer: {e}")
            return None
        home = _resolve(ms, "cgroup2", where.v2) if where.v2 is not None else None
        if home is None:
            why.append("v2 freezer: no cgroup2 hierarchy holds the process")
            return None
        try:
            with deferred_signals():
                return cls._make(pids, home, guard)
        except Refused as e:
            why.append(f"v2 freezer: {e}")
        except OSError as e:
            why.append(f"v2 freezer: {home}: {e.strerror or e}")
        return None

    @classmethod
    def _make(cls, pids: Sequence[int], home: Path, guard: Guard | None) -> FreezeCycle:
        kind = home / "cgroup.type"  # (the root has none)
        if kind.exists() and kind.read_text().strip() != "domain":
            raise Refused(f"{home} is a {kind.read_text().strip()} cgroup")
        child = home / child_name(pids[0], False)
        if guard is not None:  # told first: a SIGKILL right after the mkdir is undone too
            guard.tell({"cg": str(child), "home": str(home), "enabled": False})
        child.mkdir(mode=0o755)
        try:
            t = cls(pids, home, child, guard)  # (its eventfd: EMFILE would leave the child behind)
        except BaseException:
            with contextlib.suppress(OSError):
                child.rmdir()
                if guard is not None:
                    guard.tell({"cg": None})
            raise
        if not (child / "cgroup.freeze").exists():
            t.close()
            raise Refused(f"{child} has no cgroup.freeze (a kernel before 5.2)")
        return t

    @property
    def setting(self) -> str:
        return cycle_setting("frozen", self.PERIOD, self.fraction, self.halted)

    def set(self, fraction: float) -> None:
        self.fraction = min(max(fraction, 0.0), 0.99)
        if self.fraction <= 0 or self.halted:
            return
        if not self.inside:
            with deferred_signals():
                for pid in self.pids:  # (every thread: cgroup.procs)
                    with contextlib.suppress(ProcessLookupError):
                        _write(self.child / "cgroup.procs", str(pid))
                self.inside = True
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="ckpt-freeze-throttle", daemon=True)
            start_thread(self._thread)

    def _freeze(self, on: bool) -> None:
        _write(self.child / "cgroup.freeze", "1" if on else "0")

    def _slept(self, secs: float, events: int | None = None) -> bool:
        """Wait `secs` (the cycle's own timing), or with `events` until it shows "frozen 1" (then
        counted in periods_frozen); True when pause() woke it. The freeze is looked at before the
        wake-up, so that a freeze done when both come is counted."""
        p = select.poll()
        p.register(self._wake, select.POLLIN)
        if events is not None:
            p.register(events, select.POLLPRI)
        end = time.monotonic() + secs
        woken = False
        while True:
            if events is not None and b"frozen 1" in os.pread(events, 256, 0):
                self.periods_frozen += 1
                return woken
            left = end - time.monotonic()
            if woken or left <= 0:
                return woken
            fds = dict(p.poll(left * 1e3))
            woken = self._wake in fds
            if not fds:
                return False

    def _run(self) -> None:
        events: int | None = None
        try:
            # Inside the try: a failed open (EMFILE) halts the cycle and says why, as a failed
            # write does, instead of a traceback from the thread and a cycle silently gone.
            events = os.open(self.child / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
            while not self._stop:
                off = self.PERIOD * self.fraction
                t0 = time.monotonic()
                self._freeze(True)
                if self._slept(off, events):  # until every task is frozen (at most the off time)
                    break
                if self._slept(off - (time.monotonic() - t0)):
                    break
                self._freeze(False)
                if self._slept(self.PERIOD - off):
                    break
        except OSError as e:
            self.halted = f"the freezer failed: {e.strerror or e}"
        finally:
            with contextlib.suppress(OSError):
                self._freeze(False)
            if events is not None:
                os.close(events)

    def pause(self) -> None:
        """Thawed, not cycling (before a freeze, and at the end). The thaw is done when the write
        returns (the kernel wakes every task in it)."""
        self._stop = True
        if self._thread is not None:
            os.eventfd_write(self._wake, 1)
            self._thread.join()
            self._thread = None
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake)
        if self.inside:
            with contextlib.suppress(OSError):
                self._freeze(False)

    def resume(self) -> None:
        if self.fraction > 0 and not self.closed:
            self.set(self.fraction)

    def close(self) -> None:
        """Thawed, every process of the child back into the cgroup the target came from, the child
        removed. Safe to call again."""
        if self.closed:
            return
        self.pause()
        with deferred_signals():
            _give_back(self, False)
            os.close(self._wake)

    def report(self) -> dict[str, Any]:
        return {"cgroup": str(self.child), "periods_frozen": self.periods_frozen}


class AutoConverge:
    """The throttle of --auto-converge: a cgroup quota where one can be had, else the duty cycle.
    A cgroup that fails later (a write refused) gives way to the duty cycle, and says so."""

    def __init__(self, pids: Sequence[int], guard: Guard | None = None) -> None:
        self.pids = list(pids)
        self.not_used: list[str] = []
        # Started before anything is throttled: from here a SIGKILL of ckpt is undone by the guard.
        # (A migration passes the one it started for the whole migration, and closes it itself.)
        self._own_guard = guard is None
        self.guard = guard if guard is not None else Guard(self.pids)
        forced = os.environ.get("CKPT_MIGRATE_TEST_THROTTLE")  # a fallback, under test
        cg: CpuMax | FreezeCycle | None = None
        try:
            if forced in ("duty", "freeze"):
                self.not_used.append(f"cgroup quotas: not tried (CKPT_MIGRATE_TEST_THROTTLE={forced})")
            else:
                cg = CpuMax.choose(self.pids, self.not_used, self.guard)
            if forced == "duty":
                self.not_used.append("v2 freezer: not tried (CKPT_MIGRATE_TEST_THROTTLE=duty)")
            elif cg is None:  # no job control, unlike the signals' cycle: before it
                cg = FreezeCycle.choose(self.pids, self.not_used, self.guard)
        except BaseException:
            if self._own_guard:
                self.guard.close()
            raise
        self.impl: CpuMax | FreezeCycle | DutyCycle = (
            cg if cg is not None else DutyCycle(self.pids, self.guard)
        )
        self.cgroup: CpuMax | FreezeCycle | None = cg  # kept for its report after a fall-back

    @property
    def mechanism(self) -> str:
        return self.impl.mechanism

    @property
    def fraction(self) -> float:
        return self.impl.fraction

    @property
    def setting(self) -> str:
        return self.impl.setting

    @property
    def halted(self) -> str:
        """Why the throttle ended by itself ("" where it did not): a stop of someone else's that the
        signals' cycle will not end (throttle.DutyCycle), a freezer that failed."""
        return self.impl.halted if isinstance(self.impl, DutyCycle | FreezeCycle) else ""

    def _fall_back(self, why: str) -> None:
        """The cgroup mechanism failed: closed (the processes back in their own cgroup), said in
        not_used and the report, and the signals' cycle takes over."""
        self.impl.close()
        self.not_used.append(f"{self.impl.mechanism}: failed while throttling: {why}")
        self.impl = DutyCycle(self.pids, self.guard)

    def _halted_freezer(self) -> str:
        """Why the freezer's cycle ended by itself (its thread's write or open failed: the cgroup
        removed under it, a descriptor refused), "" where it did not. Its round said so already."""
        return self.impl.halted if isinstance(self.impl, FreezeCycle) else ""

    def set(self, fraction: float) -> None:
        if why := self._halted_freezer():
            self._fall_back(why)
        try:
            self.impl.set(fraction)
        except OSError as e:
            if isinstance(self.impl, DutyCycle):
                raise
            self._fall_back(e.strerror or str(e))
            self.impl.set(fraction)

    def pause(self) -> None:
        self.impl.pause()

    def resume(self) -> None:
        """Throttling again after a round's freeze; a freezer found failed gives way here."""
        if (why := self._halted_freezer()) and self.impl.fraction > 0:
            fraction = self.impl.fraction
            self._fall_back(why)
            self.impl.set(fraction)
            return
        self.impl.resume()

    def close(self) -> None:
        self.impl.close()
        if self.cgroup is not None:
            self.cgroup.close()
        if self._own_guard:
            self.guard.close()

    def note(self) -> str:
        """What became of the throttle, for a failure's message ("" where there was none)."""
        if self.impl.fraction <= 0 and not (self.cgroup and self.cgroup.left):
            return ""
        if self.cgroup is not None and self.cgroup.left:
            return f"; the throttle cgroup {self.cgroup.left}: remove it by hand"
        back = ", back in its own cgroup" if isinstance(self.impl, CpuMax | FreezeCycle) else ""
        return f"; the CPU throttle ({self.mechanism}) was lifted{back}"

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mechanism": self.mechanism, "not_used": self.not_used}
        if isinstance(self.impl, CpuMax | FreezeCycle):
            out.update(self.impl.report())
        return out


def _reap(cg: Path, enabled: bool) -> str | None:
    """An orphan's processes back into its parent, the orphan removed; what was done, or None."""
    home = cg.parent
    _, moved = _empty(cg, home, enabled)
    try:
        cg.rmdir()
    except FileNotFoundError:
        return None  # its guard, or another ckpt, was quicker
    except OSError as e:
        return f"the throttle cgroup {cg} left by a killed ckpt could not be removed: {e.strerror or e}"
    back = f" (process(es) {', '.join(map(str, sorted(set(moved))))} moved back to {home})" if moved else ""
    return f"removed the throttle cgroup {cg} left by a killed ckpt{back}"


def _orphan(cg: Path) -> bool | None:
    """Whether cg is a throttle cgroup whose owner is gone; None where it is not ours at all."""
    m = _NAME.fullmatch(cg.name)
    if m is None:
        return None
    return start_time(int(m.group(2))) != int(m.group(3))


def reap_orphans(pid: int) -> list[str]:
    """Throttle cgroups left by a ckpt killed together with its guard, where `pid` is (it is put
    back into its own cgroup) and beside it (other targets' orphans under the same cgroup); one
    line per cgroup handled. Cgroups whose owner still runs are left alone."""
    out: list[str] = []
    try:
        ms = mounts()
        where = membership(pid)
    except (OSError, ValueError):
        return out
    for fstype, path in (("cgroup2", where.v2), ("cgroup", where.v1cpu)):
        d = _resolve(ms, fstype, path) if path is not None else None
        if d is None:
            continue
        with deferred_signals():
            if _orphan(d):
                if (line := _reap(d, d.name.endswith(".cpu"))) is not None:
                    out.append(line)
                d = d.parent
            try:
                beside = [c for c in d.iterdir() if c.is_dir() and _orphan(c)]
            except OSError:
                continue
            for c in beside:
                if (line := _reap(c, c.name.endswith(".cpu"))) is not None:
                    out.append(line)
    return out
