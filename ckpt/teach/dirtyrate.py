"""`ckpt dirtyrate`: a process's dirty page rate per interval and per mapping, and its writable
working set, measured with the tracker a dump uses (soft-dirty where the kernel has it, else
uffd-wp). The target is frozen only to read and re-arm the dirty set (the same Frozen and tracker
calls as ckpt.dump), and left untracked at the end, on Ctrl-C, and when it exits.

Between samples ckpt waits on a pidfd with the interval as timeout: the target's exit ends the wait
at once. A test (or any caller) may replace that wait with its own (`wait=`), e.g. a handshake
with a target that writes known pages between two samples."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckpt import ranges
from ckpt.errors import CkptError, TargetExited, TrackerError
from ckpt.memory import present_in, present_pages
from ckpt.proc import check_dumpable
from ckpt.proc.maps import PAGE_SIZE, Vma, read_maps
from ckpt.ptrace import Frozen
from ckpt.ptrace.resumestop import frozen_briefly
from ckpt.teach.wss import WssPoint, curve
from ckpt.track import DirtySet, ParentInfo, Tracker, get_tracker, tracked_vmas

MAX_INTERVALS = 100_000  # a bound on what is kept for the WSS curve (about a day at 1 s)
MAX_INTERVAL_MS = 3_600_000
MAX_DURATION_S = 30 * 86400


@dataclass
class Interval:
    index: int
    t_ms: float  # end of this interval, from the arming
    interval_ms: float
    pages_dirty: int
    dirty_mb_s: float
    freeze_ms: float
    mappings: list[dict[str, Any]]  # per mapping with writes: start, end, path, pages
    pages: np.ndarray = field(repr=False)  # the page addresses written (uint64, ascending)

    def to_dict(self, with_pages: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "event": "interval",
            "index": self.index,
            "t_ms": round(self.t_ms, 1),
            "interval_ms": round(self.interval_ms, 1),
            "pages_dirty": self.pages_dirty,
            "dirty_mb_s": round(self.dirty_mb_s, 3),
            "freeze_ms": round(self.freeze_ms, 2),
            "mappings": self.mappings,
        }
        if with_pages:
            d["pages"] = runs(self.pages)
        return d


@dataclass
class Summary:
    pid: int
    tracker: str
    interval_ms: float
    intervals: int
    memory_pages: int  # present pages of the tracked mappings at the start
    mean_dirty_mb_s: float
    peak_dirty_mb_s: float
    end: str  # "duration" | "interrupted" | "target exited" | "stopped" (by the caller's wait)
    wss: list[WssPoint]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "done",
            "pid": self.pid,
            "tracker": self.tracker,
            "interval_ms": self.interval_ms,
            "intervals": self.intervals,
            "memory_pages": self.memory_pages,
            "mean_dirty_mb_s": round(self.mean_dirty_mb_s, 3),
            "peak_dirty_mb_s": round(self.peak_dirty_mb_s, 3),
            "end": self.end,
            "wss": [p.to_dict() for p in self.wss],
            "warnings": self.warnings,
        }


def runs(pages: np.ndarray) -> list[list[int]]:
    """Ascending page addresses as [first address, count] runs: a trace stays small."""
    if not len(pages):
        return []
    p = np.asarray(pages, np.uint64) // np.uint64(PAGE_SIZE)
    cut = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [len(p)]))
    return [[int(p[a]) * PAGE_SIZE, int(b - a)] for a, b in zip(starts, ends, strict=True)]


def from_runs(rs: Any, limit: int = 1 << 24) -> np.ndarray:
    """The inverse of runs(), for a trace read back (untrusted: at most `limit` pages)."""
    if not isinstance(rs, list):
        raise CkptError("trace: 'pages' must be a list of [address, count] runs")
    parts = []
    total = 0
    for r in rs:
        if (
            not isinstance(r, list)
            or len(r) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
            or not 0 <= r[0] < 1 << 57
            or not 0 < r[1] <= 1 << 28
        ):
            raise CkptError(f"trace: bad page run {str(r)[:60]}")
        total += r[1]
        if total > limit:
            raise CkptError(f"trace: more than {limit} pages")
        parts.append(np.uint64(r[0]) + np.arange(r[1], dtype=np.uint64) * np.uint64(PAGE_SIZE))
    return np.concatenate(parts) if parts else np.empty(0, np.uint64)


def _vma_dicts(vmas: list[Vma]) -> list[dict[str, Any]]:
    return [
        {
            "start": v.start,
            "end": v.end,
            "inode": v.inode,
            "offset": v.offset,
            "path": v.path,
            "status": "dumped",
        }
        for v in tracked_vmas(vmas)
    ]


def per_mapping(pages: np.ndarray, vmas: list[Vma]) -> list[dict[str, Any]]:
    tv = tracked_vmas(vmas)
    if not len(pages) or not tv:
        return []
    starts = np.array([v.start for v in tv], np.uint64)
    idx = np.searchsorted(starts, pages, side="right") - 1
    out: list[dict[str, Any]] = []
    for i, n in zip(*np.unique(idx[idx >= 0], return_counts=True), strict=True):
        v = tv[int(i)]
        out.append({"start": hex(v.start), "end": hex(v.end), "path": v.path or "[anon]", "pages": int(n)})
    out.sort(key=lambda m: -m["pages"])
    return out


class DirtyRate:
    """Arm once, sample at will, close once. Use as a context manager: close() always runs."""

    def __init__(self, pid: int, track: str = "auto") -> None:
        check_dumpable(pid)
        self.pid = pid
        tracker: Tracker = get_tracker(track)
        if tracker.name == "hash":
            raise TrackerError(
                "dirtyrate needs a tracker that sees writes (soft-dirty or uffd-wp); the hash tracker "
                "only compares contents"
            )
        self.tracker = tracker
        self.state: dict[str, Any] | None = None
        self.vmas: list[dict[str, Any]] = []
        self.memory_pages = 0
        self.warnings: list[str] = []
        self.t0 = 0.0
        self.t_last = 0.0
        self.index = 0

    def __enter__(self) -> DirtyRate:
        self.arm()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def arm(self) -> None:
        def arm(fz: Frozen) -> list[Vma]:
            vmas = read_maps(self.pid)
            self.state = self.tracker.arm(fz, vmas)
            fz.release_scratch()
            self.memory_pages = len(present_pages(self.pid, tracked_vmas(vmas)))
            return vmas

        try:
            vmas = frozen_briefly(self.pid, arm)
        except BaseException:
            # A Ctrl-C held during the freeze is raised here, after the tracker went in: take it out
            # (the caller's `with` never reaches __exit__ when __enter__ fails).
            self.close()
            raise
        self.vmas = _vma_dicts(vmas)
        # [vdso] and [vvar] are always refused (EINVAL) and never written by the process; a mapping
        # another userfaultfd holds (EBUSY: a dump chain's tracker, or the process's own) is a gap.
        refused = [r for r in (self.state or {}).get("refused") or [] if r[2] == errno.EBUSY]
        if refused:
            self.warnings.append(
                f"{len(refused)} mappings are tracked by another userfaultfd (a `ckpt dump` chain's, or "
                "the process's own) and are left to it: their writes are not counted "
                f"(`ckpt untrack --pid {self.pid}` takes a dump chain's tracking out)"
            )
        self.t0 = self.t_last = time.perf_counter()

    def sample(self) -> Interval:
        """Freeze, read and re-arm the dirty set, thaw: the pages written since the last sample."""

        def read(fz: Frozen) -> tuple[list[Vma], DirtySet, np.ndarray, float]:
            tf = time.perf_counter()
            vmas = read_maps(self.pid)
            ds, self.state = self.tracker.dirty(fz, vmas, ParentInfo(self.vmas, self.state))
            fz.release_scratch()
            # New mappings hold no tracking yet: each present page of them was written (or faulted
            # in) since the last sample. Mappings the tracker cannot follow (ds.whole: [vdso],
            # refused ones) are left out rather than counted as written every time.
            fresh = present_in(self.pid, ds.fresh) if ds.fresh else np.empty(0, np.uint64)
            return vmas, ds, fresh, (time.perf_counter() - tf) * 1e3

        vmas, ds, fresh, freeze_ms = frozen_briefly(self.pid, read)
        now = time.perf_counter()
        pages = ranges.union(ranges.as_set(ds.pages), fresh) if len(fresh) else ranges.as_set(ds.pages)
        self.vmas = _vma_dicts(vmas)
        secs = max(now - self.t_last, 1e-9)
        self.t_last = now
        iv = Interval(
            index=self.index,
            t_ms=(now - self.t0) * 1e3,
            interval_ms=secs * 1e3,
            pages_dirty=len(pages),
            dirty_mb_s=len(pages) * PAGE_SIZE / secs / 1e6,
            freeze_ms=freeze_ms,
            mappings=per_mapping(pages, vmas),
            pages=pages,
        )
        self.index += 1
        return iv

    def close(self) -> None:
        """Take the tracking out (nothing to do for a process that has exited)."""
        if self.state is None:
            return
        state, self.state = self.state, None
        with contextlib.suppress(TargetExited):
            frozen_briefly(self.pid, lambda fz: self.tracker.close(fz, state))


def pidfd_wait(pid: int) -> Callable[[float], bool]:
    """A wait of at most `secs` that returns True as soon as the process exits."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise TargetExited(f"process {pid} exited") from None
    poller = select.poll()
    poller.register(fd, select.POLLIN)

    def wait(secs: float) -> bool:
        return bool(poller.poll(max(0, int(secs * 1e3))))

    return wait


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # (reaped between the open and the read: ESRCH)
        return True


