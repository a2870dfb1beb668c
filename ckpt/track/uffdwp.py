"""Dirty tracking with userfaultfd async write-protect, read with PAGEMAP_SCAN (Linux >= 6.7).

For kernels without soft-dirty. The userfaultfd must belong to the target, so it is created there by
injected syscalls; the dumper then scans /proc/PID/pagemap from outside. With WP_ASYNC the kernel
resolves write faults itself (no handler thread) and only clears the page's uffd-wp bit, which
PAGEMAP_SCAN reports as PAGE_IS_WRITTEN; PM_SCAN_WP_MATCHING re-protects exactly what it reports,
in the same call, so reading and re-arming are atomic even without the freeze.

Facts measured on this kernel (see ../shared/KERNEL-NOTES.md and docs/tracking.md):
- PAGEMAP_SCAN reports a hole (no page, with or without a page table) as WRITTEN, and WP_MATCHING on
  a hole installs PTE markers, allocating page tables for it: a 64 GiB reservation cost the target
  131 MB of page tables. So only populated pages are ever write-protected (category_mask WRITTEN,
  anyof PRESENT|SWAPPED), and holes are left as they are;
- a page populated after the scan (first write, a read of the zero page, a file page faulted in,
  a whole THP on first touch) has no uffd-wp bit, so the next scan reports it WRITTEN: first touches
  are caught without markers;
- an anonymous page dropped with MADV_DONTNEED becomes a hole again (no marker): found by scanning
  the holes in the same freeze and comparing with what the parent held (DirtySet.holes);
- a write to a write-protected THP splits it and reports one 4 KiB page;
- registration is per VMA: a mapping created after arming lacks PAGE_IS_WPALLOWED.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np

from ckpt import sysno as nr
from ckpt.errors import TargetError, TargetExited, TrackerError
from ckpt.memory import (
    PAGE_IS_HUGE,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PAGE_IS_WPALLOWED,
    PAGE_IS_WRITTEN,
    PM_SCAN_WP_MATCHING,
    PagemapScanner,
    RawScan,
    arrays_of,
    regions_of,
    swap_active,
)
from ckpt.pageset import small_max
from ckpt.proc import grab as procgrab
from ckpt.proc.maps import PAGE_SIZE, Vma, read_maps
from ckpt.proc.procfs import as_text, slurp
from ckpt.ptrace.batch import Call, Plan, Ref, Result
from ckpt.ranges import as_numpy, empty, in_spans, npages, overlapping, pages_of, subtract, to_pages
from ckpt.ranges import merge as merge_ranges
from ckpt.track.base import DirtySet, ParentInfo, tracked_vmas

if TYPE_CHECKING:
    from ckpt.ptrace import Frozen

# WP_UNPOPULATED: this kernel write-protects anonymous pages through PAGEMAP_SCAN without it too
# (measured), but kernels that decide WP-ability by userfaultfd_wp_use_markers() need it for anonymous
# memory, and earlier layers' fds have it (is_our_uffd). It only matters for holes, which ckpt never
# write-protects, so no markers are ever installed.
FEATURES = nr.UFFD_FEATURE_WP_ASYNC | nr.UFFD_FEATURE_WP_UNPOPULATED
# What a scan may write-protect: written pages that exist (in RAM or swap). Never a hole.
POPULATED = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
UFFD_LINK = "anon_inode:[userfaultfd]"

# Where the injected userfaultfd lives in the target's fd table: high, as CRIU places its service
# fds, so the target's next open() gets the number it would have got without ckpt. At the top of the
# fd table the process already has (FDSize in /proc/PID/status, 64 for most): a higher fd makes the
# kernel grow the table, and for a process with threads (a shared table) that waits out an RCU grace
# period, 10-20 ms of freeze here. Below the soft RLIMIT_NOFILE by a margin, and never above FD_FLOOR.
FD_FLOOR = 1000
FD_MARGIN = 24
FEW_ROWS = 64  # scan rows that _written_of works out without numpy for a large parent
# Followed memory from which the hole walks are a group of their own, which the freezing thread
# makes itself when it comes to wait for them before the scans' thread has begun them
# (procgrab.scans_start's ``split``): at 1 GiB the two walks are ~1.3 ms each and the collect beside
# them ~0.5 ms. Below, the collect outlasts the dirty walk, the thread always makes both, and the
# second buffer and its parse only cost the freeze (~15 us at 256 MiB).
SCANS_SPLIT_MIN = 512 << 20


def _status_fields(pid: int) -> tuple[int, int]:
    """(soft RLIMIT_NOFILE, FDSize): 0 for what cannot be read."""
    soft = fdsize = 0
    try:
        with open(f"/proc/{pid}/limits") as f:
            for ln in f:
                if ln.startswith("Max open files"):
                    word = ln.split()[3]
                    soft = 1 << 30 if word == "unlimited" else int(word)
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith("FDSize:"):
                    fdsize = int(ln.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return soft, fdsize


def fd_floor(pid: int) -> int:
    """The lowest number the injected fd may take, or 0 when the target leaves no room."""
    soft, fdsize = _status_fields(pid)
    floor = min(FD_FLOOR, soft - FD_MARGIN, fdsize - 1)
    return floor if floor > 2 else 0


def uffd_fds(pid: int) -> list[int]:
    """Every userfaultfd in the target's fd table."""
    out = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") == UFFD_LINK:
                    out.append(int(name))
            except FileNotFoundError:
                continue
    except FileNotFoundError:
        raise TargetExited(f"process {pid} exited") from None
    except PermissionError:
        raise TargetError(
            f"cannot list the open files of pid {pid} (/proc/{pid}/fd): permission denied"
        ) from None
    return sorted(out)


