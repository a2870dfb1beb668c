"""The address space: the helper's replaced by the dumped one (CRIU's mem.c and restorer's VMA work).

Order: map the gadget page and park the helper's vdso in a hole of both layouts; unmap everything
else; map each dumped mapping at its address (anonymous, or the unchanged file), writable for now;
write the pages the image holds; give each mapping its own protection; move the vdso to the dumped
address last.

Pages go in with UFFDIO_COPY where a private anonymous mapping is still empty and its pages come in
runs (uffdfill.py), elsewhere with process_vm_writev, one call per chunk however scattered its pages
are (a chain's top layers hold every 7th page, say): that is why mappings are writable while they
are filled, as in CRIU. Pages of an unchanged file that the image holds with the file's own bytes
are not written: they stay shared with the page cache, as they were.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckpt import sysno as nr
from ckpt.errors import CkptError, RestoreError
from ckpt.image import STATE_DATA, STATE_ZERO, MergedView
from ckpt.image.format import PAGE_SIZE, ZERO_PAGE_DIGEST, page_digests
from ckpt.image.reader import ChunkBuffers
from ckpt.memory import PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PagemapScanner, pagemap_scan_supported, present_in
from ckpt.proc.maps import Vma
from ckpt.ptrace.batch import Call
from ckpt.restore import fillsmall
from ckpt.restore.layout import GADGET_PAGES, Areas, unmap_ranges
from ckpt.restore.mapbatch import MapBatch
from ckpt.restore.objects import Objects, map_object
from ckpt.restore.pidns import kept_fd
from ckpt.restore.plan import RestorePlan, VmaPlan
from ckpt.restore.remote import SYSCALL_INSN, Remote, buffer_address
from ckpt.restore.uffdfill import MIN_RUN_PAGES, UffdFill

if TYPE_CHECKING:
    import numpy as np

    from ckpt.threadpool import Task

WORKERS = min(4, os.cpu_count() or 2)  # chunks in flight: decompressed, verified, written
ZERO_PAGE = bytes(PAGE_SIZE)


@dataclass
class FillStats:
    pages: int = 0  # pages written into the process
    runs: int = 0  # runs of contiguous pages written
    chunks: int = 0  # chunks read
    skipped_file_pages: int = 0  # pages equal to the file's, left to the page cache
    uffd: bool = False  # UFFDIO_COPY filled some mappings (uffdfill.py)
    uffd_copies: int = 0  # its calls
    # From the start to the first page written (the fill's work if not made ahead, the userfaultfd):
    # the restore's timings_ms "fill_setup", part of "fill". A time, not what was written.
    setup_ms: float = field(default=0.0, compare=False)


# -- the switch of layouts -------------------------------------------------------------------------
def install_gadget(remote: Remote, areas: Areas) -> None:
    size = GADGET_PAGES * PAGE_SIZE
    addr = remote.check(
        "mapping the restore's own page",
        nr.MMAP, areas.gadget, size, nr.PROT_READ | nr.PROT_WRITE | nr.PROT_EXEC,
        nr.MAP_PRIVATE | nr.MAP_ANONYMOUS | nr.MAP_FIXED_NOREPLACE, -1, 0,
    )  # fmt: skip
    if addr != areas.gadget:
        raise RestoreError(f"the restore's own page landed at {addr:#x}, not {areas.gadget:#x}")
    remote.write(areas.gadget, SYSCALL_INSN)
    remote.site = areas.gadget
    remote.scratch = areas.scratch
    remote.scratch_size = areas.scratch_size


def _move(batch: MapBatch, parts: list[Vma], base: int, what: str) -> None:
    first = parts[0].start
    for v in parts:
        dest = base + (v.start - first)
        call = Call(nr.MREMAP, (v.start, v.size, v.size, nr.MREMAP_MAYMOVE | nr.MREMAP_FIXED, dest))
        batch.add(f"moving {v.path} {what}", call, want=dest)


def clear_helper(remote: Remote, areas: Areas, vdso: list[Vma]) -> list[Vma]:
    """Park the vdso, close the helper's fds above 2, unmap everything but our two areas.

    Returns the vdso parts at their parked addresses."""
    parked = []
    batch = MapBatch(remote)  # in one run of injected code (mapbatch.py)
    if vdso:
        _move(batch, vdso, areas.park, "aside")
        first = vdso[0].start
        parked = [Vma(areas.park + v.start - first, areas.park + v.end - first, v.perms, 0, v.dev, 0, v.path)
                  for v in vdso]  # fmt: skip
    # The memfd and the start-up pipe of the stub, inherited: the process must not see them.
    # (--pidns, a namespace's init restored as the root: ckpt's pidfd stays until its fds are set.)
    keep = kept_fd(remote.pid)
    if keep is None:
        batch.add("closing the helper's fds", Call(nr.CLOSE_RANGE, (3, 0xFFFFFFFF, 0)))
    else:
        if keep > 3:
            batch.add("closing the helper's fds", Call(nr.CLOSE_RANGE, (3, keep - 1, 0)))
        batch.add("closing the helper's fds", Call(nr.CLOSE_RANGE, (keep + 1, 0xFFFFFFFF, 0)))
    for s, e in unmap_ranges(areas.keep()):
        batch.add(f"unmapping [{s:#x}-{e:#x}) of the helper", Call(nr.MUNMAP, (s, e - s)))
    batch.run()
    return parked


def place_vdso(batch: MapBatch, parked: list[Vma], plan: RestorePlan, areas: Areas) -> None:
    """The vdso moved from where it was parked to its dumped address (or unmapped: a process
    dumped without one), in `batch`'s next run."""
    if plan.vdso:
        _move(batch, parked, plan.vdso[0].start, "to its dumped address")
    elif parked:
        batch.add("unmapping the helper's vdso", Call(nr.MUNMAP, (areas.park, areas.park_size)))


