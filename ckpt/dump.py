"""One dump: freeze, collect, find the pages, copy them, thaw, then compress and publish a layer.

The order (see images/FORMAT.md, "Why the order is safe"):
  1. before the freeze: checks, the parent's page table, a page buffer sized and pre-faulted
  2. frozen: mappings, threads, fds, mm fields; tracker.arm (full) or tracker.dirty (incremental:
     reads the dirty set and re-arms in the same call; uffd-wp's page-table walks, for a process of
     64 MiB and more, on a thread beside the collect); copy the pages into the buffer
  3. thaw (the target runs on), unless --kill or the buffer budget forces streaming
  4. after the thaw: zero detection, digests, dirty-but-unchanged, compression, atomic publish
Everything the target feels is in step 2; it copies bytes and does nothing else.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import os
import signal
import time
from array import array
from collections.abc import Callable, Generator, Hashable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from ckpt.track.uffdwp import NativeScans, ReadyNative
else:
    from ckpt.lazynp import np

from ckpt import __version__, ranges
from ckpt import sysno as nr
from ckpt.bufpool import BufferPool
from ckpt.chainlock import (
    ARMED_NAME,
    LOCK_NAME,
    ArmRecord,
    DirLock,
    check_parent,
    layer_ref,
    new_arm_id,
    read_record,
    write_record,
)
from ckpt.errors import CkptError, TargetError, TargetExited, TrackerError
from ckpt.image import Layer, LayerWriter, MergedView, PageTable, find_layers, next_layer_name, tablecache
from ckpt.image.chain import MAX_CHAIN
from ckpt.image.format import (
    FORMAT_VERSION,
    ZERO_PAGE_DIGEST,
    AnonFdRecord,
    FdRecord,
    FileId,
    Inventory,
    LayerMeta,
    MmRecord,
    PageIndex,
    PipeRecord,
    PropsRecord,
    SigactionRecord,
    TaskRecord,
    ThreadRecord,
    VmaRecord,
)
from ckpt.image.objects import DEFAULT_OBJECT_LIMIT, ObjectRecord
from ckpt.image.pagescan import digest_array, zero_flags
from ckpt.image.pidns import PidNsRecord, check_threads
from ckpt.image.recmemo import RecordMemo, take
from ckpt.image.sockets import sockets_from
from ckpt.image.tcp import tcp_from
from ckpt.image.tree import TreeRecord
from ckpt.image.writer import DEFAULT_LEVEL, check_level, ensure_dir
from ckpt.jobstop import stop_record
from ckpt.lastround import inline_after_thaw
from ckpt.memory import (
    SHARED_ANON_PATH,
    PageBuffer,
    count_present,
    page_digests,
    present_in,
    present_pages,
    read_pages,
    shmem_pages,
    zero_mask,
)
from ckpt.pageset import small_max
from ckpt.precopy import AUTO_MIN_PAGES, Gathered, PreCopied, copy_live, followed_spans, in_holes
from ckpt.prefault import EarlyBuffer
from ckpt.proc import (
    boot_id,
    check_dumpable,
    list_children,
    list_fds,
    list_threads,
    mmshare,
    procfs,
    read_maps,
    read_stat,
    read_status,
)
from ckpt.proc import grab as procgrab
from ckpt.proc.anonfds import read_anonfds
from ckpt.proc.dupfds import dup_sources
from ckpt.proc.maps import PAGE_SIZE, Vma, copied_vmas
from ckpt.proc.objects import Holder, collect_objects, compress_objects, is_shmem_object
from ckpt.proc.pidns import read_ns_ids
from ckpt.proc.pipes import read_pipes
from ckpt.proc.props import (
    PageTableReads,
    environment_namespaces,
    guard_flag,
    queued_signals,
    read_props,
    read_timers,
)
from ckpt.proc.props import ask as ask_props
from ckpt.proc.ptcache import Known, PageTablesCache
from ckpt.proc.sockets import listening_sockets
from ckpt.proc.stat import read_state_comm, read_status_lazy, status_fields
from ckpt.proc.task import read_security, read_task_reads, task_info
from ckpt.proc.tcp import TcpDump
from ckpt.proc.threads import read_cloned, take_cloned
from ckpt.ptrace import Frozen, deferred_signals, inject, sigchld
from ckpt.ptrace.batch import (
    Call,
    Plan,
    Result,
    assemble_sp,
    chunks,
    code_size_sp,
    pick_signal,
    quiet_signals,
)
from ckpt.ptrace.freeze import code_map_size, thaw_all
from ckpt.ptrace.resumestop import frozen_briefly
from ckpt.ptrace.seccomp import read_filters
from ckpt.ptrace.signals import held as signals_held
from ckpt.restore.plan import CAP_SYS_ADMIN, _has_cap, restore_refusals
from ckpt.threadpool import ThreadPool
from ckpt.track import ParentInfo, Tracker, get_tracker
from ckpt.track.estimate import estimate_pages
from ckpt.treeshare import TreeShare
from ckpt.unmapaside import close_aside

Progress = Callable[[str, int, int], None]  # (phase, done, total)

LOST_MARKER = ".ckpt-tracking-lost"
DEFAULT_MAX_BUFFER = 2 << 30  # bytes copied while frozen before the dump streams (bounds the dumper's memory)
BATCH_PAGES = 256  # pages handed to the writer at once: one chunk
# Resident bytes above which smaps and the guard scan are read in a thread beside the freeze (below,
# the walks take ~0.1-1 ms: less than the thread costs in start-up and GIL contention).
PAGETABLES_BACKGROUND = 64 << 20
# Trackers whose state lives in the target and is re-armed by each dump that reads it: their dirty set
# can only stack on the layer of the last re-arming dump (ckpt/chainlock.py). The hash tracker compares
# with whatever parent it is given, so any parent is right for it.
REARMED = ("uffd-wp", "soft-dirty")


@dataclass
class DumpResult:
    layer: str
    parent: str | None
    pid: int
    tracker: str | None
    incremental: bool
    pages_total: int  # present pages of the dumped mappings
    pages_dumped: int  # pages whose bytes this layer stores
    pages_zero: int
    pages_dirty: int  # pages the tracker reported (plus new mappings' pages)
    # of pages_dirty, those reported in units of a 2 MiB transparent huge page (see docs/tracking.md)
    pages_dirty_huge: int
    pages_dirty_unchanged: int
    pages_absent: int
    bytes_raw: int  # bytes copied from the target
    bytes_written: int  # size of the layer file
    freeze_ms: float  # the seize to the thaw's start (the figure every earlier benchmark gives)
    elapsed_ms: float
    # The seize to the thaw's end, the last thread let go: what the target felt (freeze_ms and the
    # thaw's detaches, ~0.1-0.4 ms). 0.0 where the caller thaws (a tree's member) or --kill.
    held_ms: float = 0.0
    fallback_full: bool = False
    warnings: list[str] = field(default_factory=list)
    # Whether `ckpt restore` of this layer would start on this machine (restore.plan's checks that
    # need no pages), and if not, why.
    restorable: bool = True
    not_restorable: list[str] = field(default_factory=list)
    phases_ms: dict[str, float] = field(default_factory=dict)  # where the time went, in order
    # of pages_dirty, those copied while the process ran before the freeze (ckpt/precopy.py)
    pages_precopied: int = 0
    # A tree dump (ckpt/dumptree.py): this is the root's; one summary per other process of the tree.
    tree: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Parent:
    path: Path
    layer: Layer
    # The open chain, when it was walked; None when its table came from the parent's table file
    # (ckpt/image/tablecache.py), and then no layer under the parent is opened.
    view: MergedView | None
    table: PageTable  # the pages the parent's chain names; the rest of its mappings is absent
    present: np.ndarray  # pages the parent holds as data or zero (not absent)
    root: Path  # the chain's bottom layer (where its tracker's arming is recorded)
    layers: int  # layers of the parent's chain, the parent included
    # The layers under the parent, its own parent first, as the table file names them (relative to
    # the parent's directory, or absolute): the rest of the chain list this dump's table records.
    names: list[str]

    @functools.cached_property
    def np_table(self) -> PageTable:
        """`table` with numpy columns, made once for the dump (which never changes the table): a
        small table's numpy() is a new one each call, and kept() asks for one twice a batch."""
        return self.table.numpy()