def _features(pid: int, fd: int) -> int | None:
    try:
        for ln in as_text(slurp(f"/proc/{pid}/fdinfo/{fd}")).split("\n"):
            if ln.startswith("API:"):
                return int(ln.split(":")[2], 16)
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return None


def _adjacent_groups(vmas: Sequence[Vma]) -> list[list[Vma]]:
    groups: list[list[Vma]] = []
    for v in vmas:
        if groups and groups[-1][-1].end == v.start:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


def is_our_uffd(pid: int, fd: int) -> bool:
    """fd is still a userfaultfd with async write-protect: the one ckpt injected (or a twin of it)."""
    try:
        if os.readlink(f"/proc/{pid}/fd/{fd}") != UFFD_LINK:
            return False
    except FileNotFoundError:
        return False
    feats = _features(pid, fd)
    return feats is not None and feats & FEATURES == FEATURES


# _ours' answer: followed ranges, unregistered mappings, mappings another userfaultfd holds, the
# parent's refused list.
_Classified = tuple[list[tuple[int, int]], list[Vma], list[Vma], list[tuple[int, int, int]]]


@dataclass
class _Begun:
    """What begin_dirty() found, for finish_dirty()."""

    fd: int
    tv: list[Vma]  # the mappings a dump follows
    ours: list[tuple[int, int]]  # the ranges this chain's userfaultfd follows: scanned
    whole: list[Vma]  # unregistered, or held by another userfaultfd: every present page a candidate
    refused: list[list[int]]
    vmas: list[Vma]
    parent: ParentInfo
    busy: bool  # some mapping is held by another userfaultfd: scan range by range (_one_span)
    pending: list[list[Vma]] = field(default_factory=list)  # registered in the caller's batch
    assumed: bool = False  # registrations read from the last walks' flags (begin_dirty(flags=...))
    candidates: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None  # candidate_ranges'


def _one_span(ours: Sequence[tuple[int, int]], busy: bool) -> bool:
    """Whether one scan from the first followed range to the last may stand for one scan per range.
    A WP_MATCHING scan skips every mapping no async-wp userfaultfd holds, but would consume the dirty
    bits of one that another such userfaultfd holds (busy); without those, one walk costs less than
    the per-range calls (22 mappings of a small C process: 0.02 against 0.15 ms)."""
    return not busy and len(ours) > 1


# The dirty scan: pages written (or populated) since the last one, write-protected again in the
# same call (holes never match), and which of them came as whole huge pages.
_WRITTEN = {
    "category_mask": PAGE_IS_WRITTEN,
    "category_anyof_mask": POPULATED,
    "flags": PM_SCAN_WP_MATCHING,
    "return_mask": PAGE_IS_WRITTEN | PAGE_IS_HUGE,
}


def _scan_spans(ours: Sequence[tuple[int, int]], busy: bool) -> tuple[list[tuple[int, int]], bool]:
    """Where the dirty and hole scans walk: one span from the first followed range to the last, or
    one per range (_one_span); and which."""
    one = _one_span(ours, busy)
    return ([(ours[0][0], ours[-1][1])] if one else list(ours)), one


