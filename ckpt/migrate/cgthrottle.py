"""--auto-converge through the CFS bandwidth controller: the target moved into a child cgroup of its
own cgroup whose quota is (1 - fraction) of its CPU, and moved back when the throttle ends.

cgroup v2 `cpu.max` where the target's cgroup can have a child with the cpu controller; else the
cgroup v1 `cpu` hierarchy (`cpu.cfs_quota_us`), which hybrid systems such as this project's machines
still have. Where neither works (no permission, no controller, v2's no-internal-process rule), the
caller falls back to the SIGSTOP/SIGCONT duty cycle. The child is created for this migration and
removed with it; the process goes back to exactly the cgroup it came from (before the final freeze,
so that the child is empty when it is removed whatever becomes of the process)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

PERIOD_US = 100_000


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of each cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                out.append((fields[4], tail[0], tail[2]))
    return out


def _cgroups(pid: int) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu path) of the process."""
    v2 = v1 = None
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hid, ctrl, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and ctrl == "":
                v2 = path
            elif "cpu" in ctrl.split(","):
                v1 = path
    return v2, v1


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _write(p: Path, s: str) -> None:
    with open(p, "w") as f:
        f.write(s)


class CpuMax:
    """A child cgroup holding the target, with a CPU quota. `mechanism` says which kind."""

    def __init__(self, pid: int, home: Path, child: Path, v2: bool, cpus: float) -> None:
        self.pid, self.home, self.child, self.v2, self.cpus = pid, home, child, v2, cpus
        self.fraction = 0.0
        self.inside = False
        # A quota caps CPU time; it slows a process only below what it gets anyway. On a loaded
        # machine a process may get a tenth of a CPU, where a quota of "50% of a CPU" changes
        # nothing. So the throttle is relative to the CPU the process used before it began.
        self.t0, self.cpu0 = time.monotonic(), _cpu_seconds(pid)
        self.base: float | None = None  # CPUs the process used unthrottled
        self.mechanism = f"cgroup {'v2 cpu.max' if v2 else 'v1 cpu.cfs_quota_us'} ({child})"

    @classmethod
    def open(cls, pid: int) -> CpuMax | None:
        """A throttle for `pid`, or None where no cgroup CPU controller can be used."""
        try:
            v2path, v1path = _cgroups(pid)
            mounts = _mounts()
        except OSError:
            return None
        cpus = float(min(len(os.listdir(f"/proc/{pid}/task")), os.cpu_count() or 1))
        for mnt, fstype, opts in mounts:
            if fstype == "cgroup2" and v2path is not None:
                home = Path(mnt) / v2path.lstrip("/")
                t = cls._make(pid, home, True, cpus)
            elif fstype == "cgroup" and v1path is not None and "cpu" in opts.split(","):
                home = Path(mnt) / v1path.lstrip("/")
                t = cls._make(pid, home, False, cpus)
            else:
                continue
            if t is not None:
                return t
        return None

    @classmethod
    def _make(cls, pid: int, home: Path, v2: bool, cpus: float) -> CpuMax | None:
        quota = home / ("cpu.max" if v2 else "cpu.cfs_quota_us")
        child = home / f"ckpt-throttle-{pid}"
        try:
            if v2 and "cpu" not in (home / "cgroup.controllers").read_text().split():
                return None
            if not v2 and not quota.exists():
                return None
            child.mkdir(mode=0o755)
        except OSError:
            return None
        t = cls(pid, home, child, v2, cpus)
        try:
            if v2 and not (child / "cpu.max").exists():
                raise OSError("the cpu controller is not enabled for the child")
            t._quota(None)
        except OSError:
            with contextlib.suppress(OSError):
                child.rmdir()
            return None
        return t

    def _quota(self, fraction: float | None) -> None:
        if fraction is None or fraction <= 0:
            q = "max" if self.v2 else "-1"
        else:
            q = str(max(1000, int(PERIOD_US * (self.base or self.cpus) * (1 - fraction))))
        if self.v2:
            _write(self.child / "cpu.max", f"{q} {PERIOD_US}")
        else:
            _write(self.child / "cpu.cfs_period_us", str(PERIOD_US))
            _write(self.child / "cpu.cfs_quota_us", q)

    def set(self, fraction: float) -> None:
        if self.base is None:
            spent = time.monotonic() - self.t0
            used = (_cpu_seconds(self.pid) - self.cpu0) / spent if spent > 0 else self.cpus
            self.base = min(max(used, 0.01), self.cpus)
        self.fraction = min(max(fraction, 0.0), 0.99)
        if not self.inside:
            _write(self.child / "cgroup.procs", str(self.pid))
            self.inside = True
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
        """Back into the cgroup it came from; the child removed."""
        if self.inside:
            with contextlib.suppress(OSError):
                _write(self.home / "cgroup.procs", str(self.pid))
            self.inside = False
        with contextlib.suppress(OSError):
            self.child.rmdir()