# -- mappings --------------------------------------------------------------------------------------
def map_vmas(remote: Remote, plan: RestorePlan, objs: Objects | None = None) -> list[VmaPlan]:
    """Map every planned mapping; those mapped writable only to be filled are returned. The
    mappings of files and anonymous memory go in runs of injected code (mapbatch.py)."""
    batch = MapBatch(remote)
    batch.open_all([f for p in plan.vmas if p.obj < 0 and (f := _file_of(p)) is not None])
    later = []
    for p in plan.vmas:
        if p.obj >= 0:
            assert objs is not None
            batch.run()  # the mappings before it first: the plan's order
            if map_object(remote, objs, plan, p) or p.kind == "sysv":
                later.append(p)  # (a SysV attach split by mprotect: each piece its protection)
        elif p.kind != "shm" and _map_one(batch, p):
            later.append(p)
    batch.run(close_files=True)
    # Last: their staging mappings go wherever the kernel finds room, which is only safe once every
    # dumped mapping has its place.
    later.extend(_map_shm(remote, [p for p in plan.vmas if p.kind == "shm"], plan.shared_shm))
    return later


def _map_shm(
    remote: Remote, plans: list[VmaPlan], given: dict[tuple[str, int], int] | None = None
) -> list[VmaPlan]:
    """Shared anonymous memory: one new shared anonymous object per dumped one (by inode, as several
    mappings may show parts of one object), mapped read-write somewhere, then each dumped mapping
    made from it at its offset by mremap(old_size=0), which maps the same object again (and keeps
    its offset and its /dev/zero name). The staging mapping goes; each mapping is filled through its
    own address, then given its protection with the others. `given`: objects several processes of
    a tree share, made once by ckpt (restore/treeobjects.py): the staging mapping is of that one."""
    groups: dict[tuple[str, int], list[VmaPlan]] = {}
    for p in plans:
        groups.setdefault((p.vma.dev, p.vma.inode), []).append(p)
    rw = nr.PROT_READ | nr.PROT_WRITE
    for members in groups.values():
        size = max(p.vma.offset + p.vma.end - p.vma.start for p in members)
        src = (given or {}).get((members[0].vma.dev, members[0].vma.inode))
        if src is None:
            base = remote.check(f"creating shared anonymous memory of {size} bytes", nr.MMAP, 0, size, rw,
                                nr.MAP_SHARED | nr.MAP_ANONYMOUS, -1, 0)  # fmt: skip
        else:
            base = _map_given(remote, src, size)
        try:
            for p in members:
                v = p.vma
                what = f"mapping shared anonymous memory at [{v.start:#x}-{v.end:#x})"
                got = remote.check(what, nr.MREMAP, base + v.offset, 0, v.end - v.start,
                                   nr.MREMAP_MAYMOVE | nr.MREMAP_FIXED, v.start)  # fmt: skip
                if got != v.start:
                    raise RestoreError(f"{what}: it landed at {got:#x}")
        finally:
            remote.syscall(nr.MUNMAP, base, size)
    return plans