def _written(
    sc: PagemapScanner, ours: Sequence[tuple[int, int]], busy: bool, small: bool = False
) -> tuple[Any, int]:
    """Pages written (or populated) since the last scan inside ``ours``, write-protected again in
    the same call (holes are never matched), and how many of them came as whole huge pages.
    ``small``: the scan's regions as a list and the pages as a small set where they are few (no
    numpy: ParentInfo.small)."""
    spans, one = _scan_spans(ours, busy)
    return _written_of([sc.raw(a, b, **_WRITTEN) for a, b in spans], ours, one, small)


def _written_of(
    raws: Sequence[RawScan], ours: Sequence[tuple[int, int]], one: bool, small: bool, keep_few: bool = False
) -> tuple[Any, int]:
    """_written's answer from its scans' rows. Few rows (a freeze after a live pre-copy finds
    the pages written since, often none): worked out as a small parent's are, without numpy's
    first calls (~0.25 ms of a freeze), and handed over as numpy's, or (``keep_few``) as the small
    set they are where they fit one: each numpy call a freeze makes on them after this costs it
    ~50 us, cold (dump.py)."""
    if small:
        return _written_small(raws, ours, one)
    if _few(raws):
        few, nhuge = _written_small(raws, ours, one)
        return (few if keep_few else as_numpy(few)), nhuge
    written: list[np.ndarray] = []
    huge: list[np.ndarray] = []
    for raw in raws:
        r = arrays_of(raw)
        written.append(to_pages(r[:, 0], r[:, 1]))
        hr = r[(r[:, 2] & np.uint64(PAGE_IS_HUGE)) != 0]
        if len(hr):
            huge.append(to_pages(hr[:, 0], hr[:, 1]))
    pages = np.concatenate(written) if written else np.empty(0, np.uint64)
    hp = np.concatenate(huge) if huge else np.empty(0, np.uint64)
    if one:
        # Mappings registered in this freeze (begin_dirty) matched too: they are read whole anyway.
        sp = np.array(ours, dtype=np.uint64).reshape(-1, 2)
        pages = pages[in_spans(pages, sp[:, 0], sp[:, 1])]
        hp = hp[in_spans(hp, sp[:, 0], sp[:, 1])]
    return pages, len(hp)


def _few(raws: Sequence[RawScan]) -> bool:
    """Scans' rows few enough (FEW_ROWS) to be worked out without numpy for a large parent."""
    return sum(len(rows) for raw in raws for rows, _ in raw) <= FEW_ROWS * 24  # (24 bytes a row)