def _check_directory(directory: Path) -> None:
    """Before anything is frozen: the directory exists (created 0700) and can take a layer."""
    ensure_dir(directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CkptError(f"dump directory {directory} is not writable")


def _open_parent(
    pid: int,
    start_time: int,
    directory: Path,
    parent: Path | None,
    below: MergedView | None = None,
    table: PageTable | None = None,
) -> _Parent:
    if parent is None:
        layers = find_layers(directory)
        if not layers:
            raise TrackerError(
                f"no earlier layer in {directory} to dump incrementally on; make a full dump first"
            )
        parent = layers[-1]
    layer = Layer.open(parent)
    inv = layer.meta.inventory
    if inv.pid != pid:
        raise TrackerError(
            f"{parent} is a dump of another process (pid {inv.pid}, {inv.comm}), not of pid {pid}"
        )
    if inv.boot_id != boot_id():
        raise TrackerError(f"{parent} was dumped before a reboot: pid {pid} now is another process")
    if inv.start_time != start_time:
        raise TrackerError(
            f"pid {pid} is not the process dumped in {parent} (start time {inv.start_time}; "
            f"now start time {start_time}): the pid was reused"
        )
    if (directory / LOST_MARKER).exists():
        raise TrackerError(
            f"dirty tracking for {directory} was lost by an earlier failed dump; make a full dump to re-arm"
        )
    # The parent's table file, checked against the parent: no other layer of the chain is opened,
    # so this costs the same at 2 layers and at 2000. Else (missing, stale, corrupt; a migration's
    # chain) the walk of the whole chain. A small chain's table in array columns (no numpy).
    cached = tablecache.load(layer, small=True) if below is None and table is None else None
    if cached is not None and not _chain_there(parent, cached.names):
        cached = None  # a layer under it deleted: the walk refuses, saying which (no layer on a broken chain)
    if cached is not None:
        view, pt, root, nlayers, names = None, cached.table, cached.root, cached.ref.layers, cached.names
    else:
        try:
            view = MergedView(layer, below=below)
        except BaseException:
            layer.close()
            raise
        pt = table if table is not None else view.page_table(small=True)
        root, nlayers = view.layers[-1].path, len(view.layers)
        names = [_rel(lay.path, parent.parent) for lay in view.layers[1:]]
    if ranges.is_small(pt.addr):  # a small table's columns (no numpy)
        present: Any = array("Q", [a for a, s in zip(pt.addr, pt.state, strict=True) if s])
    else:
        present = pt.addr[pt.state != 0]
    return _Parent(parent, layer, view, pt, present, root, nlayers, names)


def _chain_there(parent: Path, names: list[str]) -> bool:
    """Whether the parent's table file may stand for its chain: every layer under the parent is
    still there (old layers pruned, or one deleted anywhere in the middle, leave a chain no restore
    can read). `names` as the table file records them (relative to the parent's directory, or
    absolute). A stat each, or one listing of the parent's directory for more than 256 of them
    (plain names, the usual chain): at most ~1 ms for 2000 layers, against the walk's seconds."""
    d = str(parent.parent)
    plain = [n for n in names if "/" not in n]
    if len(plain) > 256:  # (a stat ~3.5 us; a listing of 2000 entries ~0.9 ms)
        try:
            there = set(os.listdir(d))
        except OSError:
            return False
        if not there.issuperset(plain):
            return False
        names = [n for n in names if "/" in n]
    return all(os.path.exists(os.path.join(d, n)) for n in names)


def _file_id(path: str) -> dict[str, int] | None:
    got = procgrab.take_stat(path)  # (the exe's: read by the freeze's grab, ckpt/proc/grab.py)
    if got is not None:
        return FileId(*got).to_dict()
    try:
        return FileId.of(os.stat(path)).to_dict()
    except OSError:
        return None


def _readlink(p: str) -> str:
    try:
        return procfs.readlink(p)
    except OSError:
        return ""


def _read_bytes(p: str) -> bytes:
    try:
        return procfs.slurp(p)
    except OSError:
        return b""


def _tracker_fds(state: dict[str, Any] | None) -> set[int]:
    """The descriptor a tracker put into the target (uffd-wp's), which the dump leaves out of its fds."""
    fd = (state or {}).get("fd")
    return {fd} if isinstance(fd, int) else set()


def _busy_warning(state: dict[str, Any] | None, pid: int) -> list[str]:
    busy = [r for r in (state or {}).get("refused", []) if r[2] == errno.EBUSY]
    if not busy:
        return []
    mib = sum(r[1] - r[0] for r in busy) / 2**20
    return [
        f"{len(busy)} mappings ({mib:.1f} MiB) are write-protect-tracked by another userfaultfd (another "
        "ckpt chain of this process, or the process's own): they are read whole each time; "
        f"`ckpt untrack --pid {pid}` removes ckpt's tracking of every chain"
    ]


def _check_alive(pid: int) -> None:
    """Fail if the target died while frozen. A SIGKILL to a ptrace-stopped process takes effect
    asynchronously, so the copy may even have succeeded: a layer of a process that is gone would
    look valid, and the user asked to dump a live one."""
    try:
        status = status_fields(pid, ("State", "SigPnd", "ShdPnd"))  # (not the whole dict: in the freeze)
    except TargetExited:
        raise TargetExited(f"process {pid} exited during the dump") from None
    pending = int(status.get("ShdPnd", "0"), 16) | int(status.get("SigPnd", "0"), 16)
    # status' State is stat's state (the kernel's get_task_state() for both): one read, not two.
    if status.get("State", "")[:1] in ("Z", "X") or pending >> (signal.SIGKILL - 1) & 1:
        raise TargetExited(f"process {pid} exited during the dump (killed)")


def _with_vdso(pp: np.ndarray, vdso: list[Vma]) -> np.ndarray:
    """Every page of [vdso] added to a present set: its non-present pages are kernel text, not zeros.
    Spliced in by binary search: a union would sort everything (~6 ms for a GiB)."""
    if ranges.is_small(pp):
        for v in vdso:
            lo, hi = bisect.bisect_left(pp, v.start), bisect.bisect_left(pp, v.end)
            pp = pp[:lo] + array("Q", range(v.start, v.end, PAGE_SIZE)) + pp[hi:]
        return pp
    for v in vdso:
        lo, hi = np.searchsorted(pp, [v.start, v.end])
        pp = np.concatenate([pp[:lo], np.arange(v.start, v.end, PAGE_SIZE, dtype=np.uint64), pp[hi:]])
    return pp


def _is_shm(v: Vma) -> bool:
    """Shared memory whose pages a tracker may not see change (or leave the page table): shared
    anonymous memory, and shared mappings of memfds and SysV segments (written through an fd too)."""
    return v.shared and (v.path == SHARED_ANON_PATH or is_shmem_object(v.path))


def _present(pid: int, tv: list[Vma], small: bool = True) -> np.ndarray:
    """Present pages of the mappings, [vdso] whole, and every page a shared anonymous object holds.
    ``small`` False: numpy's set at once, for a process known to be big (no bounded walk first)."""
    pp = _with_vdso(present_pages(pid, tv, small=small), [v for v in tv if v.path == "[vdso]"])
    shm = shmem_pages(pid, tv)
    return ranges.union(pp, shm) if len(shm) else pp


def _vma_start(v: Vma) -> int:
    return v.start


def _present_in(pid: int, dv: list[Vma], cand: list[tuple[int, int]]) -> np.ndarray:
    """_present, restricted to the candidate ranges (clipped to the copied mappings). ``cand``:
    sorted and disjoint (ranges.merge); ``dv`` disjoint, in any order."""
    inside: list[Vma] = []
    spans: list[tuple[int, int]] = []
    # Each candidate's mappings found by bisection: comparing every mapping with every candidate
    # cost an 8-thread process ~0.15 ms of its freeze (~60 mappings, a stack guard a thread among
    # the candidates). (Sorted first: a list in address order, as copied_vmas gives it, costs the
    # sort one pass.)
    dv = sorted(dv, key=_vma_start)
    for a, b in cand:
        i = max(bisect.bisect_right(dv, a, key=_vma_start) - 1, 0)
        while i < len(dv) and dv[i].start < b:
            v = dv[i]
            if a < v.end:
                if not inside or inside[-1] is not v:  # (one mapping across two candidates)
                    inside.append(v)
                spans.append((max(a, v.start), min(b, v.end)))
            i += 1
    # [vdso] goes in whole below: no page-table walk for it (an idle process's only candidate, so
    # its incremental freeze opens no pagemap and makes no scan here).
    vdso = [v for v in inside if v.path == "[vdso]"]
    if vdso:
        spans = [(a, b) for a, b in spans if not any(v.start <= a < v.end for v in vdso)]
    pp = present_in(pid, ranges.merge(spans), small=True) if spans else ranges.empty()
    return _with_vdso(pp, vdso)


@dataclass
class _Asked:
    """What the process itself answered (one batch), and the page-table walks left running."""

    status: Mapping[str, str]
    timers: list[dict[str, Any]]
    wanted: set[int]
    ans: Mapping[Hashable, Result]
    pagetables: PageTableReads | Known
    cloned: dict[int, dict[str, str | None]]  # the other threads' (read_cloned, during the batch)
    cloned_raw: dict[int, tuple[bytes, bytes]]  # or their texts as the grab read them (take_cloned)


def _candidate_spans(
    dv: list[Vma], fresh: list[tuple[int, int]], whole: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Every present page of these is a candidate (the digest compare keeps the unchanged ones out):
    new or replaced mappings (fresh), mappings the tracker cannot follow (whole: for uffd-wp, [vdso]
    among them), those no tracker follows (not readable: Vma.forced), and shared anonymous memory,
    whole: a page out of the page table (MADV_DONTNEED, reclaim) still has its bytes in the object,
    which no tracker sees."""
    return ranges.merge(fresh + whole + [(v.start, v.end) for v in dv if v.forced or _is_shm(v)])


def _candidates(
    pid: int, dv: list[Vma], fresh: list[tuple[int, int]], whole: list[tuple[int, int]]
) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
    """uffd-wp's candidates: the shared pages (shmem_pages), the candidate ranges (_candidate_spans)
    and their present pages with the shared ones (the dirty set's `extra`)."""
    shm = shmem_pages(pid, dv)
    cand = _candidate_spans(dv, fresh, whole)
    extra = _present_in(pid, dv, cand)
    return shm, cand, ranges.union(extra, shm) if len(shm) else extra


def _questions(
    plan: Plan, tids: list[int], timers: list[dict[str, Any]], vmas: list[Vma], status: Mapping[str, str]
) -> set[int]:
    """_ask's questions added to ``plan``; the signals whose actions are asked."""
    handled = int(status.get("SigCgt", "0"), 16) | int(status.get("SigIgn", "0"), 16)
    query = [sig for sig in range(1, 65) if handled >> (sig - 1) & 1] + [signal.SIGCHLD]
    ask_props(plan, tids, timers, vmas)
    wanted = inject.ask_sigactions(plan, query)
    plan.add("brk", Call(nr.BRK, (0,)))  # brk(0) returns the current break: /proc has only start_brk
    plan.add("securebits", Call(nr.PRCTL, (nr.PR_GET_SECUREBITS,)))
    plan.add("dumpable", Call(nr.PRCTL, (nr.PR_GET_DUMPABLE,)))  # /proc cannot tell for root's ids
    return wanted


def _warm_questions(pid: int, vmas: list[Vma], nfds: int = 0) -> None:
    """_ask's questions and the code of their runs made now, while the process runs (~0.3 ms in a
    new ckpt process, 8 threads): the freeze finds both in their caches (props.ask's, batch's) if
    the threads, timers, signal actions, probe spot and end signal are the same then, and makes them
    again if not; so is the grab's list of what to read (procgrab.prime, for ``nfds`` fds). The end
    signal is guessed from the status read here. Nothing of the process is touched; a failure here
    only leaves the caches cold."""
    with contextlib.suppress(CkptError, OSError, KeyError, ValueError):
        status = read_status(pid)
        tids = list_threads(pid)
        procgrab.prime(pid, tids, nfds)
        plan = Plan()
        _questions(plan, tids, read_timers(pid), vmas, status)
        quiet = quiet_signals(int(status["SigIgn"], 16), int(status["SigCgt"], 16))
        sig = pick_signal(int(status["SigBlk"], 16), quiet)
        if sig is None:
            return
        lead = pid if pid in tids else tids[0]
        work = plan.by_thread(lead)
        seen: list[list[Call]] = []
        for calls in work.values():
            if calls not in seen:  # (every thread but the main one asks the same)
                seen.append(calls)
                for run in chunks(calls):
                    assemble_sp(run, 0, sig)
        # The leader's run that unmaps the code (Frozen.batch's release), sized as the mapping is.
        runs = chunks(work.get(lead, []))
        if len(runs) == 1:
            sizes = [code_size_sp(len(run)) for calls in work.values() for run in chunks(calls)]
            assemble_sp(runs[0], 0, sig, code_map_size(sum(sizes)))


def _ask(
    fz: Frozen,
    pid: int,
    vmas: list[Vma],
    lap: Callable[[str], None],
    plan: Plan | None = None,
    known: Known | None = None,
    grabbed: Callable[[], procgrab.Grabbed | None] = lambda: None,
    ended: Callable[[], None] | None = None,
    beside: Callable[[], None] | None = None,
) -> _Asked:
    """Whatever only the process itself can answer, in one batch (ptrace/batch.py: one injected run
    per thread instead of one injected syscall per question); then smaps' VmFlags and the guard
    regions start being read beside the rest of the freeze. Call it once the tracker is done (the
    arming's UFFDIO_REGISTER takes the mm's write lock; the run's stack writes belong after a dirty
    scan). ``ended``: called as soon as the runs have ended, ``beside`` while they run (Frozen.batch's
    ``ended``, ``meanwhile``)."""
    status = read_status_lazy(pid)
    timers = read_timers(pid)
    plan = Plan() if plan is None else plan  # (a tracker's calls may be in it already)
    wanted = _questions(plan, fz.tids, timers, vmas, status)
    # (the batch's code mapped in one stop: Frozen.syscall; its runs' quiet end signals)
    fz.note_sigign(status.get("SigIgn"), status.get("SigCgt"))
    cloned: dict[int, dict[str, str | None]] = {}
    cloned_raw: dict[int, tuple[bytes, bytes]] = {}
    others = [t for t in fz.tids if t != pid]

    def meanwhile() -> None:
        if beside is not None:
            beside()
        if not others:
            return
        # While the other threads run the batch: the grab joined (procgrab.c read their status and
        # loginuid beside the seize's end, grab.paths) and those parsed; without a grab, the files
        # read here (~40 us a thread that no longer waits for their stops). The batch's calls
        # change neither. (A single thread's run is shorter than the grab's parse: joined by the
        # collect, after a big process's scans have started.)
        with procgrab.prefetched(grabbed()):
            # Their bytes taken from the grab, parsed after the thaw (read_props' cloned_raw); where
            # the grab lacks one, read and parsed here.
            raw = take_cloned(pid, others)
            if raw is None:
                cloned.update(read_cloned(pid, others))
            else:
                cloned_raw.update(raw)

    mw = meanwhile if others or beside is not None else None
    ans = plan.run(fz, vmas, status.get("SigQ"), mw, release=True, ended=ended)
    # The batch's code goes now, before the page-table walks start: an injected munmap (and brk)
    # needs the mm's write lock, which the smaps walk holds (read) for as long as it takes.
    fz.release_code()
    pagetables = known or _walks(pid, vmas, status)
    lap("frozen: collect: inject")
    return _Asked(status, timers, wanted, ans, pagetables, cloned, cloned_raw)


def _walks(pid: int, vmas: list[Vma], status: Mapping[str, str]) -> PageTableReads:
    """smaps' VmFlags and the guard regions, read beside the rest of the freeze where it is big."""
    rss = int((status.get("VmRSS") or "0").split()[0]) << 10
    return PageTableReads(pid, background=rss >= PAGETABLES_BACKGROUND, vmas=vmas)


def _state_comm(pid: int, tid: int, ans: Mapping[Hashable, Result], main_state: str) -> tuple[str, str]:
    """A frozen thread's state and name. The name: PR_GET_NAME's answer (props.ask); the state: the
    main thread's from /proc/PID/stat, another's "t", what /proc shows for a thread in a ptrace-stop,
    which every thread of a freeze is in here. Read from the thread's stat where the batch has no
    answer (a call that failed)."""
    r = ans.get(("comm", tid))
    if r is None or r.ret != 0:
        return read_state_comm(pid, tid)
    comm = r.data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return (main_state if tid == pid else "t"), comm


def _collect(
    fz: Frozen,
    pid: int,
    tracker_fds: set[int],
    vmas: list[Vma],
    lap: Callable[[str], None],
    asked: _Asked,
    grabbed: Callable[[], procgrab.Grabbed | None],
    vouch: Callable[[procgrab.Grabbed | None], bool],
    object_limit: int = DEFAULT_OBJECT_LIMIT,
    tcp: TcpDump | None = None,
    held: Holder | None = None,
) -> dict[str, Any]:
    """Everything but the pages: threads, signals, fds, mm fields, properties. Runs frozen, after
    _ask. ``lap`` names each step's time. smaps' VmFlags and the guard regions are still being read
    ("pagetables"): the caller puts them in "vmflags" and the props' "guards" before the thaw.
    ``grabbed``: the grab started at the seize (ckpt/proc/grab.py), joined (if no one did before);
    what it read is taken from it. ``vouch``: whether the walks _ask kept still hold, asked of its
    fd table (where not, they are read after all: asked.pagetables)."""
    g = grabbed()
    if not vouch(g) and isinstance(asked.pagetables, Known):
        asked.pagetables = _walks(pid, vmas, asked.status)
    if isinstance(asked.pagetables, PageTableReads):
        asked.pagetables.begin()  # (a small process's smaps read beside the collect, from now)
    with procgrab.prefetched(g):
        return _collect_in(fz, pid, tracker_fds, vmas, lap, asked, object_limit, tcp, held)


def _collect_in(
    fz: Frozen,
    pid: int,
    tracker_fds: set[int],
    vmas: list[Vma],
    lap: Callable[[str], None],
    asked: _Asked,
    object_limit: int,
    tcp: TcpDump | None,
    held: Holder | None,
) -> dict[str, Any]:
    fz.read_threads()  # (every thread's XSAVE image and rseq registration in one call)
    fdinfo: dict[int, str] = {}  # read once: the locks' lines come from the same texts
    fd_list = [f for f in list_fds(pid, fdinfo, procgrab.take_table(pid)) if f.fd not in tracker_fds]
    objects, object_warnings = collect_objects(pid, vmas, fd_list, object_limit, held)
    listeners = listening_sockets(pid, fd_list)
    established = tcp.collect(pid, fd_list) if tcp is not None else []
    status, timers, wanted, ans = asked.status, asked.timers, asked.wanted, asked.ans
    lap("frozen: collect: fds")
    cwd = _readlink(f"/proc/{pid}/cwd")  # (once: the props' refusal of a literal " (deleted)" reads it)
    # Each thread's name as PR_GET_NAME answered it in the batch (the same task->comm the comm file
    # shows, no file read per thread); its stat where that answer is missing.
    st = read_stat(pid)
    tstat = {tid: _state_comm(pid, tid, ans, st.state) for tid in fz.tids}
    props = read_props(
        fz,
        pid,
        vmas,
        [f.fd for f in fd_list],
        ans,
        timers,
        status,
        vmflags=False,
        fdinfo=fdinfo,
        cwd=cwd,
        comms={tid: comm for tid, (_, comm) in tstat.items()},
        early=asked.cloned,
        cloned_raw=asked.cloned_raw or None,
    )
    lap("frozen: collect: props")
    threads = []
    for tid in fz.tids:
        threads.append(
            {
                "tid": tid,
                "regs": fz.get_regs(tid),
                "xsave": fz.get_xsave(tid),
                "sigmask": fz.get_sigmask(tid),
                "state": tstat[tid][0],
                "rseq": _list_or_none(props.rseq.get(tid)),
                "props": props.threads.get(tid),
            }
        )
    lap("frozen: collect: threads")
    sigactions = functools.partial(inject.sigaction_dicts, pid, wanted, ans)  # (parsed in later())
    brk = ans["brk"].ret
    exe = _readlink(f"/proc/{pid}/exe")
    mm = {
        "start_code": st.start_code,
        "end_code": st.end_code,
        "start_data": st.start_data,
        "end_data": st.end_data,
        "start_brk": st.start_brk,
        "brk": brk if brk > 0 else st.start_brk,
        "start_stack": st.start_stack,
        "arg_start": st.arg_start,
        "arg_end": st.arg_end,
        "env_start": st.env_start,
        "env_end": st.env_end,
        "auxv": _read_bytes(f"/proc/{pid}/auxv"),
        "cmdline": _read_bytes(f"/proc/{pid}/cmdline"),
        "environ": _read_bytes(f"/proc/{pid}/environ"),
        "cwd": cwd,
        "root": _readlink(f"/proc/{pid}/root"),
        "exe": exe,
        "exe_file": _file_id(f"/proc/{pid}/exe"),
    }
    fds = [dict(vars(f)) for f in fd_list]  # flat records: asdict's deep copy costs ~30 us each
    dups = dup_sources(pid, fd_list)
    for f in fds:
        if f["fd"] in dups:
            f["dup_of"] = dups[f["fd"]]
    task = _task(fz, pid, ans, status)
    lap("frozen: collect: task")
    out: dict[str, Any] = {
        "objects": objects,
        "inet_listen": listeners,
        "tcp_established": established,
        "object_warnings": object_warnings,
        "props": props.record,
        "vmflags": props.vmflags,
        "threads": threads,
        "sigactions": None,
        "mm": mm,
        "fds": fds,
        "pipes": read_pipes(pid, fd_list),
        "anonfds": read_anonfds(pid, fd_list, fdinfo),
        "task": None,
        "pagetables": asked.pagetables,
        "comm": st.comm,
        "exe": exe,
        "pidns": read_ns_ids(pid, fz.tids, status),  # None in ckpt's own pid namespace
    }
    finish = props.finish

    def later() -> None:
        # What this freeze read, parsed after the thaw: nothing in it reads the process again (the
        # signal actions from the batch's answers, the task's record from its reads (_task), the
        # other threads' cloned state from the grab's bytes (read_props)): ~0.1-0.2 ms less frozen.
        out["sigactions"] = sigactions()
        out["task"] = task()
        if finish is not None:
            finish()

    out["later"] = later
    return out


def _list_or_none(t: tuple[int, ...] | None) -> list[int] | None:
    return None if t is None else list(t)


def _task(
    fz: Frozen, pid: int, ans: Mapping[Hashable, Result], status: Mapping[str, str]
) -> Callable[[], dict[str, Any]]:
    """Credentials, umask, personality, limits, children: read from outside (/proc, prlimit). Only
    what /proc cannot tell is asked of the process itself. Returns the record's maker: the reads
    are made now, frozen; their parse when it is called, after the thaw (~0.1 ms of the freeze:
    nothing in it reads the process again). Pending signals are added at the end of the freeze,
    once no more injection can take one off a thread."""
    reads = read_task_reads(pid, status)
    umask: int | None = None
    if not status.get("Umask"):  # Linux < 4.7: no "Umask:" in /proc/PID/status; umask() returns the old one
        umask = fz.syscall(nr.UMASK, 0o022)
        fz.syscall(nr.UMASK, umask)
    children = list_children(pid, fz.tids)
    securebits, dumped = ans["securebits"].ret, ans["dumpable"].ret
    filters = _filters(pid, status)

    def record() -> dict[str, Any]:
        ti = task_info(reads)
        dumpable = ti.dumpable
        if dumpable is None:  # effective uid and gid 0: /proc/PID files are root's either way
            dumpable = dumped == 1
        return {
            "uid": list(ti.uid),
            "gid": list(ti.gid),
            "groups": list(ti.groups),
            "umask": ti.umask if umask is None else umask,
            "personality": ti.personality,
            "dumpable": dumpable,
            "rlimits": {k: list(v) for k, v in ti.rlimits.items()},
            "children": children,
            "pending": [],
            "security": _security(pid, securebits, status, filters),
        }

    return record


def _filters(pid: int, status: Mapping[str, str]) -> list[dict[str, Any]] | None:
    """The seccomp filters, read with ptrace while frozen ([] in any mode but 2; None when reading
    them is not allowed: the restore then refuses)."""
    if status.get("Seccomp", "0").split()[:1] != ["2"]:
        return []
    try:
        return [{"prog": p, "flags": f} for p, f in read_filters(pid)]
    except OSError:
        return None


def _security(
    pid: int, securebits: int, status: Mapping[str, str], filters: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """Capabilities, no_new_privs and seccomp from /proc; securebits asked of the process; the
    seccomp filters as _filters read them."""
    s = read_security(pid, status)
    return {
        **{k: getattr(s, k) for k in ("cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb")},
        "securebits": securebits,
        "no_new_privs": s.no_new_privs,
        "seccomp_mode": s.seccomp_mode,
        "filters": filters,
    }


def _pending(fz: Frozen) -> list[dict[str, Any]]:
    """The signals Frozen took off threads (a thread stopped to take one, or one arrived during an
    injected syscall): no longer in the kernel's pending sets, they are given back at thaw, but with
    --kill they would be lost. The layer keeps them as pending. (Frozen gives their numbers, not
    their siginfo: a restore sends them again by number.)"""
    live = set(fz.tids)
    held = [
        {"tid": tid, "sig": sig, "info": None}
        for tid, sigs in sorted(fz.held_signals.items())
        if tid in live
        for sig in sigs
    ]
    # And those still in the kernel's queues (blocked, or not yet delivered), with their siginfo.
    try:
        return held + queued_signals(fz.tids)
    except ProcessLookupError:  # ESRCH from a thread held in a stop: a SIGKILL took the process
        _check_alive(fz.pid)
        raise


def _has_pages(present: np.ndarray, v: Vma) -> bool:
    return ranges.any_in(present, v.start, v.end)


def _vma_records(
    vmas: list[Vma], unreadable: set[int], present: np.ndarray, vmflags: dict[int, str]
) -> list[dict[str, Any]]:
    out = []
    files: dict[str, dict[str, int] | None] = {}
    for v in vmas:
        if v.is_special:
            status = "skipped"
        elif v.start in unreadable or (v.forced and not _has_pages(present, v)):
            # A mapping the process cannot read and that holds no page (an untouched PROT_NONE
            # reservation, a guard, a library's gap) has nothing to take: its pages are zeros or the
            # file's. Not calling it dumped keeps it out of every page table built from the layer,
            # which for a reservation of many GiB would be millions of entries of nothing.
            status = "unreadable"
        else:
            status = "dumped"
        f = None
        if v.is_file and v.path.startswith("/"):
            if v.path not in files:
                files[v.path] = _file_id(v.path)
            f = files[v.path]
            if f is not None and f["ino"] != v.inode:
                f = None  # the path now names another file (deleted, replaced)
        out.append(
            {
                "start": v.start,
                "end": v.end,
                "perms": v.perms,
                "offset": v.offset,
                "dev": v.dev,
                "inode": v.inode,
                "path": v.path,
                "status": status,
                "file": f,
                "flags": vmflags.get(v.start),
            }
        )
    return out


class _Pages:
    """Pages copied from the target into buffers faulted in before the freeze.

    Memory is bounded by `max_pages`: when the buffers are full, `flush` (compress and write, still
    frozen) empties them and they are reused, so a dump larger than the budget streams instead of
    growing. Large copies use two threads (ctypes drops the GIL in process_vm_readv): measured here
    at ~6.5 GB/s against ~4 GB/s for one.
    """

    PARALLEL_MIN = 1024  # pages (4 MiB): below this a second thread costs more than it brings

    def __init__(
        self, est_pages: int, max_pages: int, early: EarlyBuffer | None = None, pool: BufferPool | None = None
    ) -> None:
        self.max_pages = max_pages
        self.pool = pool  # a migration's buffer, kept from round to round
        first = min(est_pages, max_pages)
        self.buffers: list[PageBuffer] = []
        if early is not None:
            m, populated = early.take()
            if early.npages <= max_pages and early.npages <= 2 * first + 256:
                self.buffers.append(PageBuffer.adopt(m, early.npages, populated, early.private))
                first -= early.npages
            else:  # the guess was far off (a process of shared file pages, say): give it back
                with contextlib.suppress(BufferError):
                    m.close()
        if first > 0:
            self.buffers.append(pool.get(first) if pool is not None else PageBuffer(first))
        self.used: list[int] = [0] * len(self.buffers)
        self.filled: list[tuple[PageBuffer, int, np.ndarray]] = []  # (buffer, first page, pages read)
        self.unreadable: list[int] = []
        self.nbytes = 0

    def _room(self) -> tuple[int, int]:
        """(buffer index, free pages) of a buffer with room, allocating within the budget."""
        for i, b in enumerate(self.buffers):
            if self.used[i] < b.npages:
                return i, b.npages - self.used[i]
        have = sum(b.npages for b in self.buffers if not b.borrowed)
        if have >= self.max_pages:
            return -1, 0
        return len(self.buffers), self.max_pages - have

    def read(
        self, pid: int, addrs: np.ndarray, flush: Callable[[list[tuple[PageBuffer, int, np.ndarray]]], None]
    ) -> None:
        pos = 0
        while pos < len(addrs):
            i, room = self._room()
            if i < 0:
                flush(self.take())  # stream what we hold (still frozen), then reuse the buffers
                self.used = [0] * len(self.buffers)
                continue
            if i == len(self.buffers):  # the estimate was short: grow (faults inside the freeze)
                self.buffers.append(PageBuffer(min(room, len(addrs) - pos)))
                self.used.append(0)
                room = self.buffers[i].npages
            take = addrs[pos : pos + room]
            buf, off = self.buffers[i], self.used[i]
            if len(take) >= self.PARALLEL_MIN:
                half = len(take) // 2
                with ThreadPool(2, "ckpt-read") as ex:
                    first = ex.submit(read_pages, pid, take[:half], buf, off)
                    second = ex.submit(read_pages, pid, take[half:], buf, off + half)
                    parts = [(off, first.result()), (off + half, second.result())]
            else:
                parts = [(off, read_pages(pid, take, buf, off))]
            for o, rr in parts:
                self.unreadable.extend(int(x) for x in rr.failed)
                self.filled.append((buf, o, rr.addrs))
                self.nbytes += rr.nbytes
            self.used[i] += len(take)
            pos += len(take)

    def take(self) -> list[tuple[PageBuffer, int, np.ndarray]]:
        f, self.filled = self.filled, []
        return f

    def borrow(self, rows: PageBuffer) -> None:
        """Fill `rows` (another's buffer, not closed or pooled here) before our own buffers."""
        self.buffers.insert(0, rows)
        self.used.insert(0, 0)

    def close(self) -> None:
        for b in self.buffers:
            if b.borrowed:
                continue
            if self.pool is not None and b.npages <= self.max_pages:
                self.pool.put(b)
            else:
                b.close()
        self.buffers = []


@contextlib.contextmanager
def _publish_or_abort(writer: LayerWriter, on_abort: Callable[[], None]) -> Iterator[LayerWriter]:
    try:
        yield writer
    except BaseException:
        writer.abort()
        on_abort()
        raise


_D = TypeVar("_D")


def _remove_new_directory_on_failure(fn: Callable[..., _D]) -> Callable[..., _D]:
    """A failed dump into a directory it had to create leaves no empty directory behind."""

    @functools.wraps(fn)
    def wrapper(pid: int, directory: str | Path, *args: Any, **kw: Any) -> _D:
        d = Path(directory)
        existed = os.path.lexists(d)
        try:
            return fn(pid, directory, *args, **kw)
        except BaseException:
            if not existed:
                # Only ckpt's own bookkeeping (the lock, the arm record) may be in it: then it goes;
                # anything else (a layer already written) stays, and so does the directory.
                with contextlib.suppress(OSError):
                    if set(os.listdir(d)) <= {LOCK_NAME, ARMED_NAME}:
                        for n in (LOCK_NAME, ARMED_NAME):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(d / n)
                    d.rmdir()
            raise

    return wrapper


@_remove_new_directory_on_failure
@sigchld.blocking  # every thread the dump starts inherits it (ptrace/sigchld.py)
def dump(pid: int, directory: str | Path, **options: Any) -> DumpResult:
    """Add one layer for process `pid` to `directory` (options: see _dump), holding the directory's
    lock throughout: one dump at a time per directory and per chain (ckpt/chainlock.py)."""
    with contextlib.ExitStack() as locks:
        return run_handed_over(_dump(pid, directory, locks=locks, hand_over=True, **options))


def run_handed_over(gen: Generator[None, Any, DumpResult]) -> DumpResult:
    """Run a dump with `hand_over`: up to its thaw in a thread that ends right after it, so that the
    thaw lets threads frozen inside a blocking syscall go straight back into it (ptrace/parting.py),
    and the rest (compression, publishing) here. Signals are deferred meanwhile, as in a freeze."""
    from ckpt.ptrace.parting import in_exiting_thread

    def frozen_part() -> DumpResult | None:
        try:
            next(gen)
        except StopIteration as e:
            return e.value  # it never froze, or killed its process: all done there
        return None

    # Held until the dump has ended either way, not only over the freeze: a Ctrl-C is taken only
    # where the dump looks for it (`interrupted` in _dump), so its failure path always runs. Python
    # runs signal handlers in this thread alone, which waits in a join while the freezing thread
    # works: that thread may miss a Ctrl-C that came during the freeze, and once thawed a
    # KeyboardInterrupt raised here would leave the dump suspended at its hand-over, its tracker
    # (an injected userfaultfd) in the target.
    with deferred_signals():
        try:
            done = in_exiting_thread(frozen_part)
            return done if done is not None else run_to_end(gen)
        finally:
            gen.close()  # ended: nothing; left at its hand-over: GeneratorExit runs its failure path


def run_to_end(gen: Generator[None, Any, DumpResult]) -> DumpResult:
    """Run a dump that holds no outer freeze (it never stops at the thaw) to its result."""
    try:
        next(gen)
    except StopIteration as e:
        return e.value
    gen.close()
    raise AssertionError("a dump without frozen= stopped at its thaw")


def _dump(
    pid: int,
    directory: str | Path,
    *,
    incremental: bool = False,
    track: str = "auto",
    parent: str | Path | None = None,
    leave_stopped: bool = False,
    # With leave_stopped: told [pid] before the thaw's SIGSTOP, only where that stop is ckpt's own
    # (not a job-control stop of someone else's: ckpt.ptrace.freeze.thaw_all). A migration's.
    before_stop: Callable[[list[int]], None] | None = None,
    kill: bool = False,
    force: bool = False,
    final: bool = False,
    pre_dump: bool = False,
    fallback_full: bool = False,
    level: int = DEFAULT_LEVEL,
    threads: int = 2,
    max_buffer: int = DEFAULT_MAX_BUFFER,
    precopy: bool | None = None,
    progress: Progress | None = None,
    on_lap: Callable[[str], None] | None = None,  # after each step of phases_ms (tests interrupt there)
    ghost_limit: int = DEFAULT_OBJECT_LIMIT,
    early_buffer: EarlyBuffer | None = None,
    writer_options: dict[str, Any] | None = None,  # LayerWriter's tee, keep_chunks, compress (migration)
    parent_below: MergedView | None = None,  # the open chain under the parent (a migration's rounds)
    parent_table: PageTable | None = None,  # the parent chain's page table, kept by a migration
    walks_cache: PageTablesCache | None = None,  # a pre-dump's smaps walk, reused by the next one
    buffer_pool: BufferPool | None = None,  # the copy buffer, kept from one dump to the next
    locks: contextlib.ExitStack,
    frozen: Frozen | None = None,
    hand_over: bool = False,  # stop right after the thaw (run_handed_over)
    ignore_fds: frozenset[int] = frozenset(),
    tcp_established: bool = False,  # dump established TCP connections (ckpt/proc/tcp.py)
    tree_share: TreeShare | None = None,  # a tree dump's shared memory, stored once (ckpt/treeshare.py)
    tcp_dump: TcpDump | None = None,  # the caller's, kept after the dump (a migration's final round)
    downtime: bool = False,  # its caller waits, the process stopped, for its end (ckpt/lastround.py)
    records: RecordMemo | None = None,  # a migration's: records equal to its last round's (image/recmemo.py)
) -> Generator[None, Any, DumpResult]:
    """Add one layer for process `pid` to `directory`; see the module docstring for the order.

    A generator: with `frozen` (a process of a tree, frozen with the whole tree by ckpt/dumptree.py)
    it stops where it would thaw, and is resumed once every process of the tree is collected and the
    tree thawed, with the tree record to store (the root's) or None. The tree is killed, and its
    children checked, by the caller. Without `frozen` it runs straight through. `ignore_fds`: fds
    that are ckpt's, not the process's (a tree member's copy of its parent's tracker fd)."""
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    tick = [t0]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + (now - tick[0]) * 1e3, 3)
        tick[0] = now
        if on_lap is not None:
            on_lap(name)

    def interrupted() -> None:
        """Stop here on a Ctrl-C that run_handed_over holds: through this dump's failure path."""
        if (hand_over or frozen is not None) and signals_held():
            raise KeyboardInterrupt

    if leave_stopped and kill:
        raise CkptError("--leave-stopped and --kill contradict each other")
    try:
        check_level(level)  # before anything touches the target
    except ValueError as e:
        raise CkptError(str(e)) from None
    if pre_dump and (kill or final or leave_stopped or track == "none"):
        raise CkptError(
            "--pre-dump copies a running process: it needs tracking, "
            "and no --kill, --final or --leave-stopped"
        )
    directory = Path(directory)
    st = check_dumpable(pid)
    if frozen is None:  # (a tree's member: dumptree.py asks the root's parent, shared_tables the rest)
        mmshare.refuse(pid, with_children=True)
    if read_security(pid).seccomp_mode == 1 and not _has_cap(CAP_SYS_ADMIN):
        raise CkptError(
            f"process {pid} is in seccomp strict mode: a syscall injected by the dump would kill it, "
            "and suspending seccomp while tracing needs CAP_SYS_ADMIN"
        )
    _check_directory(directory)
    locks.callback(DirLock(directory).close)
    in_tree = frozen is not None
    tcp = tcp_dump or locks.enter_context(
        TcpDump(
            tcp_established,
            keep=kill and not in_tree,
            in_tree=in_tree,
            force=kill and force,
            live=pre_dump,
        )
    )
    warnings: list[str] = []
    note = progress or (lambda phase, done, total: None)

    par: _Parent | None = None
    did_fallback = False
    tracker: Tracker | None = None
    if incremental:
        try:
            par = _open_parent(
                pid, st.start_time, directory, Path(parent) if parent else None, parent_below, parent_table
            )
            # Its layers closed with the dump (those below are the caller's when it gave them).
            locks.callback(par.view.close if parent_below is None and par.view else par.layer.close)
            ptrk = par.layer.meta.inventory.tracker
            if ptrk is None:
                raise TrackerError(
                    f"the parent layer {par.path} was dumped without dirty tracking (--track none)"
                )
            if track not in ("auto", ptrk):
                raise TrackerError(
                    f"the parent layer {par.path} was tracked with {ptrk}; --track {track} differs"
                )
            tracker = get_tracker(ptrk)
            tracker.check_armed(pid, par.layer.meta.inventory.tracker_state)
            if ptrk in REARMED:
                root = par.root
                if root.parent.resolve() != directory.resolve():
                    locks.callback(DirLock(root.parent).close)  # the chain's record lives there
                check_parent(pid, par.path, par.layer.meta.inventory.tracker_state, root)
        except TrackerError as e:
            if not fallback_full:
                raise
            warnings.append(f"{e}; making a full dump instead (--fallback-full)")
            par, incremental, did_fallback = None, False, True
    if not incremental:
        # A dump that kills its target, or that is the last, has nothing to track afterwards.
        tracker = None if (track == "none" or kill or final) else get_tracker(track)

    lap("prepare")
    vmas0 = read_maps(pid)
    est = estimate_pages(pid, vmas0, tracker.name if tracker else None, incremental)
    # Trackers leave out mappings that are not readable; a dump copies their present pages each time.
    est += count_present(pid, [v for v in vmas0 if v.forced])
    if est > small_max():
        # A big set's page arrays are numpy's (ckpt/pageset.py): imported here, beside the copy
        # buffer's fault-in, not on first use inside the freeze (~60-130 ms of it at 256 MiB).
        import numpy  # noqa: F401
    max_pages = max(max_buffer // PAGE_SIZE, BATCH_PAGES)
    # Slack for pages that appear between the estimate and the freeze (a shortfall grows the buffer
    # inside the freeze). A full dump's estimate is the present set itself: a 1/16 margin keeps the
    # dumper's memory near the target's (1/4 made it 1.3x at 1 GiB); a dirty set can grow faster.
    # A full dump takes the buffer the CLI had faulted in while it imported (ckpt/prefault.py).
    early = early_buffer if par is None and not pre_dump else None
    live = _use_precopy(precopy, tracker, par, pre_dump, frozen, est, max_pages, warnings)
    # With a live pre-copy the freeze copies only what is written meanwhile (a busy writer's hot set).
    pages = _Pages(
        (est // 4 if live else est) + (est // 4 if incremental else est // 16) + 256,
        max_pages,
        early,
        buffer_pool,
    )

    lap("buffer")
    name = next_layer_name(directory)
    writer = LayerWriter(directory, name, level=level, threads=threads, **(writer_options or {}))
    state: dict[str, Any] | None = None
    consumed = False  # the tracker's dirty bits were read and reset in this dump
    # Recorded before the freeze as the chain's last arming: should this dump die after re-arming,
    # later incrementals on the parent are refused instead of missing what was written before it.
    arm_id: str | None = None
    arming: tuple[Path, ArmRecord | None] | None = None
    if tracker is not None and tracker.name in REARMED:
        root = writer.path if par is None else par.root
        arm_id = new_arm_id()
        arming = (root, read_record(root) if par is not None else None)
        try:
            write_record(root, ArmRecord(arm_id, layer_ref(writer.path, root)))
        except BaseException:
            writer.abort()
            raise

    def unarm() -> None:
        """A dump that fails before it touched the tracker leaves the record as it found it."""
        if arming is not None and not consumed:
            with contextlib.suppress(CkptError):
                write_record(*arming)

    # The merged table of the chain this layer tops, recorded in it and written beside it for the
    # next dump (ckpt/image/tablecache.py). Not for a migration's rounds, which keep their table
    # in memory (migrate/chaintable.py) and whose last round is in the downtime.
    keep_table = writer_options is None and not downtime
    table_body: list[tuple[bytes, int]] = []  # (the table file's body, its rows)

    def filled(meta: LayerMeta) -> None:
        t = tablecache.next_table(par.table if par is not None else None, meta)
        layers = par.layers + 1 if par is not None else 1
        if layers > MAX_CHAIN:
            return  # a chain no reader opens: no table, and the next dump refuses as a walk would
        root = _rel(par.root, directory) if par is not None else writer.path.name
        body = tablecache.encode(t, _chain_names(par, directory))
        meta.table = tablecache.table_ref(body, len(t), layers, root)
        table_body.append((body, len(t)))

    stats: dict[str, int] = {"dumped": 0, "zero": 0, "unchanged": 0, "absent": 0, "processed": 0}
    zero_addrs: list[ranges.Pages] = []
    unchanged_addrs: list[ranges.Pages] = []
    freeze_ms = 0.0
    held_ms = 0.0  # the seize to the thaw's end (a dump that thaws its target itself)

    def full_batch_done(zero: np.ndarray, stored: int) -> None:
        zero_addrs.append(zero)
        stats["zero"] += len(zero)
        stats["dumped"] += stored
        stats["processed"] += len(zero) + stored
        note("compress", stats["processed"], len(to_read))

    def process(bufs: list[tuple[PageBuffer, int, np.ndarray]] | list[Gathered]) -> None:
        """Zero detection, digests, unchanged pages; the rest goes to the writer (compressed in threads).
        Returns once no thread of the writer reads the buffers any more (they may be reused)."""
        for part in bufs:
            if isinstance(part, Gathered):
                gathered(part)
                continue
            buf, first, addrs = part
            n = len(addrs)
            for lo in range(0, n, BATCH_PAGES * 16):
                interrupted()
                hi = min(n, lo + BATCH_PAGES * 16)
                view = buf.view[(first + lo) * PAGE_SIZE : (first + hi) * PAGE_SIZE]
                a = addrs[lo:hi]
                if par is None and ranges.is_small(a):  # no numpy: the writer takes the bytes
                    writer.add_batch(a, view, full_batch_done)
                    continue
                if par is None:
                    # A full dump keeps every page but the zero ones: all of it (zero detection
                    # included) runs on the writer's threads, this one only hands out batches.
                    arr = np.frombuffer(view, dtype=np.uint8).reshape(hi - lo, PAGE_SIZE)
                    writer.add_batch(a, arr, full_batch_done)
                    continue
                if ranges.is_small(a):  # the same, without numpy
                    keep = kept_small(a, zero_flags(view), digest_array(view))
                    writer.add_rows(array("Q", [a[i] for i, _ in keep]), view, [i for i, _ in keep],
                                    array("Q", [x for _, x in keep]))  # fmt: skip
                    stats["dumped"] += len(keep)
                    stats["processed"] += hi - lo
                    note("compress", stats["processed"], len(to_read))
                    continue
                z = zero_mask(view, hi - lo)
                # Only an incremental dump needs digests here (to find dirty-but-unchanged pages);
                # a full one's writer threads compute them beside compression.
                d = page_digests(view, hi - lo)
                idx = kept(a, z, d)
                arr = np.frombuffer(view, dtype=np.uint8).reshape(hi - lo, PAGE_SIZE)
                # The writer gathers the kept pages straight into its recycled chunk buffers.
                writer.add_rows(a[idx], arr, idx, d[idx])
                stats["dumped"] += len(idx)
                stats["processed"] += hi - lo
                note("compress", stats["processed"], len(to_read))
        writer.drain()

    def gathered(g: Gathered) -> None:
        """process() for pages already digested, lying at rows of one buffer (a pre-copied dump's
        live and frozen copies, ckpt/precopy.py): no merge copy, one gather by the writer."""
        d = g.digests.copy()
        idx = kept(g.addrs, g.zero, d)
        writer.add_rows(g.addrs[idx], g.pages, g.rows[idx], d[idx])
        stats["dumped"] += len(idx)
        stats["processed"] += len(g.addrs)
        note("compress", stats["processed"], len(to_read))

    def kept(a: np.ndarray, z: np.ndarray, d: np.ndarray) -> np.ndarray:
        """An incremental dump's pages `a` (zero flags `z`, digests `d`, set to the zero page's where
        `z`): counts the zero ones and those the parent holds unchanged; the indexes of the rest."""
        assert par is not None
        d[z] = ZERO_PAGE_DIGEST
        _, pd = par.np_table.lookup(a)
        same = par.np_table.mapped(a) & ~fresh_mask_for(a) & (pd == d)
        if exact:
            unchanged_addrs.append(a[same])
            stats["unchanged"] += int(same.sum())
        keep_zero = z & ~same
        zero_addrs.append(a[keep_zero])
        stats["zero"] += int(keep_zero.sum())
        return np.nonzero(~z & ~same)[0]

    def kept_small(a: Any, z: list[bool], d: Any) -> list[tuple[int, int]]:
        """kept() for a small set (no numpy): the (row, digest) of each page to store."""
        assert par is not None
        # The parent's table answers in its own kind (numpy's for a big chain).
        q = a if ranges.is_small(par.table.addr) else np.frombuffer(a, dtype=np.uint64)
        _, pd = par.table.lookup(q)
        fr = set(ranges.inside(a, fresh))
        out, same_pages, zero_pages = [], array("Q"), array("Q")
        for i, (x, zz, dg, mp, old) in enumerate(zip(a, z, d, par.table.mapped(q), pd, strict=True)):
            dg = ZERO_PAGE_DIGEST if zz else dg
            if mp and int(old) == dg and x not in fr:  # int(): numpy 1.x compares uint64 to int as float
                same_pages.append(x)
            elif zz:
                zero_pages.append(x)
            else:
                out.append((i, dg))
        if exact:
            unchanged_addrs.append(same_pages)
            stats["unchanged"] += len(same_pages)
        zero_addrs.append(zero_pages)
        stats["zero"] += len(zero_pages)
        return out

    fresh: list[tuple[int, int]] = []
    uffd_wp = tracker is not None and tracker.name == "uffd-wp"

    def known_walks(vmas: list[Vma], tids: list[int], fds_later: bool) -> Known | None:
        """The last dump's walks, if the flag counters (ckpt/proc/flagwatch.py) vouch for them. Read
        at the freeze's start, before anything is injected. Not where this freeze itself changes
        flags: a full dump's arming, a last dump's closing. uffd-wp only: its userfaultfd holding
        every readable mapping keeps any other one from registering them (soft-dirty's clear_refs
        would change "sd" besides). ``fds_later``: the fd table is looked at by vouch(), on the
        grab's read of it (no fd listing of its own here)."""
        if walks_cache is None:
            return None
        if uffd_wp and par is not None and not final:
            fd = (par.layer.meta.inventory.tracker_state or {}).get("fd")
            ours = [fd] if isinstance(fd, int) else []
            got = walks_cache.validate(pid, vmas, tids, ours, fz.start_time, fds_later)
            if got is not None or walks_cache.watching:
                return got
        # Without counters a pre-dump reuses on equal maps lines (its layer is no moment).
        return walks_cache.lookup(vmas) if pre_dump else None

    def vouch(g: procgrab.Grabbed | None) -> bool:
        """known_walks(fds_later=True)'s fd check, on the grab's table (None: read now): False
        where a userfaultfd or io_uring of the process's own came since the last dump (the walks
        are then read in this freeze after all)."""
        if walks_cache is None:
            return True
        table = g.fds if g is not None else None
        # (an fd whose link could not be read is skipped, as flagwatch's own listing does)
        links = None if table is None else [(e.fd, e.link) for e in table if not e.err or e.which]
        return walks_cache.validate_fds(pid, links)

    def fresh_mask_for(a: np.ndarray) -> np.ndarray:
        return ranges.contains(a, fresh)

    exact = True
    dirty_count = 0
    absent = ranges.empty()
    dirty = gone = extra = ranges.empty()
    holes: np.ndarray | list[tuple[int, int]] | None = None
    dirty_huge = 0
    # (UffdWpTracker.candidate_ranges' answer, and _candidates' from it, found beside the walks)
    found: tuple[tuple[list[tuple[int, int]], list[tuple[int, int]]], tuple[Any, Any, Any]] | None = None
    cand: list[tuple[int, int]] = []
    present: np.ndarray | None = None
    tree: dict[str, Any] | None = None
    asked: _Asked | None = None
    # Read while a big process's walks run, not after them (they end the freeze's critical path):
    # the signals pending (no injected call is left to take one, but a final layer's), the spans a
    # live copy keeps.
    pending: list[dict[str, Any]] | None = None
    followed: list[tuple[int, int]] | None = None
    with _publish_or_abort(writer, unarm):
        pre: PreCopied | None = None
        if live and par is not None and tracker is not None:
            consumed = True  # the live scan re-arms: from here a failure takes the tracking out
            state = dict(par.layer.meta.inventory.tracker_state or {})  # (what a failure closes)
            pre = _precopy(pid, tracker, par, directory, warnings, lap)
            # Unmapped at the dump's end, not before the metadata: ~20 ms per 1000 MiB of buffer
            # that a migration's final round spent in its downtime.
            locks.callback(pre.close)
            pages.max_pages = max(max_pages - len(pre.addrs), BATCH_PAGES)
            if pre.tail is not None:
                pages.borrow(pre.tail)  # the freeze copies behind the live copy (precopy.py)
        own_cache = False
        if walks_cache is None and frozen is None and par is not None and not final and uffd_wp:
            # No walk of our own from an earlier dump (a new ckpt process): one read now, while it
            # runs, which the freeze keeps if the flag counters stay at zero (ckpt/proc/ptcache.py).
            walks_cache = PageTablesCache()
            tick[0] = time.perf_counter()
            walks_cache.baseline_live(pid)
            lap("smaps (before the freeze)")
            own_cache = True  # for this freeze only: no later dump of this ckpt reads its counters
            locks.callback(walks_cache.close)
            if not walks_cache.ready:
                # A small process (its walk stays in the freeze) or no counters: opening them
                # anyway would cost the tracepoints' switch-on (~0.1-0.2 s of wall time) for nothing.
                walks_cache.close()
                walks_cache = None
        if walks_cache is not None:
            walks_cache.prefetch()  # the flag counters' tracepoint ids: once per process, not frozen
        environment_namespaces()  # (read once, before the freeze: props.own_namespaces compares)
        scan_pool: ThreadPool | None = None
        if uffd_wp and par is not None and len(par.present) * PAGE_SIZE >= PAGETABLES_BACKGROUND:
            # The freeze's dirty and hole scans go to this thread (below), started now: a thread's
            # start and end cost ~0.3 ms of this one's time here, a hand-over ~0.06 ms.
            scan_pool = ThreadPool(1, "ckpt-scan")
            try:
                with sigchld.blocked():  # (its mask as every thread of a freeze has it: ptrace/sigchld.py)
                    scan_pool.submit(int)
                locks.callback(scan_pool.shutdown, False)
            except RuntimeError:  # no thread to be had (RLIMIT_NPROC): the scans in this one
                scan_pool = None
        nfds = procgrab.count_fds(pid)  # (how to split the freeze's read of them)
        # (the grab's buffers, and the walks' where they run beside the collect, made out of the freeze)
        procgrab.warm(nfds, scan_pool is not None)
        guard_flag()  # (probed once, before the freeze: how the freeze's guard scan finds its mappings)
        if frozen is None:
            _warm_questions(pid, vmas0, nfds)  # (built now, found in the freeze's caches)
        # The parent's records as the tracker takes them, made before the freeze (~25 dicts).
        pinfo = None
        if par is not None and tracker is not None:
            pinfo = ParentInfo(
                [v.to_dict() for v in par.layer.meta.vmas],
                par.layer.meta.inventory.tracker_state,
                len(par.present) <= small_max(),
            )
            pinfo.fresh(vmas0)  # kept for the freeze's read of the same mappings (ParentInfo.fresh)
        note("seize", 0, 0)  # the freeze begins (a migration lifts its CPU throttle here)
        with deferred_signals() if frozen is None else contextlib.nullcontext():
            fz = Frozen(pid) if frozen is None else frozen
            try:
                if walks_cache is not None:
                    walks_cache.prewarm(pid)  # the flag counters opened out of the freeze
                # procgrab.c's workers (the grab, the dirty scans, a small process's smaps) and the
                # scan thread run beside the freeze: boosted for them (Frozen.helpers, rtboost.py).
                fz.helpers = procgrab.lib() is not None or scan_pool is not None
                fz.prepare()  # its checks run beside the process: the freeze starts at the seize
                note("freezing", 0, 0)  # the stops come next (a migration raises its target here)
                tick[0] = tf0 = time.perf_counter()
                cpu0 = time.process_time()
                fz.freeze()
                grabbing: procgrab.Pending | None = None

                def start_grab() -> procgrab.Pending | None:
                    # The fd table and a few /proc files, read on a thread of C's own without the
                    # GIL while this one runs the batch (ckpt/proc/grab.py).
                    g = procgrab.start(pid, list(fz.tids), nfds)
                    if g is not None:
                        locks.callback(g.result)  # (joined on every path; once)
                    return g

                joined: list[procgrab.Grabbed | None] = []

                def grabbed() -> procgrab.Grabbed | None:
                    # The grab joined by whichever asks first (the batch's meanwhile, the fd check
                    # before the scans, the collect), its answer kept for the others.
                    if not joined:
                        joined.append(procgrab.grabbed(grabbing))
                    return joined[0]

                if tracker is None or par is not None:
                    grabbing = start_grab()  # (an arming injects a userfaultfd: after it, below)
                lap("frozen: seize")
                note("freeze", 0, 0)
                vmas = read_maps(pid)
                dv = copied_vmas(vmas)
                known = known_walks(vmas, fz.tids, grabbing is not None)
                # The estimate (a full dump's: the present count before the freeze) far above the
                # small kind's bound: no bounded walk before numpy's (it would walk the first pages twice).
                small = est <= 2 * small_max()
                held = None if tree_share is None else functools.partial(tree_share.holder, pid)
                info: dict[str, Any] | None = None

                if tracker is None:
                    asked = _ask(fz, pid, vmas, lap, known=known, grabbed=grabbed)
                    to_read = present = _present(pid, dv, small)
                elif par is None:
                    state = tracker.arm(fz, vmas)
                    consumed = True
                    grabbing = start_grab()  # (the fd table as the arming left it)
                    lap("frozen: track")
                    asked = _ask(fz, pid, vmas, lap, known=known, grabbed=grabbed)
                    to_read = present = _present(pid, dv, small)
                else:
                    assert pinfo is not None
                    asked = None
                    begin = getattr(tracker, "begin_dirty", None)
                    if begin is not None:
                        # uffd-wp in two halves: what injects (registering new mappings, then the
                        # batch, its code mapped and unmapped) first, so that the page-table walks
                        # (smaps, which holds the mm's lock that mmap and munmap wait for) start
                        # before the dirty scan and run beside it, the collect and the copy.
                        plan = Plan()  # the new mappings' registration and _ask's questions: one run
                        # Which mappings are registered, from the last walks' "uw" where the flag
                        # counters vouch for them (no scan for it: uffdwp.begin_dirty).
                        flags = known.result()[0] if known is not None and known.validated else None
                        begun = begin(fz, vmas, pinfo, plan, flags=flags)
                        consumed = True
                        lap("frozen: track")
                        if getattr(begun, "pending", None):
                            known = None  # it registers a mapping: "uw" changes in this freeze
                        started: NativeScans | None = None
                        ready: list[ReadyNative] = []
                        # (the scans beside the collect, and nothing registered in this freeze)
                        scans_early = scan_pool is not None and not getattr(begun, "pending", None)

                        def beside() -> None:
                            # While the runs run (this thread waits for them): the scans' set-up.
                            if scans_early:
                                r = tracker.ready_scans(fz, begun)  # type: ignore[attr-defined]
                                if r is not None:
                                    ready.append(r)

                        def runs_ended() -> None:
                            # The scans started the moment the batch's runs have ended (its code
                            # unmapped by its own run: no munmap left to wait for their lock), not
                            # after its results are read and the stacks put back (~0.1 ms sooner:
                            # at 256 MiB the freeze waited for them). Only where this freeze
                            # registers nothing (finish_registration protects the new mappings'
                            # pages first) and the scans run beside the collect (scan_pool). The
                            # runs' stack writes are then before the dirty scan, as below; the
                            # bytes put back after it at most show in the next layer's dirty set.
                            nonlocal started, state
                            if not scans_early or fz.holds_code():
                                return
                            state = tracker.state_of(begun)  # type: ignore[attr-defined]
                            got = ready.pop() if ready else None
                            started = tracker.scan_dirty_native(fz, begun, got)  # type: ignore[attr-defined]

                        try:
                            asked = _ask(
                                fz, pid, vmas, lap, plan=plan, known=known, grabbed=grabbed,
                                ended=runs_ended, beside=beside,
                            )  # fmt: skip
                        except BaseException:
                            if started is not None:
                                with contextlib.suppress(Exception):  # (joined: they read the process)
                                    started.result()
                            raise
                        finally:
                            for r in ready:  # (made, not started: its pagemap fd and buffer back)
                                r.close()
                        tracker.finish_registration(fz, begun, asked.ans)  # type: ignore[attr-defined]
                        assumed = getattr(begun, "assumed", False)
                        # The flag counters' fd check, due before the scans (made next, in this
                        # thread) where begin_dirty took the registrations from the kept flags:
                        # where a userfaultfd or io_uring of the process's own came, the kernel is
                        # asked after all (recheck), before the walks begin (their flags).
                        # _collect's own call then has nothing left to check.
                        if assumed and scan_pool is None and not vouch(grabbed()):
                            tracker.recheck(fz, begun, vmas)  # type: ignore[attr-defined]
                            if isinstance(asked.pagetables, Known):
                                asked.pagetables = _walks(pid, vmas, asked.status)
                        # What a failure from here on closes: the scans consume the dirty bits since
                        # the parent, and a tracking left in place would then miss those writes.
                        state = tracker.state_of(begun)  # type: ignore[attr-defined]
                        if scan_pool is None:
                            ds, state = tracker.finish_dirty(fz, begun)  # type: ignore[attr-defined]
                        else:
                            # The dirty and hole scans are the kernel's walks of the page tables
                            # (the GIL let go): on a second CPU, beside the collect's /proc reads,
                            # which neither write a page nor take the mm's write lock; their rows
                            # parsed after it (~0.5 ms less frozen at 256 MiB, ~1 ms at 1 GiB).
                            scanning = started or tracker.scan_dirty_native(fz, begun)  # type: ignore[attr-defined]
                            if scanning is None:  # (no C library, or no thread for it)
                                scanning = scan_pool.submit(tracker.scan_dirty, fz, begun)  # type: ignore[attr-defined]
                            fds = _tracker_fds(state) | ignore_fds
                            try:
                                info = _collect(
                                    fz, pid, fds, vmas, lap, asked, grabbed, vouch, ghost_limit, tcp, held
                                )
                                if assumed and not isinstance(asked.pagetables, Known):
                                    # The collect's fd check failed (its walks read after all): the
                                    # kernel asked which mappings the tracker holds, before the scans'
                                    # rows are taken. Those run on the kept registrations: a WP_MATCHING
                                    # walk skips a mapping no async-wp userfaultfd holds, and one that
                                    # recheck finds so goes whole into the layer.
                                    tracker.recheck(fz, begun, vmas)  # type: ignore[attr-defined]
                                # The candidates' present pages while the scans still run (they
                                # need the mappings, not the scans' rows): ~0.1 ms of a big
                                # process's freeze that waited for them.
                                early = tracker.candidate_ranges(begun)  # type: ignore[attr-defined]
                                found = (early, _candidates(pid, dv, *early))
                                # (a final layer's tracker.close injects after the copy: a signal
                                # taken off a thread then is pending too, read at the end)
                                pending = None if final else _pending(fz)
                                followed = followed_spans(vmas) if pre is not None else None
                            except BaseException:
                                with contextlib.suppress(Exception):  # (nothing undoes the tracking
                                    scanning.result()  # while the scans run)
                                raise
                            ds, state = tracker.dirty_of(begun, scanning.result())  # type: ignore[attr-defined]
                        lap("frozen: scan")
                    else:
                        ds, state = tracker.dirty(fz, vmas, pinfo)
                        consumed = True
                    exact = ds.exact
                    fresh = ds.fresh
                    # The candidates (_candidate_spans): their present pages go in whole, and the
                    # digest compare keeps the unchanged ones out. Found while the scans ran, where
                    # the tracker could tell them before (uffd-wp: _candidates).
                    if ds.present is not None:  # soft-dirty and hash found the present set anyway
                        shm, cand = shmem_pages(pid, dv), _candidate_spans(dv, fresh, ds.whole)
                        forced = [v for v in dv if v.forced]
                        present = ranges.union(ds.present, _present(pid, forced)) if forced else ds.present
                        present = ranges.union(present, shm) if len(shm) else present
                        extra = ranges.inside(present, cand)
                    else:  # uffd-wp: scan only the candidate ranges, never the whole process
                        present = None
                        if found is not None and found[0] == (ds.fresh, ds.whole):
                            shm, cand, extra = found[1]
                        else:
                            shm, cand, extra = _candidates(pid, dv, fresh, ds.whole)
                    # A tracker's sets are page sets: whatever order they come in, the copy and the
                    # writer take them ascending and once each.
                    dirty = ranges.union(ranges.as_set(ds.pages), extra)
                    dirty_count = len(dirty)  # (with a live copy: its pages added after the thaw)
                    gone = ranges.as_set(ds.gone)
                    holes = ds.holes
                    dirty_huge = ds.huge + (pre.huge if pre is not None else 0)
                    to_read = ranges.minus(dirty, gone)
                    lap("frozen: track")
                    if asked is None:
                        # After the dirty scan: the run's own writes on the stacks (bytes put back)
                        # then count in the next layer's dirty set, not in this one's.
                        asked = _ask(fz, pid, vmas, lap, known=known, grabbed=grabbed)
                lap("frozen: track")
                if arm_id is not None and state is not None:
                    state["arm_id"] = arm_id
                warnings.extend(_busy_warning(state, pid))
                assert asked is not None
                if info is None:
                    fds = _tracker_fds(state) | ignore_fds
                    info = _collect(fz, pid, fds, vmas, lap, asked, grabbed, vouch, ghost_limit, tcp, held)
                if not isinstance(asked.pagetables, Known):
                    known = None  # (walks read in this freeze: _collect's fd check may have said so)
                warnings.extend(info["object_warnings"])
                # Injected syscalls took their arguments below the stack pointer: put those bytes back
                # before copying, so the image holds the stack as the process left it.
                fz.release_scratch()
                lap("frozen: collect: rest")
                # The writer takes pages strictly ascending (the layer's index is searched by
                # bisection): a set that is not (issue 9: a scan that reported pages twice) would
                # fail the dump there, after the copy. One vectorised check, a sort only if needed.
                to_read = ranges.as_set(to_read)
                if tree_share is not None:  # shared memory another member of the tree stores
                    to_read = ranges.outside(to_read, tree_share.skip_pages(pid, dv))
                flush: Callable[[list[tuple[PageBuffer, int, np.ndarray]]], None] = process
                if pre is not None:
                    to_read = _with_precopy(pre, to_read, followed or followed_spans(vmas), cand, holes)

                    def flush_merged(bufs: list[tuple[PageBuffer, int, np.ndarray]]) -> None:
                        # Streaming (the budget ran out while frozen): the live pages below the last
                        # one copied go with them, so the writer still sees one ascending run.
                        top = max((int(a[-1]) + 1 for _, _, a in bufs if len(a)), default=0)
                        process(pre.merged(bufs, top))

                    flush = flush_merged

                if not pre_dump:
                    note("copy", 0, len(to_read))
                    pages.read(pid, to_read, flush)
                    lap("frozen: copy")
                if tree_share is not None:  # before the next member's skip_pages (treeshare.py)
                    tree_share.settle(pid, pages.unreadable)
                if final and tracker is not None:
                    tracker.close(fz, state)
                    state = {"closed": True}
                # Read while frozen (a madvise() shows nowhere else), beside the rest. A pre-dump
                # is no moment of the process (the final layer reads them frozen): its walk goes on
                # beside the copy after the thaw, out of the freeze.
                if not pre_dump:
                    info["vmflags"], info["props"]["guards"] = walks = info.pop("pagetables").result()
                    if walks_cache is not None and known is None:
                        walks_cache.store(vmas, walks)
                    lap("frozen: smaps")
                if walks_cache is not None and not own_cache:
                    # The counters start (or restart) here, after this freeze's last injected call.
                    trusted = known is None or known.validated
                    walks_cache.rearm(
                        pid, fz.tids, trusted and not final, pre_dump and known is None, info["threads"]
                    )
                    lap("frozen: flagwatch")
                if pending is None:
                    pending = _pending(fz)
                # A job-control stop, and whether ckpt's own SIGSTOP holds it (ckpt/jobstop.py).
                ptask = par.layer.meta.task if par else None
                stops = stop_record(fz, ptask, leave_stopped and not kill, pending)
                freeze_ms = (time.perf_counter() - tf0) * 1e3
                # The dumper's own CPU time (all its threads) while the target is frozen: on a loaded
                # machine the wall time is mostly waiting for the target to be scheduled.
                phases["cpu: frozen"] = round((time.process_time() - cpu0) * 1e3, 3)
                _check_alive(pid)
                if signals_held():
                    # Ctrl-C while frozen: stop here, while the tracker can still be taken out cleanly.
                    raise KeyboardInterrupt
                if frozen is not None:
                    tree = yield  # the caller thaws (or kills) the whole tree
                elif not kill:
                    thaw_all({pid: fz}, leave_stopped, before_stop)
                    held_ms = (fz.let_go_at - tf0) * 1e3  # (not the yield that follows: Frozen._release)
                    if fz.continued_meanwhile:  # (ckpt/ptrace/freeze.py _drop_sigcont)
                        warnings.append(
                            f"process {pid} had a SIGCONT not yet taken when the dump ended; "
                            f"discarded, left stopped as --leave-stopped asks (kill -CONT {pid} continues it)"
                        )
                lap("frozen: thaw")
            except BaseException:
                if consumed and tracker is not None:
                    # (a tree member closed at its hand-over after the tree's thaw: fz is thawed)
                    undo_tracking(pid, fz, tracker, state, directory, par is not None, warnings)
                thaw_all({pid: fz}, leave_stopped, before_stop)
                raise

        try:
            if hand_over and not kill and frozen is None:
                yield  # thawed: the caller lets the freezing thread end and goes on in its own
                interrupted()
            # What the freeze read, parsed now (_collect_in): after the hand-over, whose thread's
            # end is what lets a thread resumed into its syscall go (ptrace/parting.py).
            info.pop("later")()
            info["task"]["pending"] = pending
            info["task"].update(stops)
            if pre_dump:
                # Copied while the process runs. Tracking was re-armed inside the freeze, so a page
                # written during this copy is in the next layer's dirty set: this layer may hold a
                # mix of moments, and says so (consistent: false).
                note("copy", 0, len(to_read))
                pages.read(pid, to_read, process)
                lap("copy (running)")
                walks = info.pop("pagetables").result()
                info["vmflags"], info["props"]["guards"] = walks
                if walks_cache is not None:
                    walks_cache.store(vmas, walks)
                lap("smaps (running)")

            if pre is not None:  # (a union only the record needs: not in the freeze)
                dirty_count = len(ranges.union(dirty, pre.scanned))

            def record_counts() -> tuple[np.ndarray, int]:
                got = absent if par is None else _absent(par, gone, present, extra, fresh, cand, dv, holes)
                if present is not None:
                    return got, len(present)
                # A count for the record, taken after the thaw: uffd-wp never needed the whole
                # present set inside the freeze.
                try:
                    return got, count_present(pid, dv)
                except TargetExited:
                    return got, len(par.present) if par else 0

            # Both only go into the layer's records: worked out on a thread of their own while the
            # pages go to the writer (a migration's final layer onto the wire: ~10 ms at 1 GiB that
            # came before its first chunk, inside the downtime).
            def to_writer() -> None:
                todo = pages.take() if pre is None else pre.merged(pages.take(), None)
                if pre is not None:
                    lap("merge")
                process(todo)
                lap("compress")

            if downtime and inline_after_thaw(to_read):  # no thread waits for a CPU (lastround.py)
                to_writer()
                absent, pages_total = record_counts()
            else:
                with ThreadPool(1, "ckpt-counts") as ex:
                    counted = ex.submit(record_counts)
                    to_writer()
                    absent, pages_total = counted.result()
            close_aside(pages, locks)
            if pre is not None:
                pages.nbytes += pre.nbytes
            lap("compress: records")
            hit = ranges.spans_hit([(v.start, v.end) for v in vmas], pages.unreadable)
            unreadable_vmas = {v.start for v, h in zip(vmas, hit, strict=True) if h}
            seen = present if present is not None else extra
            vrecs = _vma_records(vmas, unreadable_vmas, seen, info["vmflags"])
            elapsed_pre = (time.perf_counter() - t0) * 1e3
            meta = _meta(
                inventory={
                    "format": "ckpt-layer",
                    "pid": pid,
                    "start_time": st.start_time,
                    "boot_id": boot_id(),
                    "comm": info["comm"],
                    "exe": info["exe"],
                    "kernel": os.uname().release,
                    "arch": os.uname().machine,
                    "created": time.time(),
                    "ckpt_version": __version__,
                    "tracker": tracker.name if tracker else None,
                    "tracker_state": state,
                    "incremental": par is not None,
                    "consistent": not pre_dump,
                    "parent": None
                    if par is None
                    else {"path": _rel(par.path, directory), "digest": par.layer.digest},
                    "stats": {
                        "pages_total": pages_total,
                        "pages_dumped": stats["dumped"],
                        "pages_zero": stats["zero"],
                        "pages_dirty": dirty_count if par is not None else pages_total,
                        "pages_dirty_unchanged": stats["unchanged"],
                        "pages_dirty_huge": dirty_huge,
                        "pages_absent": len(absent),
                        "bytes_raw": pages.nbytes,
                        "freeze_ms": round(freeze_ms, 3),
                        "elapsed_ms": round(elapsed_pre, 3),
                    },
                },
                vmas=vrecs,
                threads=info["threads"],
                sigactions=info["sigactions"],
                fds=info["fds"],
                mm=info["mm"],
                task=info["task"],
                props=info["props"],
                pipes=info["pipes"],
                anonfds=info["anonfds"],
                zero=ranges.cat(zero_addrs),
                absent=absent,
                fresh=fresh,
                unchanged=ranges.cat(unchanged_addrs),
                records=records,
            )
            objs = compress_objects(info["objects"], level, par.layer.meta.objects if par else ())
            meta.objects = [ObjectRecord.from_dict(o, f"objects[{i}]") for i, o in enumerate(objs)]
            meta.inet_listen = sockets_from(info["inet_listen"])
            meta.tcp_established = tcp_from(info["tcp_established"])
            if tree is not None:
                meta.tree = TreeRecord.from_dict(tree)
            if info["pidns"] is not None:
                meta.pidns = PidNsRecord.from_dict(info["pidns"])
                check_threads(meta.pidns, pid, {t.tid for t in meta.threads})
            lap("metadata")
            # (Only a kill needs them before the layer: a migration's final layer goes out first.)
            refusals = restore_refusals(meta, in_tree=frozen is not None) if kill or not downtime else None
            if kill and frozen is None:
                _check_kill(pid, meta.task.children, refusals or [], force)
            interrupted()
            path = writer.finish(meta, filled if keep_table else None)
            lap("publish")
            if table_body:
                tablecache.write(path, writer.digest or "", *table_body[0])
                lap("table")
            if refusals is None:
                refusals = restore_refusals(meta, in_tree=frozen is not None)
            try:
                interrupted()  # a Ctrl-C while publishing: no layer either
            except KeyboardInterrupt:
                path.unlink()
                tablecache.remove(path)
                raise
            if table_body and par is not None and par.path.parent.resolve() == path.parent.resolve():
                tablecache.remove(par.path)  # superseded (once the layer stays): one per chain
            if par is None:  # (only once the layer stays: an older chain's marker is still true otherwise)
                with contextlib.suppress(FileNotFoundError):
                    (directory / LOST_MARKER).unlink()  # a full dump starts tracking afresh
        except BaseException:
            if kill and frozen is None:
                if consumed and tracker is not None:
                    undo_tracking(pid, fz, tracker, state, directory, par is not None, warnings)
                fz.thaw()
            elif consumed and tracker is not None and not (final and state == {"closed": True}):
                # The layer failed after the thaw (disk full, Ctrl-C while compressing): the tracker
                # was armed or reset for a layer that will not exist. Take it out of the target again,
                # so that no injected fd is left behind and later incrementals refuse instead of
                # missing the writes since the parent.
                undo_tracking(pid, fz, tracker, state, directory, par is not None, warnings)
            raise
        if kill and frozen is None:
            fz.kill()
            tcp.killed()
            fz.thaw()
    elapsed = (time.perf_counter() - t0) * 1e3
    return DumpResult(
        layer=str(path),
        parent=str(par.path) if par else None,
        pid=pid,
        tracker=tracker.name if tracker else None,
        incremental=par is not None,
        pages_total=pages_total,
        pages_dumped=stats["dumped"],
        pages_zero=stats["zero"],
        pages_dirty=dirty_count if par is not None else pages_total,
        pages_dirty_unchanged=stats["unchanged"],
        pages_dirty_huge=dirty_huge,
        pages_absent=len(absent),
        bytes_raw=pages.nbytes,
        bytes_written=writer.bytes_written,
        freeze_ms=round(freeze_ms, 3),
        held_ms=round(held_ms, 3),
        elapsed_ms=round(elapsed, 3),
        fallback_full=did_fallback,
        warnings=warnings,
        restorable=not refusals,
        not_restorable=refusals,
        phases_ms=phases,
        pages_precopied=0 if pre is None else pre.kept(),
    )


def _use_precopy(
    want: bool | None,
    tracker: Tracker | None,
    par: _Parent | None,
    pre_dump: bool,
    frozen: Frozen | None,
    est: int,
    max_pages: int,
    warnings: list[str],
) -> bool:
    """Whether this dump copies live before its freeze (ckpt/precopy.py): an incremental dump with
    uffd-wp (whose scan re-arms atomically while the process runs), not held in a tree's freeze. None
    (auto): when the estimate is large enough for the frozen copy to matter, and fits the budget
    twice (the live copy's buffer is beside the frozen one's)."""
    can = (
        par is not None
        and tracker is not None
        and hasattr(tracker, "scan_live")
        and not pre_dump
        and frozen is None
    )
    if want is None:
        return can and AUTO_MIN_PAGES <= est <= max_pages // 2
    if want and not can:
        warnings.append(
            "--pre-copy needs an incremental dump tracked with uffd-wp, not a pre-dump or a tree: "
            "the pages were copied in the freeze"
        )
    return bool(want and can)


def _precopy(
    pid: int,
    tracker: Tracker,
    par: _Parent,
    directory: Path,
    warnings: list[str],
    lap: Callable[[str], None],
) -> PreCopied:
    """The live scan and copy. Its scan consumed the dirty bits: should anything fail, the tracking
    is taken out of the process (later incrementals on the parent refuse instead of missing them)."""
    try:
        scanned, huge = tracker.scan_live(  # type: ignore[attr-defined]
            pid, read_maps(pid), par.layer.meta.inventory.tracker_state
        )
        lap("precopy: scan")
        pre = copy_live(pid, scanned, huge)
        lap("precopy: copy")
        return pre
    except BaseException:
        with contextlib.suppress(CkptError, OSError):
            state = par.layer.meta.inventory.tracker_state
            undo_tracking(pid, None, tracker, state, directory, True, warnings)
        raise


def _with_precopy(
    pre: PreCopied,
    to_read: ranges.Pages,
    followed: list[tuple[int, int]],
    cand: list[tuple[int, int]],
    holes: np.ndarray | list[tuple[int, int]] | None,
) -> ranges.Pages:
    """The frozen read set with the pages the live copy could not read added (where the freeze can
    vouch for them), and the live copy cut to what is the content at the freeze (precopy.py).
    ``followed``: the mappings the tracker follows (followed_spans)."""
    f = pre.failed
    if len(f):
        to_read = ranges.as_numpy(to_read)  # a live copy's sets are numpy's: so is all that meets them
        f = ranges.as_set(f[ranges.contains(f, followed) & ~ranges.contains(f, cand)])
        to_read = ranges.union(to_read, f[~in_holes(f, holes)])
    # (a small set stays one: numpy meets it in keep(), after the thaw)
    pre.keep(to_read, followed, cand, holes, later=True)  # (done by its first merged())
    return to_read


def _check_kill(pid: int, children: list[int], refusals: list[str], force: bool) -> None:
    """--kill destroys the process: only when the layer can bring it back (or --force says so),
    and never one with children, which would be left orphaned (no tree is restored yet)."""
    if children:
        raise CkptError(
            f"not killing pid {pid}: it has {len(children)} child process(es) "
            f"({', '.join(map(str, children[:8]))}), and ckpt restores no process trees "
            "(nothing was written; the process runs on)"
        )
    if refusals and not force:
        raise CkptError(
            f"not killing pid {pid}: its layer could not be restored ({'; '.join(refusals)}); "
            "nothing was written and the process runs on (--force kills it anyway)"
        )


def _absent(
    par: _Parent,
    gone: np.ndarray,
    present: np.ndarray | None,
    extra: np.ndarray,
    fresh: list[tuple[int, int]],
    cand: list[tuple[int, int]],
    dv: list[Vma],
    holes: np.ndarray | list[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Pages that now read as zero (or from their file) though the parent held them. Computed after
    the thaw: it needs nothing from the target but what the freeze recorded.

    - written pages that are gone (MADV_DONTNEED), as the tracker reports them;
    - pages the parent held that are no longer present. soft-dirty and hashing do not see a zapped
      page as written: with the whole present set, compare everything. uffd-wp found the holes of
      the mappings it follows (ranges) in the freeze; of the rest, the candidate ranges (mappings it
      does not follow) are compared with their present pages."""
    if present is not None:
        lost = ranges.minus(par.present, present)
        lost = ranges.inside(lost, [(v.start, v.end) for v in dv])
    else:
        lost = ranges.minus(ranges.inside(par.present, cand), extra)
        if holes is not None and len(holes):
            if isinstance(holes, list):  # a small dump's (no numpy)
                hl = ranges.inside(par.present, ranges.merge(holes))
            else:
                hl = par.present[in_holes(par.present, holes)]
            # A hole of the page table is no hole of a shared object: its pages (in `extra`) stay.
            lost = ranges.union(lost, ranges.minus(hl, extra))
    out = ranges.union(gone, lost)
    return ranges.outside(out, fresh)


def _meta(
    *,
    inventory: dict[str, Any],
    vmas: list[dict[str, Any]],
    threads: list[dict[str, Any]],
    sigactions: list[dict[str, Any]],
    fds: list[dict[str, Any]],
    mm: dict[str, Any],
    task: dict[str, Any],
    props: dict[str, Any],
    zero: np.ndarray,
    pipes: list[dict[str, Any]] | None = None,
    anonfds: list[dict[str, Any]] | None = None,
    absent: np.ndarray,
    fresh: list[tuple[int, int]],
    unchanged: np.ndarray,
    records: RecordMemo | None = None,
) -> LayerMeta:
    """The layer's records, built through the image module's own validation: a dump never writes
    what a reader would refuse. `records`: those equal to an earlier dump's with the same memo are
    that dump's (a migration's rounds: image/recmemo.py), not checked again in the downtime."""
    inventory = dict(inventory, version=FORMAT_VERSION)

    def rec(key: str, raw: Any, build: Callable[[], _D]) -> _D:
        return take(records, key, raw, build)

    return LayerMeta(
        inventory=Inventory.from_dict(inventory),
        vmas=rec("vmas", vmas, lambda: [VmaRecord.from_dict(v, f"vmas[{i}]") for i, v in enumerate(vmas)]),
        threads=rec(
            "threads",
            threads,
            lambda: [ThreadRecord.from_dict(t, f"threads[{i}]") for i, t in enumerate(threads)],
        ),
        sigactions=rec(
            "sigactions",
            sigactions,
            lambda: [SigactionRecord.from_dict(a, f"sigactions[{i}]") for i, a in enumerate(sigactions)],
        ),
        fds=rec("fds", fds, lambda: [FdRecord.from_dict(f, f"fds[{i}]") for i, f in enumerate(fds)]),
        mm=rec("mm", mm, lambda: MmRecord.from_dict(mm)),
        task=rec("task", task, lambda: TaskRecord.from_dict(task)),
        props=rec("props", props, lambda: PropsRecord.from_dict(props)),
        pipes=rec(
            "pipes",
            pipes,
            lambda: [PipeRecord.from_dict(p, f"pipes[{i}]") for i, p in enumerate(pipes or [])],
        ),
        anonfds=rec(
            "anonfds",
            anonfds,
            lambda: [AnonFdRecord.from_dict(a, f"anonfds[{i}]") for i, a in enumerate(anonfds or [])],
        ),
        pages=PageIndex(zero=zero, absent=absent, fresh=list(fresh), unchanged=unchanged),
    )


def _chain_names(par: _Parent | None, directory: Path) -> list[str]:
    """The chain list of a layer written in `directory` on `par`: the parent, then its own list,
    as paths relative to `directory` (or absolute). The parent's list is kept as it is where the
    parent is in the same directory (the usual case: no path resolved per layer)."""
    if par is None:
        return []
    if par.path.parent.resolve() == directory.resolve():
        return [par.path.name, *par.names]
    return [_rel(par.path, directory), *(_rel(par.path.parent / n, directory) for n in par.names)]


def _rel(parent: Path, directory: Path) -> str:
    try:
        return os.path.relpath(parent.resolve(), directory.resolve())
    except ValueError:
        return str(parent.resolve())


def undo_tracking(
    pid: int,
    fz: Frozen | None,
    tracker: Tracker,
    state: dict[str, Any] | None,
    directory: Path,
    incremental: bool,
    warnings: list[str],
) -> None:
    """A dump failed after arming or reading the tracker: take it back out of the target, while `fz`
    still holds the process (a tree killed at its end is frozen until then), else in a freeze of
    its own: the target was thawed already (or `fz` is None).

    For an incremental dump the dirty bits since the parent are already reset, so later
    incrementals on this chain would miss writes; closing the tracker makes them refuse instead.
    """

    def undo(fz: Frozen) -> None:
        with contextlib.suppress(CkptError, OSError):
            tracker.close(fz, state)
        if incremental and tracker.name == "soft-dirty":
            with contextlib.suppress(OSError):
                (directory / LOST_MARKER).touch(mode=0o600)

    if fz is not None and fz.frozen:
        undo(fz)
        return
    with contextlib.suppress(CkptError, OSError):
        frozen_briefly(pid, undo)


@sigchld.blocking
def untrack(
    pid: int, fds: list[int] | None = None, on_frozen: Callable[[Frozen], None] | None = None
) -> list[int]:
    """Remove ckpt's uffd-wp tracking from a process: unregister its mappings and close the fd.

    Without `fds`, every userfaultfd of the process that has async write-protect is closed
    (the kind ckpt injects). `on_frozen`: shown the freeze (whether it found the process in a
    job-control stop: Frozen.was_stopped, which no /proc read just after a thaw can tell)."""
    from ckpt.track.uffdwp import UffdWpTracker, is_our_uffd, uffd_fds

    check_dumpable(pid)
    targets = fds if fds is not None else [fd for fd in uffd_fds(pid) if is_our_uffd(pid, fd)]
    targets = [fd for fd in targets if is_our_uffd(pid, fd)]
    if not targets:
        return []

    def close(fz: Frozen) -> None:
        if on_frozen is not None:
            on_frozen(fz)
        t = UffdWpTracker()
        for fd in targets:
            t.close(fz, {"fd": fd})

    frozen_briefly(pid, close)
    return targets


__all__ = ["DumpResult", "TargetError", "TargetExited", "dump", "untrack"]