def _map_given(remote: Remote, src: int, size: int) -> int:
    from ckpt.restore.pipes import fetch_fd

    what = f"mapping the tree's shared anonymous memory of {size} bytes"
    fd = fetch_fd(remote, os.getpid(), src, what)
    try:
        return remote.check(what, nr.MMAP, 0, size, nr.PROT_READ | nr.PROT_WRITE, nr.MAP_SHARED, fd, 0)
    finally:
        remote.syscall(nr.CLOSE, fd)


def protect(batch: MapBatch, plans: list[VmaPlan]) -> None:
    """Each mapping's own protection, once its pages are in, in `batch`'s next run (complete runs
    them with the vdso's move: one ptrace round trip for both)."""
    for p in plans:
        what = f"protecting {p.vma.path or '[anon]'} [{p.vma.start:#x}-{p.vma.end:#x})"
        batch.add(what, Call(nr.MPROTECT, (p.vma.start, p.vma.end - p.vma.start, p.prot)))


def _file_of(p: VmaPlan) -> tuple[str, int] | None:
    """(path, open flags) of the file a mapping made by _map_one maps, or None (anonymous)."""
    v = p.vma
    if p.kind in ("anon", "copy", "shm"):
        return None
    if p.kind == "file":
        return v.path, nr.O_RDONLY
    # shared: the file's own pages; writable only if the process could write them. "mw"
    # (VM_MAYWRITE): the file was open for writing, so the process may mprotect the mapping
    # writable later; a file opened read-only would refuse that (EACCES).
    return v.path, nr.O_RDWR if v.perms[1] == "w" or "mw" in v.flag_set else nr.O_RDONLY


def _map_one(batch: MapBatch, p: VmaPlan) -> bool:
    v = p.vma
    prot = p.prot
    later = p.kind != "shared" and p.fill and not p.direct and not prot & nr.PROT_WRITE
    if later:
        prot |= nr.PROT_WRITE
    size = v.end - v.start
    fixed = nr.MAP_FIXED_NOREPLACE
    f = _file_of(p)
    if f is None:
        flags = nr.MAP_PRIVATE | nr.MAP_ANONYMOUS | fixed | (nr.MAP_GROWSDOWN if p.growsdown else 0)
        flags |= nr.MAP_NORESERVE if p.noreserve else 0
        fd, off = -1, 0
    elif p.kind == "file":
        flags, fd, off = nr.MAP_PRIVATE | fixed, batch.fds[f], v.offset
        flags |= nr.MAP_NORESERVE if p.noreserve else 0
    else:
        flags, fd, off = nr.MAP_SHARED | fixed, batch.fds[f], v.offset
    what = f"mapping {v.path or '[anon]'} [{v.start:#x}-{v.end:#x})"
    batch.add(what, Call(nr.MMAP, (v.start, size, prot, flags, fd, off)), want=v.start)
    if p.anon_name:  # its failure ignored: a kernel without CONFIG_ANON_VMA_NAME (the name is cosmetic)
        name = os.fsencode(p.anon_name) + b"\0"
        call = Call(nr.PRCTL, (nr.PR_SET_VMA, nr.PR_SET_VMA_ANON_NAME, v.start, size, 0), out_arg=4, inp=name)
        batch.add(f"naming {what}", call, must=False)
    return later


# -- pages -----------------------------------------------------------------------------------------
def _file_digests(fd: int, offset: int, start: int, addrs: np.ndarray) -> np.ndarray:
    """xxh3 of the file's bytes at each page of a mapping (zeros past the end of the file), read
    from `fd`, the file opened with the process's rights (fillsmall.FileFds: the rights the helper
    maps it with, so the same rule, before or after the helper exists)."""
    import numpy as np

    out = np.zeros(len(addrs), dtype=np.uint64)
    # One read per run of adjacent pages (at most 256 at a time), not one per page.
    for a, i, n in _runs(addrs, np.arange(len(addrs))):
        for k in range(0, n, 256):
            m = min(256, n - k)
            b = os.pread(fd, m * PAGE_SIZE, offset + a + k * PAGE_SIZE - start)
            out[i + k : i + k + m] = page_digests(b.ljust(m * PAGE_SIZE, b"\0"))
    return out