def measure(
    pid: int,
    *,
    interval_ms: float = 250.0,
    duration_s: float | None = None,
    track: str = "auto",
    wait: Callable[[float], bool] | None = None,
    on_interval: Callable[[Interval], None] | None = None,
) -> Summary:
    """Sample every `interval_ms` until `duration_s`, Ctrl-C or the target's exit; the summary holds
    the WSS curve over every interval. `wait(secs)` returns True when sampling must stop."""
    if not 1 <= interval_ms <= MAX_INTERVAL_MS:  # also refuses NaN
        raise CkptError(f"--interval must be at least 1 ms and at most {MAX_INTERVAL_MS} ms")
    if duration_s is not None and not 0 < duration_s <= MAX_DURATION_S:
        raise CkptError(f"--duration must be positive and at most {MAX_DURATION_S} s")
    sets: list[np.ndarray] = []
    end = "duration"
    peak = 0.0
    total_pages = 0
    dr = DirtyRate(pid, track)
    waiter = wait or pidfd_wait(pid)
    try:
        with dr:
            for iv in _loop(dr, interval_ms, duration_s, waiter):
                sets.append(iv.pages)
                peak = max(peak, iv.dirty_mb_s)
                total_pages += iv.pages_dirty
                if on_interval:
                    on_interval(iv)
    except _Ended as e:
        end = e.why
    except KeyboardInterrupt:
        end = "interrupted"
    elapsed = max(dr.t_last - dr.t0, 1e-9)
    return Summary(
        pid=pid,
        tracker=dr.tracker.name,
        interval_ms=interval_ms,
        intervals=len(sets),
        memory_pages=dr.memory_pages,
        mean_dirty_mb_s=total_pages * PAGE_SIZE / elapsed / 1e6 if sets else 0.0,
        peak_dirty_mb_s=peak,
        end=end,
        # Windows in measured time: a late sample makes a longer interval, not a shorter window.
        wss=curve(sets, elapsed * 1e3 / len(sets) if sets else interval_ms),
        warnings=dr.warnings,
    )


class _Ended(Exception):
    def __init__(self, why: str) -> None:
        self.why = why


def _loop(
    dr: DirtyRate, interval_ms: float, duration_s: float | None, wait: Callable[[float], bool]
) -> Iterator[Interval]:
    n = 0
    while n < MAX_INTERVALS:
        due = dr.t0 + (n + 1) * interval_ms / 1e3
        if duration_s is not None and due - dr.t0 > duration_s + 1e-9:
            return
        if wait(max(0.0, due - time.perf_counter())) or _exited(dr.pid):
            raise _Ended("target exited" if _exited(dr.pid) else "stopped")
        try:
            yield dr.sample()
        except TargetExited:
            raise _Ended("target exited") from None
        n += 1