def _written_small(raws: Sequence[RawScan], ours: Sequence[tuple[int, int]], one: bool) -> tuple[Any, int]:
    regs = [r for raw in raws for r in regions_of(raw)]
    if one:  # as in _written: only what this chain follows
        regs = [(max(a, s), min(b, e), c) for a, b, c in regs for s, e in ours if a < e and s < b]
    huge = sum((b - a) // PAGE_SIZE for a, b, c in regs if c & PAGE_IS_HUGE)
    runs = [(a, b) for a, b, _ in regs]
    # numpy's if more than the parent held after all
    return pages_of(runs, small=npages(runs) <= small_max()), huge


def _holes_kw(live: int, one: bool) -> dict[str, int]:
    """The hole scan: where no page is ``live``; WPALLOWED in the result splits the rows where the
    followed mappings end (rows of equal categories merge across mappings) when it walks one span."""
    return {
        "category_inverted": live,
        "category_mask": live,
        "return_mask": PAGE_IS_PRESENT | (PAGE_IS_WPALLOWED if one else 0),
    }


def _holes(sc: PagemapScanner, ours: Sequence[tuple[int, int]], busy: bool, live: int, small: bool) -> Any:
    """The ranges inside ``ours`` where no page is ``live`` (_holes_of), one walk where _one_span
    allows."""
    spans, one = _scan_spans(ours, busy)
    return _holes_of([sc.raw(a, b, **_holes_kw(live, one)) for a, b in spans], one, small)


def _holes_of(raws: Sequence[RawScan], one: bool, small: bool, keep_few: bool = False) -> Any:
    """The ranges inside the followed mappings where no page is live, from the hole scan's rows: a
    list of (start, end) for a small parent (no numpy), else an (n, 2) uint64 array; few rows
    (FEW_ROWS) worked out without numpy, and (``keep_few``, as _written_of's) handed over as the
    list. Walking one span, only rows in registered mappings are kept. Rows in the mappings
    registered in this freeze come too: those are read whole, their holes change nothing."""
    if small or _few(raws):
        rows = [r for raw in raws for r in regions_of(raw)]
        kept = [(a, b) for a, b, c in rows if not one or c & PAGE_IS_WPALLOWED]
        # (few: numpy's as a large parent's are, made in one call instead of several)
        return kept if small or keep_few else np.array(kept, dtype=np.uint64).reshape(-1, 2)
    h = np.concatenate([arrays_of(raw) for raw in raws])
    if one:
        h = h[(h[:, 2] & np.uint64(PAGE_IS_WPALLOWED)) != 0]
    return h[:, :2]


def _dirty_walks(begun: _Begun) -> tuple[list[procgrab.ScanSpec], list[procgrab.ScanSpec], bool]:
    """scan_dirty's walks: the dirty scan's (pages written or populated since the last one,
    re-armed in the same call) and the hole scan's (where nothing is present now: what the parent
    held there was dropped; ranges, not pages: a reservation of TiB is one row), and whether they
    walk one span (_scan_spans)."""
    live = PAGE_IS_PRESENT | (PAGE_IS_SWAPPED if swap_active() else 0)
    spans, one = _scan_spans(begun.ours, begun.busy)
    holes = _holes_kw(live, one)  # (as _holes)
    return [(a, b, dict(_WRITTEN)) for a, b in spans], [(a, b, dict(holes)) for a, b in spans], one


def _split(begun: _Begun, written: list[procgrab.ScanSpec]) -> int:
    """procgrab.scans_start's ``split`` for _dirty_walks' walks: the hole walks a group of their own
    from SCANS_SPLIT_MIN of followed memory on (0: one group)."""
    return len(written) if sum(b - a for a, b in begun.ours) >= SCANS_SPLIT_MIN else 0


@dataclass
class Scanned:
    """finish_dirty's two page-table walks as the kernel answered them (UffdWpTracker.scan_dirty)."""

    written: list[RawScan]
    holes: list[RawScan]
    one: bool


@dataclass
class ReadyNative:
    """ready_scans' answer: scan_dirty_native's walks, set up but not started."""

    scans: procgrab.ReadyScans
    nwritten: int
    one: bool

    def close(self) -> None:
        self.scans.close()


@dataclass
class NativeScans:
    """scan_dirty_native's walks, running (``pending``: None where nothing was to be walked)."""

    pending: procgrab.PendingScans | None
    nwritten: int  # the first walks are the dirty scan's, the rest the hole scan's
    one: bool
    done: Scanned | None = None

    def result(self) -> Scanned | None:
        """The walks' answer, waited for once (then kept, as a pool Task's)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            walks = pending.result()
            self.done = Scanned(walks[: self.nwritten], walks[self.nwritten :], self.one)
        return self.done


def _reg_call(fd: int, start: int, end: int) -> Call:
    arg = struct.pack("<4Q", start, end - start, nr.UFFDIO_REGISTER_MODE_WP, 0)
    return Call(nr.IOCTL, (fd, nr.UFFDIO_REGISTER, 0), out=32, out_arg=2, inp=arg)


def _register_calls(plan: Plan, fd: int, vmas: Sequence[Vma]) -> list[list[Vma]]:
    """UFFDIO_REGISTER of ``vmas`` added to ``plan``: one call per run of adjacent mappings (keyed
    ("uffd-reg", start, end)); returns the runs, for _register_done."""
    groups = _adjacent_groups(vmas)
    for g in groups:
        plan.add(("uffd-reg", g[0].start, g[-1].end), _reg_call(fd, g[0].start, g[-1].end))
    return groups


def _register_done(
    frozen: Frozen,
    fd: int,
    groups: list[list[Vma]],
    got: Mapping[Hashable, Result],
    scanner: PagemapScanner,
    maps: Sequence[Vma],
) -> list[list[int]]:
    """After _register_calls' batch: the members of a refused run one by one (a second batch, only
    then), every registered range's populated pages write-protected; returns those refused."""
    key = ("uffd-reg",)
    singles = Plan()
    for g in groups:
        if len(g) > 1 and got[(*key, g[0].start, g[-1].end)].ret < 0:
            for v in g:
                singles.add((*key, v.start, v.end), _reg_call(fd, v.start, v.end))
    one = singles.run(frozen, maps)
    done: list[tuple[int, int]] = []
    refused: list[list[int]] = []
    for g in groups:
        if got[(*key, g[0].start, g[-1].end)].ret == 0:
            done.append((g[0].start, g[-1].end))
            continue
        for v in g:
            r = (one if len(g) > 1 else got)[(*key, v.start, v.end)].ret
            if r < 0:
                # e.g. EBUSY: the process registered this range with its own userfaultfd;
                # EINVAL: a special mapping ([vdso]). Such a mapping is dumped wholly each
                # time: slower, never wrong.
                refused.append([v.start, v.end, -r])
            else:
                done.append((v.start, v.end))
    for start, end in done:
        # Every populated page comes under write-protect; holes stay holes (no page tables
        # built for them), and a first touch there is reported WRITTEN at the next scan.
        scanner.walk(
            start,
            end,
            category_mask=PAGE_IS_WRITTEN,
            category_anyof_mask=POPULATED,
            flags=PM_SCAN_WP_MATCHING,
            return_mask=PAGE_IS_WRITTEN,
        )
    return refused