def page_work(plan: RestorePlan, stats: FillStats) -> tuple[Any, Any, Any]:
    """(table rows whose data must be written, addresses of pages to zero, table rows of data
    pages left unwritten because their digest says they equal the file's): numpy arrays, or lists
    for a small table (fillsmall.py)."""
    if plan.table.small:
        return fillsmall.page_work(plan, stats)
    import numpy as np

    t = plan.table
    write = np.zeros(len(t), dtype=bool)
    trusted = np.zeros(len(t), dtype=bool)
    zero_addrs: list[np.ndarray] = []
    files_of: list[tuple[VmaPlan, int, int, np.ndarray]] = []  # private file mappings with pages to compare
    for p in plan.vmas:
        if not p.fill or p.kind == "shared":
            continue
        lo = int(np.searchsorted(t.addr, np.uint64(p.vma.start)))
        hi = int(np.searchsorted(t.addr, np.uint64(p.vma.end)))
        if p.kind == "objpriv":
            # Over the object's own pages: the process's pages, zeros included, all written.
            write[lo:hi] = t.state[lo:hi] == STATE_DATA
            zero_addrs.append(t.addr[lo:hi][t.state[lo:hi] == STATE_ZERO])
            continue
        if p.kind != "file":
            write[lo:hi] = t.state[lo:hi] == STATE_DATA
            continue
        # Private file mapping: write only where the process's page differs from the file's.
        st = t.state[lo:hi]
        cand = np.flatnonzero((st == STATE_DATA) | (st == STATE_ZERO))
        if len(cand):
            files_of.append((p, lo, hi, cand))
    files = fillsmall.FileFds(plan.task)  # (each file opened once, all in one thread)
    try:
        files.open_all([p.vma.path for p, _, _, _ in files_of])
        for p, lo, hi, cand in files_of:
            _file_pages(p, lo, hi, cand, files.get(p.vma.path), t, stats, write, trusted, zero_addrs)
    finally:
        files.close()
    zeros = np.concatenate(zero_addrs) if zero_addrs else np.zeros(0, dtype=np.uint64)
    return np.flatnonzero(write), zeros, np.flatnonzero(trusted)


def _file_pages(
    p: VmaPlan,
    lo: int,
    hi: int,
    cand: np.ndarray,
    fd: int,
    t: Any,
    stats: FillStats,
    write: np.ndarray,
    trusted: np.ndarray,
    zero_addrs: list[np.ndarray],
) -> None:
    """page_work for one private file mapping: its pages (rows lo..hi, `cand` those the image
    holds) marked to write, or left to the file where the file's page equals the process's."""
    import numpy as np

    st = t.state[lo:hi]
    addrs = t.addr[lo:hi][cand]
    fdig = _file_digests(fd, p.vma.offset, p.vma.start, addrs)
    want = np.where(st[cand] == STATE_DATA, t.digest[lo:hi][cand], np.uint64(ZERO_PAGE_DIGEST))
    differ = fdig != want
    stats.skipped_file_pages += int((~differ).sum())
    is_data = st[cand] == STATE_DATA
    write[lo + cand[differ & is_data]] = True
    trusted[lo + cand[~differ & is_data]] = True
    zero_addrs.append(addrs[differ & ~is_data])


def _chunks_of(view: MergedView, lay: np.ndarray, idx: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """(layer, chunk, positions in `lay`/`idx`) for each chunk the rows' pages are in."""
    import numpy as np

    from ckpt import ranges

    for k in ranges.unique(lay):
        m = np.flatnonzero(lay == k)
        ch = view.layers[int(k)].chunk_of(idx[m])
        for c in ranges.unique(ch):
            yield int(k), int(c), m[ch == c]


def check_trusted_digests(view: MergedView, plan: RestorePlan, rows: Any) -> None:
    """The page digests a restore decided by: data pages left to the file because their digest
    equals the file's page are read and checked against it, so that a layer whose digests disagree
    with its pages is refused rather than restored differently. (The pages a restore writes are
    checked by their chunk's checksum as they are read; their digests decide nothing.)"""
    t = plan.table
    chunks = (
        fillsmall.chunks_of(view, plan, rows)
        if t.small
        else [(k, c) for k, c, _ in _chunks_of(view, t.layer[rows], t.index[rows])]
    )
    for k, c in chunks:
        try:
            view.layers[k].read_chunk(c)
        except CkptError as e:
            raise RestoreError(f"cannot restore: {e}") from None


def _runs(
    addrs: np.ndarray, pos: np.ndarray, part: np.ndarray | None = None
) -> Iterator[tuple[int, int, int]]:
    """(address, first position, count) of each run where both go up by one page at a time (and
    `part`, if given, stays the same)."""
    import numpy as np

    if not len(addrs):
        return
    cut = (np.diff(addrs.astype(np.int64)) != PAGE_SIZE) | (np.diff(pos) != 1)
    if part is not None:
        cut |= np.diff(part) != 0
    brk = np.flatnonzero(cut) + 1
    bounds = np.concatenate([[0], brk, [len(addrs)]])
    for s, e in itertools.pairwise(bounds):
        yield int(addrs[s]), int(pos[s]), int(e - s)


def _runs_array(addrs: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """_runs as an (n, 3) uint64 array, without a Python step per run: a chunk of scattered pages
    (every 4th page zero, say) has ~85 runs, a GiB of them ~87000."""
    import numpy as np

    if not len(addrs):
        return np.zeros((0, 3), dtype=np.uint64)
    brk = np.flatnonzero((np.diff(addrs.astype(np.int64)) != PAGE_SIZE) | (np.diff(pos) != 1)) + 1
    first = np.concatenate([[0], brk])
    count = np.diff(np.concatenate([first, [len(addrs)]]))
    return np.stack(
        [addrs[first].astype(np.uint64), pos[first].astype(np.uint64), count.astype(np.uint64)], axis=1
    )


@dataclass
class FillWork:
    """What fill_pages works from, made from the plan and the layers alone (no helper needed): a
    restore makes it on the plan's thread while the helper starts (restorer.restore_one), so that
    it is off the restore's path. Made again if not given (a warm migration, a tree)."""

    rows: Any  # table rows whose data is written
    zeros: Any  # addresses of pages to zero
    jobs: list[tuple[int, int, Any, Any]]  # (layer, chunk, addrs, positions in chunk)
    spans: list[tuple[int, int]]  # the mappings UffdFill may fill, before the helper's own check
    stats: FillStats  # (skipped_file_pages)
    ms: float  # how long it took


def fill_work(view: MergedView, plan: RestorePlan) -> FillWork:
    """page_work, the trusted digests' check (a refusal raised here: RestoreError), the jobs."""
    t0 = time.perf_counter()
    stats = FillStats()
    try:
        rows, zeros, trusted = page_work(plan, stats)
        check_trusted_digests(view, plan, trusted)
    except OSError as e:  # (a file's read: as prepare() words it when this runs inside it)
        raise RestoreError(f"restore failed: {e}") from None
    jobs: list[tuple[int, int, Any, Any]] = (
        list(fillsmall.jobs(view, plan, rows)) if plan.table.small else _jobs(view, plan, rows)
    )
    spans = uffd_candidates(plan, rows)
    return FillWork(rows, zeros, jobs, spans, stats, round((time.perf_counter() - t0) * 1e3, 3))


def fill_pages(
    remote: Remote, view: MergedView, plan: RestorePlan, work: FillWork | None = None
) -> FillStats:
    """Write the pages of `plan` into the helper; `work`: fill_work(view, plan) made beforehand."""
    t0 = time.perf_counter()
    if work is None:
        work = fill_work(view, plan)
    stats, zeros, jobs = work.stats, work.zeros, work.jobs
    direct = [(p.vma.start, p.vma.end) for p in plan.vmas if p.direct]
    uffd = UffdFill.open(remote, still_empty(work.spans, remote.pid))
    stats.uffd = uffd is not None
    stats.setup_ms = round((time.perf_counter() - t0) * 1e3, 3)
    try:
        # A chunk the checks above decompressed already (a small restore's usually are all) is
        # only written: here, with no thread to start and hand it to.
        rest = []
        for job in jobs:
            if view.layers[job[0]].cached_chunk(job[1]) is None:
                rest.append(job)
            else:
                _account(stats, _fill_job(remote, view, job, direct, uffd))
        if rest:
            _fill_in_pool(stats, remote, view, rest, direct, uffd)
    finally:
        # Before anything else writes into those mappings (the zeros below, the protections).
        if uffd is not None:
            uffd.close()
    zruns = fillsmall.runs(zeros, range(len(zeros))) if isinstance(zeros, list) else _zero_runs(zeros)
    for a, _, n in zruns:
        for i in range(0, n, 256):  # a bounded buffer, however long the run
            m = min(256, n - i)
            remote.write(a + i * PAGE_SIZE, ZERO_PAGE * m)
            stats.runs += 1
        stats.pages += n
    return stats


def _fill_in_pool(
    stats: FillStats,
    remote: Remote,
    view: MergedView,
    jobs: list[tuple[int, int, Any, Any]],
    direct: list[tuple[int, int]],
    uffd: UffdFill | None,
) -> None:
    # Each worker decompresses (and verifies) a chunk and writes its pages: both release the GIL,
    # and faulting the new pages in the target is as much work as the decompression. (ckpt's own
    # pool: concurrent.futures would import logging and the rest, ~30 M instructions, in-process.)
    from ckpt.threadpool import ThreadPool

    pool = ThreadPool(WORKERS, "ckpt-restore")
    ahead: deque[Task[tuple[int, int, int]]] = deque()
    try:
        for job in jobs:
            ahead.append(pool.submit(_fill_job, remote, view, job, direct, uffd))
            while len(ahead) > 2 * WORKERS:
                _account(stats, ahead.popleft().result())
        while ahead:
            _account(stats, ahead.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _jobs(view: MergedView, plan: RestorePlan, rows: np.ndarray) -> list[tuple[int, int, Any, Any]]:
    import numpy as np

    from ckpt import ranges

    t = plan.table
    jobs: list[tuple[int, int, Any, Any]] = []
    lay, idx, addr = t.layer[rows], t.index[rows], t.addr[rows]
    for k in ranges.unique(lay):
        m = lay == k
        layer = view.layers[int(k)]
        ii, aa = idx[m], addr[m]
        ch = layer.chunk_of(ii)
        first = layer.chunk_starts
        # Rows are in address order and a layer's data pages are too, so each chunk's rows are contiguous.
        cut = np.flatnonzero(np.diff(ch)) + 1
        for s, e in zip(np.concatenate([[0], cut]), np.concatenate([cut, [len(ch)]]), strict=True):
            c = int(ch[s])
            jobs.append((int(k), c, aa[s:e], ii[s:e] - int(first[c])))
    return jobs


def _zero_runs(zeros: np.ndarray) -> Iterator[tuple[int, int, int]]:
    import numpy as np

    return _runs(zeros, np.arange(len(zeros)))


def uffd_spans(plan: RestorePlan, rows: Any, pid: int) -> list[tuple[int, int]]:
    """The mappings UFFDIO_COPY fills: private anonymous ones, filled through a writable mapping,
    whose pages to write come in runs of MIN_RUN_PAGES or more on average (a run: adjacent pages
    that are adjacent in one layer's chunk, what one call writes), and that hold no page yet in
    process `pid` (UFFDIO_COPY only fills holes: a live migration fills its helper again and again)."""
    return still_empty(uffd_candidates(plan, rows), pid)


def uffd_candidates(plan: RestorePlan, rows: Any) -> list[tuple[int, int]]:
    """uffd_spans before the look at the process: from the plan alone."""
    if plan.table.small:
        return [(s, e) for s, e, n, r in fillsmall.run_counts(plan, rows) if n >= MIN_RUN_PAGES * r]
    return _uffd_candidates(plan, rows)


def still_empty(spans: list[tuple[int, int]], pid: int) -> list[tuple[int, int]]:
    """Those of `spans` that hold no page (present or swapped) in process `pid`, sorted."""
    want = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
    out = spans
    if out and pagemap_scan_supported():
        with PagemapScanner(pid) as scan:
            out = [s for s in out if not scan.count([s], category_anyof_mask=want)]
    elif out:
        out = [s for s in out if not len(present_in(pid, [s]))]
    return sorted(out)


def _uffd_candidates(plan: RestorePlan, rows: np.ndarray) -> list[tuple[int, int]]:
    import numpy as np

    t = plan.table
    addr = t.addr[rows].astype(np.int64)
    if not len(addr):
        return []
    lay, idx = t.layer[rows].astype(np.int64), t.index[rows].astype(np.int64)
    starts = np.ones(len(addr), dtype=bool)
    starts[1:] = (np.diff(addr) != PAGE_SIZE) | (np.diff(lay) != 0) | (np.diff(idx) != 1)
    run_no = np.cumsum(starts)
    out = []
    for p in plan.vmas:
        if not p.fill or p.direct or p.kind not in ("anon", "copy"):
            continue
        lo = int(np.searchsorted(addr, p.vma.start))
        hi = int(np.searchsorted(addr, p.vma.end))
        if hi == lo:
            continue
        nruns = int(run_no[hi - 1] - run_no[lo]) + 1
        if (hi - lo) >= MIN_RUN_PAGES * nruns:
            out.append((p.vma.start, p.vma.end))
    return out


_bufs = threading.local()


def _buffers() -> ChunkBuffers:
    b: ChunkBuffers | None = getattr(_bufs, "b", None)
    if b is None:
        b = _bufs.b = ChunkBuffers()
    return b


def _fill_job(
    remote: Remote,
    view: MergedView,
    job: tuple[int, int, Any, Any],
    direct: list[tuple[int, int]],
    uffd: UffdFill | None = None,
) -> tuple[int, int, int]:
    """Write one chunk's pages; (runs written, pages, UFFDIO_COPY calls). Pages of `direct`
    mappings (not readable, so left unwritable) go through /proc/PID/mem, whose FOLL_FORCE writes
    them; pages of `uffd`'s mappings with UFFDIO_COPY, one call per run; the rest with
    process_vm_writev in batches."""
    k, c, addrs, pos = job
    try:
        # The chunk's own checksum covers the bytes written; the page digests decide nothing here.
        # Into this thread's buffers, used again for its next chunk: fresh ones fault every page.
        layer = view.layers[k]
        cached = layer.cached_chunk(c)
        data = memoryview(cached) if cached is not None else layer.read_chunk_into(c, _buffers())
    except CkptError as e:
        raise RestoreError(f"cannot restore: {e}") from None
    if isinstance(addrs, list):
        return fillsmall.fill_job(remote, data, addrs, pos, direct, uffd)
    import numpy as np

    from ckpt import ranges

    forced = ranges.contains(addrs, direct) if direct else None
    if uffd is not None and forced is None and uffd.span_holding(int(addrs[0]), int(addrs[-1])) >= 0:
        # The usual case, the whole chunk in one registered mapping: no masks, and a chunk that is
        # one run (most are) costs one UFFDIO_COPY and a few integer operations.
        base = _address(data)
        cnt, a0, p0 = len(addrs), int(addrs[0]), int(pos[0])
        if int(addrs[-1]) - a0 == (cnt - 1) * PAGE_SIZE and int(pos[-1]) - p0 == cnt - 1:
            return 1, cnt, uffd.copy(a0, base + p0 * PAGE_SIZE, cnt * PAGE_SIZE)
        runs = _runs_array(addrs, pos).tolist()
        calls = sum(uffd.copy(a, base + q * PAGE_SIZE, k * PAGE_SIZE) for a, q, k in runs)
        return len(runs), cnt, calls
    mine = uffd.covers(addrs) if uffd is not None else None
    n = calls = 0
    if uffd is not None and mine is not None and mine.any():
        whole = bool(mine.all())  # the usual case: skip the masks
        ua, up = (addrs, pos) if whole else (addrs[mine], pos[mine])
        base = _address(data)
        # A run must not cross from one registered mapping into the next: one UFFDIO_COPY, one mapping.
        for a, p0, cnt in _runs(ua, up, uffd.span_of(ua)):
            calls += uffd.copy(a, base + p0 * PAGE_SIZE, cnt * PAGE_SIZE)
            n += 1
        if whole:
            return n, len(addrs), calls
    rest = np.ones(len(addrs), dtype=bool) if mine is None else ~mine
    if forced is not None:
        rest &= ~forced
    runs = _runs_array(addrs[rest], pos[rest])
    remote.write_runs(data, runs)
    n += len(runs)
    if forced is not None and forced.any():
        mv = memoryview(data)
        for a, p0, cnt in _runs(addrs[forced], pos[forced]):
            remote.write(a, mv[p0 * PAGE_SIZE : (p0 + cnt) * PAGE_SIZE])
            n += 1
    return n, len(addrs), calls


def _address(data: memoryview) -> int:
    """Where `data`'s bytes are in our memory (for a syscall to read them)."""
    return buffer_address(data)


def _account(stats: FillStats, done: tuple[int, int, int]) -> None:
    """One job's counts, added in the thread that waits for it: exact without a lock."""
    stats.chunks += 1
    stats.runs += done[0]
    stats.pages += done[1]
    stats.uffd_copies += done[2]