class UffdWpTracker:
    name = "uffd-wp"

    def _inject_ok(self, frozen: Frozen, what: str, ret: int) -> None:
        if ret < 0:
            raise TrackerError(f"{what} in process {frozen.pid} failed: {os.strerror(-ret)}")

    def _register(
        self,
        frozen: Frozen,
        fd: int,
        vmas: Sequence[Vma],
        scanner: PagemapScanner,
        maps: Sequence[Vma],
        api: bytes = b"",
        close: int = -1,
    ) -> list[list[int]]:
        """Register mappings for async WP and protect all of them; returns those the kernel refused.

        Adjacent mappings are registered in one call (libraries come as 4-5 touching VMAs); if the
        kernel refuses a group, its members are tried one by one. All the calls of a round go in one
        Frozen.batch() (one injected run, not one injected syscall each). ``api``: the UFFDIO_API
        argument, when the fd is new: that ioctl goes first in the same batch (TrackerError if it
        fails). ``close``: an fd to close in the same batch. ``maps``: every mapping of the process
        (where batch() may put its code)."""
        plan = Plan()
        if close >= 0:
            plan.add("close", Call(nr.CLOSE, (close,)))
        if api:
            plan.add("api", Call(nr.IOCTL, (fd, nr.UFFDIO_API, 0), out=len(api), out_arg=2, inp=api))
        groups = _register_calls(plan, fd, vmas)
        got = plan.run(frozen, maps)
        if api:
            self._inject_ok(frozen, "nr.UFFDIO_API", got["api"].ret)
        return _register_done(frozen, fd, groups, got, scanner, maps)

    def arm(self, frozen: Frozen, vmas: Sequence[Vma]) -> dict[str, Any]:
        pid = frozen.pid
        # The new fd and its copy above fd_floor() in one batch (the copy takes the first's result);
        # where there is no room above the floor, the low one tracks.
        floor = fd_floor(pid)
        plan = Plan()
        first = plan.add("fd", Call(nr.USERFAULTFD, (nr.O_CLOEXEC | nr.O_NONBLOCK | nr.UFFD_USER_MODE_ONLY,)))
        if floor:
            plan.add("high", Call(nr.FCNTL, (Ref(first), nr.F_DUPFD_CLOEXEC, floor)))
        got = plan.run(frozen, vmas)
        fd = got["fd"].ret
        self._inject_ok(frozen, "userfaultfd()", fd)
        low = -1  # the copy not kept, closed in the next batch
        try:
            high = got["high"].ret if floor else -1
            if high >= 0:
                low, fd = (fd, high) if fd < floor else (high, fd)
            api = struct.pack("<3Q", nr.UFFD_API, FEATURES, 0)
            with PagemapScanner(pid) as sc:
                refused = self._register(frozen, fd, tracked_vmas(vmas), sc, vmas, api, low)
        except BaseException:
            for f in (fd, low) if low >= 0 else (fd,):
                frozen.syscall(nr.CLOSE, f)  # (EBADF for a low one the batch closed: harmless)
            raise
        return {"fd": fd, "refused": refused}

    def check_armed(self, pid: int, state: dict[str, Any] | None) -> None:
        self._armed_fd(pid, state)

    def _armed_fd(self, pid: int, state: dict[str, Any] | None) -> int:
        fd = (state or {}).get("fd")
        if not isinstance(fd, int) or fd < 0:
            raise TrackerError(
                f"uffd-wp tracking is not armed in process {pid} (the parent layer has no tracker state)"
            )
        if not is_our_uffd(pid, fd):
            raise TrackerError(
                f"uffd-wp tracking of process {pid} was lost: fd {fd} is no longer the userfaultfd ckpt "
                "injected "
                "(the process closed or replaced it); make a full dump to re-arm"
            )
        return fd

    def dirty(
        self, frozen: Frozen, vmas: Sequence[Vma], parent: ParentInfo
    ) -> tuple[DirtySet, dict[str, Any]]:
        return self.finish_dirty(frozen, self.begin_dirty(frozen, vmas, parent))

    def _ours(self, sc: PagemapScanner, tv: Sequence[Vma], state: dict[str, Any] | None) -> _Classified:
        """(ranges this chain's userfaultfd follows, unregistered mappings, mappings another
        userfaultfd holds, the parent's refused list)."""
        # Which mappings are not registered at all: created since the last dump, or replaced
        # (PAGE_IS_WPALLOWED is a per-VMA property). One inverted scan over the whole span.
        unreg = sc.regions(
            tv[0].start,
            tv[-1].end,
            category_inverted=PAGE_IS_WPALLOWED,
            category_mask=PAGE_IS_WPALLOWED,
            return_mask=PAGE_IS_WPALLOWED,
        )
        return self._classify(tv, [(a, b) for a, b, _ in unreg], state)

    @staticmethod
    def _classify(
        tv: Sequence[Vma], unreg: Sequence[tuple[int, int]], state: dict[str, Any] | None
    ) -> _Classified:
        """_ours' answer from the ranges no async-wp userfaultfd holds (``unreg``)."""
        old_refused = [(int(r[0]), int(r[1]), int(r[2])) for r in (state or {}).get("refused", [])]
        spans = [(v.start, v.end) for v in tv]
        unreg_hit = overlapping(spans, list(unreg))
        unregistered = [v for v, hit in zip(tv, unreg_hit, strict=True) if hit]
        # Mappings our registration was refused for but which are write-protect-registered: they
        # belong to another userfaultfd (another ckpt chain, or the process's own). Scanning them
        # with WP_MATCHING would consume *its* dirty bits, so they are never scanned, only dumped
        # whole.
        busy_hit = overlapping(spans, [(a, b) for a, b, _ in old_refused])
        busy = [v for v, u, hit in zip(tv, unreg_hit, busy_hit, strict=True) if hit and not u]
        ours = subtract(spans, [(v.start, v.end) for v in unregistered + busy])
        return ours, unregistered, busy, old_refused

    def begin_dirty(
        self,
        frozen: Frozen,
        vmas: Sequence[Vma],
        parent: ParentInfo,
        plan: Plan | None = None,
        flags: Mapping[int, str] | None = None,
    ) -> _Begun:
        """The first half of dirty(): which mappings are followed, and the registration of those
        created since (the only part that injects, and that takes the mm's write lock). The caller
        may then start walks that hold the mm's lock (smaps) and run finish_dirty() beside them.
        ``plan``: the registration's calls go into the caller's batch (one injected run for both);
        the caller then hands its answers to finish_registration(). ``flags``: the VmFlags of
        ``vmas`` as the last dump's walks read them, where the flag counters vouch that they still
        hold (ckpt/proc/flagwatch.py): which mappings are registered is read from their "uw" (the
        tracker's registration is VM_UFFD_WP, and the counters see every registration and the fd
        check every other userfaultfd) instead of the kernel's scan for it (~0.15-0.3 ms of the
        freeze). The caller must have recheck() run if the fd check then fails."""
        pid = frozen.pid
        fd = self._armed_fd(pid, parent.state)
        tv = tracked_vmas(vmas)
        if not tv:
            return _Begun(fd, tv, [], [], [], [], parent, False)
        if flags is not None and all(v.start in flags for v in tv):
            unreg = [(v.start, v.end) for v in tv if "uw" not in flags[v.start].split()]
            cls = self._classify(tv, unreg, parent.state)
            refused = {(a, b) for a, b, _ in cls[3]}
            # Only where nothing is to be registered (every mapping held, or refused before):
            # recheck() then has no registration of this freeze to tell from the last dump's.
            if all((v.start, v.end) in refused for v in cls[1]):
                begun = self._begun(frozen, fd, tv, vmas, parent, cls, plan, None)
                begun.assumed = True
                return begun
        with PagemapScanner(pid) as sc:
            return self._begun(frozen, fd, tv, vmas, parent, self._ours(sc, tv, parent.state), plan, sc)

    def _begun(
        self,
        frozen: Frozen,
        fd: int,
        tv: list[Vma],
        vmas: Sequence[Vma],
        parent: ParentInfo,
        cls: _Classified,
        plan: Plan | None,
        sc: PagemapScanner | None,
    ) -> _Begun:
        """begin_dirty's record of its classification (_ours'), and the registration of the
        mappings found unregistered (in ``plan``, or injected here with ``sc``)."""
        ours, unregistered, busy, old_refused = cls
        known = {(a, b): [a, b, e] for a, b, e in old_refused}
        retry = [v for v in unregistered if (v.start, v.end) not in known]
        refused = [known[(v.start, v.end)] for v in unregistered if (v.start, v.end) in known]
        refused += [[v.start, v.end, errno.EBUSY] for v in busy]
        begun = _Begun(fd, tv, ours, unregistered + busy, refused, list(vmas), parent, bool(busy))
        if retry and plan is not None:
            begun.pending = _register_calls(plan, fd, retry)
        elif retry:
            assert sc is not None
            refused += self._register(frozen, fd, retry, sc, vmas)
        return begun

    def recheck(self, frozen: Frozen, begun: _Begun, vmas: Sequence[Vma]) -> None:
        """begin_dirty(flags=...)'s classification made by the kernel's scan after all (after the
        caller's batch, before finish_dirty): the fd check no longer vouched for the flags. A
        mapping found unregistered now is registered here (injected calls of its own) and dumped
        whole, as begin_dirty's scan would have had it."""
        if not begun.assumed:
            return
        begun.assumed = False
        with PagemapScanner(frozen.pid) as sc:
            cls = self._ours(sc, begun.tv, begun.parent.state)
            again = self._begun(frozen, begun.fd, begun.tv, vmas, begun.parent, cls, None, sc)
        # (begin_dirty(flags=...) registered nothing: the kernel's answer replaces it whole)
        begun.ours, begun.whole, begun.refused = again.ours, again.whole, again.refused
        begun.busy = again.busy
        begun.candidates = None  # (whole changed)

    def finish_registration(self, frozen: Frozen, begun: _Begun, got: Mapping[Hashable, Result]) -> None:
        """After the caller's batch that begin_dirty(plan=...) added to: what the kernel refused, and
        the new mappings' pages write-protected. Before finish_dirty()."""
        if begun.pending:
            with PagemapScanner(frozen.pid) as sc:
                begun.refused += _register_done(frozen, begun.fd, begun.pending, got, sc, begun.vmas)
            begun.pending = []

    def finish_dirty(self, frozen: Frozen, begun: _Begun) -> tuple[DirtySet, dict[str, Any]]:
        """The second half of dirty(): the pages written since the last scan (re-armed in the same
        call) and the holes. Reads page tables only: no injection, no write lock."""
        return self.dirty_of(begun, self.scan_dirty(frozen, begun))

    def scan_dirty(self, frozen: Frozen, begun: _Begun) -> Scanned | None:
        """finish_dirty()'s walks alone, their rows unparsed: the kernel's work, with the GIL let go
        but between calls, for a thread beside the rest of the freeze (dirty_of parses them)."""
        if begun.pending:
            raise TrackerError("uffd-wp: finish_dirty() before finish_registration()")
        if not begun.tv:
            return None
        written, holes, one = _dirty_walks(begun)
        with PagemapScanner(frozen.pid) as sc:
            return Scanned(
                [sc.raw(a, b, **kw) for a, b, kw in written], [sc.raw(a, b, **kw) for a, b, kw in holes], one
            )

    def ready_scans(self, frozen: Frozen, begun: _Begun) -> ReadyNative | None:
        """scan_dirty_native's set-up (the walks, the pagemap opened, their rows and buffer) made
        ahead, for a scan_dirty_native(ready=) soon after with ``begun`` as it is now (a freeze
        makes it while its batch runs); None where that would not start walks of C's own.
        Closed by the caller if not used."""
        if begun.pending or not begun.tv:
            return None
        written, holes, one = _dirty_walks(begun)
        r = procgrab.scans_ready(frozen.pid, written + holes, _split(begun, written))
        return None if r is None else ReadyNative(r, len(written), one)

    def scan_dirty_native(
        self, frozen: Frozen, begun: _Begun, ready: ReadyNative | None = None
    ) -> NativeScans | None:
        """scan_dirty()'s two walks started now, one after the other on a thread of C's own
        (ckpt/proc/grab.py scans_start): they begin at once and run beside the collect without the
        GIL, where a Python thread waited for the collect to let the GIL go before each call (two
        threads, one a walk, took the collect's CPU: 256 MiB, 0.7 ms to the scans' end against
        0.4); from SCANS_SPLIT_MIN of followed memory the hole walks may be made by the thread that
        takes result() (_split). ``ready``: ready_scans' set-up, started now. Its result() is
        scan_dirty's answer; None without the library (or a thread): then scan_dirty on a thread of
        the caller's."""
        if begun.pending:
            raise TrackerError("uffd-wp: finish_dirty() before finish_registration()")
        if not begun.tv:
            return NativeScans(None, 0, False)
        if ready is not None:  # (ready_scans': the same walks, made ahead)
            started = ready.scans.go()
            return None if started is None else NativeScans(started, ready.nwritten, ready.one)
        written, holes, one = _dirty_walks(begun)
        pending = procgrab.scans_start(frozen.pid, written + holes, _split(begun, written))
        return None if pending is None else NativeScans(pending, len(written), one)

    def state_of(self, begun: _Begun) -> dict[str, Any]:
        """The state finish_dirty() returns: what a dump that fails once the scans have begun must
        close (they consume the dirty bits since the parent)."""
        return {"fd": begun.fd, "refused": begun.refused}

    def dirty_of(self, begun: _Begun, scanned: Scanned | None) -> tuple[DirtySet, dict[str, Any]]:
        """finish_dirty()'s answer from scan_dirty()'s."""
        state = self.state_of(begun)
        if scanned is None:
            return DirtySet(pages=empty()), state
        small = begun.parent.small
        # Few rows (a freeze after a live pre-copy): small sets and lists, as a small parent's,
        # which the dump's set arithmetic then does without numpy (ckpt/ranges.py).
        pages, huge = _written_of(scanned.written, begun.ours, scanned.one, small, keep_few=True)
        hole_ranges = _holes_of(scanned.holes, scanned.one, small, keep_few=True)
        # Mappings that are new or replaced since the parent (by identity) hold nothing to inherit.
        # Unregistered ones that continue the parent's mapping (remapped in place, [vdso]) and those
        # another userfaultfd holds: every present page is a candidate, and the digest compare keeps
        # the unchanged ones out of the layer. New mappings are tracked from now on, registered in
        # this same freeze.
        fresh, whole = self.candidate_ranges(begun)
        return DirtySet(pages=pages, fresh=fresh, whole=whole, holes=hole_ranges, huge=huge), state

    def candidate_ranges(self, begun: _Begun) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """dirty_of's DirtySet.fresh and .whole, known before the scans end: the caller works out
        the candidates' present pages while it waits for them (dump.py). Made once per ``begun``
        (recheck() makes them anew)."""
        if begun.candidates is None:
            fresh = begun.parent.fresh(begun.vmas)
            begun.candidates = (fresh, merge_ranges([(v.start, v.end) for v in begun.whole]))
        return begun.candidates

    def scan_live(
        self, pid: int, vmas: Sequence[Vma], state: dict[str, Any] | None
    ) -> tuple[np.ndarray, int]:
        """Pages written since the last scan, write-protected again in the same call, while the
        process runs (ckpt/precopy.py). Only what this chain's userfaultfd follows is scanned; nothing
        is registered (that needs the process stopped). A page written after its scan here is
        reported again by the next scan: the frozen one takes it. Also returns how many of the
        pages came as whole huge pages (DirtySet.huge)."""
        tv = tracked_vmas(vmas)
        if not tv:
            return np.empty(0, np.uint64), 0
        with PagemapScanner(pid) as sc:
            ours, _, busy, _ = self._ours(sc, tv, state)
            return _written(sc, ours, bool(busy))

    def close(self, frozen: Frozen, state: dict[str, Any] | None) -> None:
        """Unregister everything and close the injected fd: the target is left as it was."""
        fd = (state or {}).get("fd")
        if not isinstance(fd, int) or not is_our_uffd(frozen.pid, fd):
            return
        arg = frozen.scratch(64)
        with PagemapScanner(frozen.pid) as sc:
            for v in tracked_vmas(read_maps(frozen.pid)):
                probe = sc.scan(v.start, v.start + PAGE_SIZE, category_anyof_mask=0xFF, return_mask=0xFF)
                if probe and probe[0].categories & PAGE_IS_WPALLOWED:
                    frozen.write_mem(arg, struct.pack("<2Q", v.start, v.size))
                    frozen.syscall(nr.IOCTL, fd, nr.UFFDIO_UNREGISTER, arg)
        frozen.syscall(nr.CLOSE, fd)
