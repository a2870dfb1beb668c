"""Pages of a target: which are present, and bulk copies of them.

Hand-written ctypes because no maintained library wraps PAGEMAP_SCAN or a batched
process_vm_readv; both are measured in ../shared/PERF-NOTES.md as the fastest way here
(PAGEMAP_SCAN finds 1 GiB of present pages in ~4 ms; process_vm_readv with coalesced runs reads
~4 GB/s, twice the speed of per-page iovecs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np

from ckpt import cbuf, ranges
from ckpt.errors import TargetExited
from ckpt.pageset import small_max
from ckpt.prefault import populate
from ckpt.proc import grab
from ckpt.proc.maps import PAGE_SIZE, Vma
from ckpt.proc.objects import is_shmem_object

if TYPE_CHECKING:
    from ckpt.pageset import PageSet

_libc = ctypes.CDLL(None, use_errno=True)
MADV_DONTNEED = 4

# <linux/fs.h> PAGEMAP_SCAN
PAGEMAP_SCAN = 0xC0606610
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

# The kernel refuses scan ranges that reach past the last user page (EFAULT seen at 0x7ffffffff000).
USER_ADDR_MAX = 0x7FFFFFFFF000

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61
PM_SOFT_DIRTY = 1 << 55

PAGEMAP_WINDOW = 1 << 30  # bytes of address read from /proc/PID/pagemap at once, without PAGEMAP_SCAN


class PmScanArg(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


class PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# A small copy's iovec arrays (cbuf.vector: powers of two) made at import, not in a freeze (cbuf.py).
cbuf.warm(IoVec, 1, 2, 4, 8, 16)


_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    categories: int


def open_pagemap(pid: int) -> int:
    """/proc/PID/pagemap, read-only; a process gone or exiting (its mm released: ESRCH) is TargetExited."""
    try:
        return os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetExited(f"process {pid} exited") from None


# A count over more spans than this walks once from the first to the last (PagemapScanner.count).
COUNT_SPANS_APART = 4


def _pages_within(regions: Sequence[tuple[int, int, int]], spans: Sequence[tuple[int, int]]) -> int:
    """Pages of the sorted, disjoint `regions` (start, end, categories) that lie inside the sorted,
    disjoint `spans`: one pass over both."""
    n = i = 0
    for a, b, _ in regions:
        while i < len(spans) and spans[i][1] <= a:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < b:
            n += (min(b, spans[j][1]) - max(a, spans[j][0])) // PAGE_SIZE
            j += 1
    return n


RawScan = list[tuple[bytes, int]]  # PagemapScanner.raw: each call's rows, and their floor


def arrays_of(raw: RawScan) -> np.ndarray:
    """A raw scan's regions as an (n, 3) uint64 array of start, end, categories."""
    out: list[np.ndarray] = []
    for rows, floor in raw:
        got = np.frombuffer(rows, dtype=np.uint64).reshape(-1, 3).copy()
        if floor and len(got):
            got[:, 0] = np.maximum(got[:, 0], np.uint64(floor))
            got = got[got[:, 0] < got[:, 1]]
        out.append(got)
    if len(out) == 1:
        return out[0]
    return np.concatenate(out) if out else np.empty((0, 3), np.uint64)


def regions_of(raw: RawScan) -> list[tuple[int, int, int]]:
    """A raw scan's regions as a list of (start, end, categories), without numpy."""
    out: list[tuple[int, int, int]] = []
    for rows, floor in raw:
        v = memoryview(rows).cast("Q").tolist()
        for i in range(0, len(v), 3):
            a = max(v[i], floor)
            if a < v[i + 1]:
                out.append((a, v[i + 1], v[i + 2]))
    return out


class PagemapScanner:
    """PAGEMAP_SCAN on one target's /proc/PID/pagemap, reusing its result vector."""

    VEC_LEN = 4096

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = open_pagemap(pid)
        with _SPARE_LOCK:
            vec = _SPARE_VECS.pop() if _SPARE_VECS else None
        # A kept vector: a new one is 96 KiB zeroed (~10-40 us of a freeze, which makes several
        # scanners: the dirty, hole, candidate and guard walks).
        self._vec = vec if vec is not None else _REGIONS()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            with _SPARE_LOCK:  # (a closed scanner's walks fail at their ioctl: the vector is free)
                if len(_SPARE_VECS) < 4:
                    _SPARE_VECS.append(self._vec)

    def __enter__(self) -> PagemapScanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _walk(
        self,
        start: int,
        end: int,
        *,
        category_mask: int = 0,
        category_anyof_mask: int = 0,
        category_inverted: int = 0,
        return_mask: int | None = None,
        flags: int = 0,
        max_pages: int = 0,
    ) -> Iterator[tuple[int, int]]:
        """The PAGEMAP_SCAN calls over [start, end), until the walk reaches `end` (one call returns
        at most VEC_LEN regions). After each: (n, floor): the vector holds n regions, whose starts
        are to be raised to `floor`, dropping those left empty. The vector is reused: take what it
        holds before the next step."""
        end = min(end, USER_ADDR_MAX)
        arg = PmScanArg()
        rmask = (category_mask | category_anyof_mask) if return_mask is None else return_mask
        floor = 0
        while start < end:
            arg.size = ctypes.sizeof(PmScanArg)
            arg.flags = flags
            arg.start = start
            arg.end = end
            arg.walk_end = 0
            arg.vec = ctypes.addressof(self._vec)
            arg.vec_len = self.VEC_LEN
            arg.max_pages = max_pages
            arg.category_inverted = category_inverted
            arg.category_mask = category_mask
            arg.category_anyof_mask = category_anyof_mask
            arg.return_mask = rmask
            n = _libc.ioctl(self.fd, PAGEMAP_SCAN, ctypes.addressof(arg))
            if n < 0:
                e = ctypes.get_errno()
                if e == errno.ESRCH:
                    raise TargetExited(f"process {self.pid} exited")
                raise OSError(e, f"PAGEMAP_SCAN on pid {self.pid} [{start:#x}, {end:#x}): {os.strerror(e)}")
            # Never hand back a page twice, whatever the kernel reports (see below): a resumed
            # call's regions are clipped to where it resumed.
            yield n, floor
            if n < self.VEC_LEN:
                # A vector not filled means the walk reached `end`. The kernel's walk_end cannot say
                # so: it is only set when the walk stops early, and is not reset when a later part of
                # the same call completes the walk. The kernel walks in batches of 512 regions, so
                # any scan of more than 512 regions that fit the vector returned a walk_end in the
                # middle; resuming there reported the rest again, out of order (issue 9: a dump of
                # one 16 MiB mapping with a hole every 8 pages failed in the writer).
                break
            # The vector is full: go on after what it holds. walk_end is right when the walk
            # stopped for lack of room, stale when the last batch completed it exactly.
            nxt = max(int(arg.walk_end), int(self._vec[n - 1].end) if n else 0)
            if nxt <= start:
                break
            start = floor = nxt

    def scan_arrays(self, start: int, end: int, **kw: Any) -> np.ndarray:
        """All regions in [start, end) matching, as an (n, 3) uint64 array of start, end, categories
        (numpy: for scans that may return many regions; `regions` for few)."""
        return arrays_of(self.raw(start, end, **kw))

    def regions(self, start: int, end: int, **kw: Any) -> list[tuple[int, int, int]]:
        """Like scan_arrays, as a list of (start, end, categories), without numpy."""
        return regions_of(self.raw(start, end, **kw))

    def raw(self, start: int, end: int, **kw: Any) -> RawScan:
        """The scan as the kernel wrote it: each call's rows (bytes of (start, end, categories)
        uint64 triples) and the floor their starts are raised to. Nothing parsed: a thread that
        scans beside Python work holds the GIL only between its calls (arrays_of and regions_of
        make scan_arrays' and regions' answers of it)."""
        vec = memoryview(self._vec).cast("B")
        return [(bytes(vec[: 24 * n]), floor) for n, floor in self._walk(start, end, **kw)]

    def walk(self, start: int, end: int, **kw: Any) -> None:
        """The scan for its side effect alone (PM_SCAN_WP_MATCHING's write-protect): no result kept."""
        for _ in self._walk(start, end, **kw):
            pass

    def scan(self, start: int, end: int, **kw: int) -> list[Region]:
        """Like scan_arrays, as Region records."""
        return [Region(a, b, c) for a, b, c in self.regions(start, end, **kw)]

    def count(self, spans: Sequence[tuple[int, int]], **kw: int) -> int:
        """How many pages inside the sorted, disjoint spans match the scan, from the regions alone (no
        per-page array: a huge match costs one row).

        Many spans (a process's mappings): one walk over all of them, its regions then cut to the
        spans. A call per mapping cost more than the walk itself: 0.8 against 0.4 ms for a 64 MiB
        process of 24 mappings (a dump's `pages_total`, after the thaw of a migration's final round,
        inside its downtime). A few: one walk each, which does not walk what lies between."""
        if len(spans) <= COUNT_SPANS_APART:
            return sum((e - s) // PAGE_SIZE for a, b in spans for s, e, _ in self.regions(a, b, **kw))
        return _pages_within(self.regions(spans[0][0], spans[-1][1], **kw), spans)

    def pages(self, spans: Sequence[tuple[int, int]], **kw: int) -> np.ndarray:
        """Page addresses (uint64, ascending) matching the scan, inside the sorted, disjoint spans.

        Many spans (a process's mappings): one scan over all of them, ~1 ms for a whole process, then
        a filter. A few (a dump's new mappings): one scan each, which does not walk the rest."""
        if not spans:
            return np.empty(0, np.uint64)
        if len(spans) <= 16:
            parts = [self.scan_arrays(a, b, **kw) for a, b in spans]
            r = np.concatenate(parts)
            return ranges.to_pages(r[:, 0], r[:, 1])
        r = self.scan_arrays(spans[0][0], spans[-1][1], **kw)
        pages = ranges.to_pages(r[:, 0], r[:, 1])
        a = np.array(spans, dtype=np.uint64)
        return pages[ranges.in_spans(pages, a[:, 0], a[:, 1])]

    def small_pages(self, spans: Sequence[tuple[int, int]], limit: int, **kw: Any) -> array[int] | None:
        """`pages` as an array('Q') when at most `limit` pages match, else None. Each call is told
        to stop past the limit (max_pages), so a big process costs one short walk before its numpy
        scan, not a second whole one."""
        runs: list[tuple[int, int]] = []
        n = 0
        few = len(spans) <= 16
        flat = memoryview(self._vec).cast("B").cast("Q")
        for lo, hi in spans if few else [(spans[0][0], spans[-1][1])]:
            for k, floor in self._walk(lo, hi, max_pages=limit + 1 - n, **kw):
                v = flat[: 3 * k].tolist()
                for i in range(0, 3 * k, 3):
                    a = max(v[i], floor)
                    if a < v[i + 1]:
                        runs.append((a, v[i + 1]))
                        n += (v[i + 1] - a) // PAGE_SIZE
                if n > limit:
                    return None
        out = ranges.pages_of(runs, small=True)
        return out if few else ranges.inside(out, spans)

    def page_set(self, spans: Sequence[tuple[int, int]], **kw: Any) -> PageSet:
        """`pages` as a page set: numpy only if it holds more than pageset.small_max() pages."""
        from ckpt import pageset

        if len(spans) <= 16:
            return pageset.from_runs([(a, b) for s, e in spans for a, b, _ in self.regions(s, e, **kw)])
        regs = self.regions(spans[0][0], spans[-1][1], **kw)
        return pageset.from_runs([(a, b) for a, b, _ in regs]).within(spans)


_REGIONS = cbuf.array_type(PageRegion, PagemapScanner.VEC_LEN)  # (not made again in a freeze: cbuf.py)
_SPARE_VECS: list[ctypes.Array[PageRegion]] = []  # closed scanners' vectors, for the next (a few)
_SPARE_LOCK = threading.Lock()


def pagemap_scan_supported() -> bool:
    """Whether this kernel has the PAGEMAP_SCAN ioctl (Linux >= 6.7)."""
    try:
        with PagemapScanner(os.getpid()) as s:
            s.scan(0x10000, 0x20000, category_anyof_mask=PAGE_IS_PRESENT)
        return True
    except OSError:
        return False


def read_pagemap(pid: int, start: int, end: int) -> np.ndarray:
    """Raw 64-bit pagemap entries for [start, end)."""
    n = (end - start) // PAGE_SIZE
    fd = open_pagemap(pid)
    try:
        buf = bytearray(n * 8)
        mv = memoryview(buf)
        off, got = (start // PAGE_SIZE) * 8, 0
        while got < len(buf):
            k = os.preadv(fd, [mv[got:]], off + got)
            if k <= 0:
                break
            got += k
        return np.frombuffer(buf, dtype="<u8")[: got // 8].copy()
    finally:
        os.close(fd)


def pagemap_entry(pid: int, addr: int) -> int:
    """The 64-bit pagemap entry of one page (no numpy: the tracker probe of every dump asks)."""
    fd = open_pagemap(pid)
    try:
        b = os.pread(fd, 8, (addr // PAGE_SIZE) * 8)
    finally:
        os.close(fd)
    return int.from_bytes(b, "little") if len(b) == 8 else 0


_HAVE_SCAN: bool | None = None


class _Sysinfo(ctypes.Structure):
    """struct sysinfo (<linux/sysinfo.h>), the fields up to totalswap; the rest is room."""

    _fields_ = (
        ("uptime", ctypes.c_long),
        ("loads", ctypes.c_ulong * 3),
        ("totalram", ctypes.c_ulong),
        ("freeram", ctypes.c_ulong),
        ("sharedram", ctypes.c_ulong),
        ("bufferram", ctypes.c_ulong),
        ("totalswap", ctypes.c_ulong),
        ("rest", ctypes.c_char * 64),
    )


def swap_active() -> bool:
    """Whether any swap is on: sysinfo(2)'s totalswap, the same total as /proc/meminfo's SwapTotal
    (si_swapinfo), in one syscall (~1 us) instead of a meminfo read (~30 us), twice in each freeze."""
    si = _Sysinfo()
    if _libc.sysinfo(ctypes.byref(si)) == 0:
        return si.totalswap > 0
    with open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("SwapTotal:"):
                return int(ln.split()[1]) > 0
    return False


def count_present(pid: int, vmas: Sequence[Vma]) -> int:
    """len(present_pages(pid, vmas)), without building the page array where PAGEMAP_SCAN exists."""
    global _HAVE_SCAN
    if _HAVE_SCAN is None:
        _HAVE_SCAN = pagemap_scan_supported()
    if not _HAVE_SCAN:
        return len(present_pages(pid, vmas))
    want = PAGE_IS_PRESENT | (PAGE_IS_SWAPPED if swap_active() else 0)
    with PagemapScanner(pid) as s:
        return s.count([(v.start, v.end) for v in vmas], category_anyof_mask=want)


def present_pages(pid: int, vmas: Sequence[Vma], small: bool = False) -> ranges.Pages:
    """Addresses of every page in RAM or swapped out, in the given VMAs, ascending."""
    return present_in(pid, [(v.start, v.end) for v in vmas], small)


NATIVE_SPANS = 3  # present_in's walks from which procgrab.c makes them (grab.scans_now)
# present_in's spans closer than this walked as one: what lies between costs a walk at most 4096
# page-table entries and that many pages to drop (a thread's stack, 8 MiB by default, between two
# stack guards), where each walk of its own costs ~8 us of the ioctl's set-up.
HULL_GAP = 16 << 20


def _span_pages(spans: Sequence[tuple[int, int]]) -> int:
    return sum(b - a for a, b in spans) // PAGE_SIZE


def _hulls(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The sorted, disjoint spans joined where the gap between two is under HULL_GAP."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and a - out[-1][1] < HULL_GAP:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def present_in(pid: int, spans: Sequence[tuple[int, int]], small: bool = False) -> ranges.Pages:
    """Addresses of every page in RAM or swapped out inside the sorted, disjoint spans, ascending.

    uffd-wp markers on never-populated pages are swap entries to the kernel and show as SWAPPED
    (seen here), so swapped pages are only asked for when swap is on; where it is, a marker read
    back comes out as a zero page, which costs a little and is still right.

    `small`: an array('Q') where at most pageset.small_max() pages are found (a dump's, whose set
    functions take either kind: ranges.py); numpy's otherwise, and by default.
    """
    global _HAVE_SCAN
    if _HAVE_SCAN is None:
        _HAVE_SCAN = pagemap_scan_supported()
    want = PAGE_IS_PRESENT | (PAGE_IS_SWAPPED if swap_active() else 0)
    if _HAVE_SCAN:
        with PagemapScanner(pid) as s:
            limit = small_max()
            if small and not spans:
                return ranges.empty()
            if small and limit > 0:
                # Spans close together walked as one (each thread's stack guard, 8 MiB apart: one
                # walk of the stacks between them, ~8 us a walk less), the pages between dropped.
                hulls = _hulls(spans)
                got = None
                if len(hulls) >= NATIVE_SPANS and _span_pages(hulls) <= limit:
                    # Many walks left: in one C call. Their pages cannot pass the limit, so no walk
                    # needs max_pages' early stop.
                    specs = [(a, b, {"category_anyof_mask": want}) for a, b in hulls]
                    raw = grab.scans_now(pid, s.fd, specs)
                    if raw is not None:
                        got = ranges.pages_of([(a, b) for w in raw for a, b, _ in regions_of(w)], small=True)
                if got is None:
                    got = s.small_pages(hulls, limit, category_anyof_mask=want)
                if got is not None:
                    return got if len(hulls) == len(spans) else ranges.inside(got, spans)
                if len(hulls) < len(spans):  # (what lies between held too many pages: apart)
                    got = s.small_pages(spans, limit, category_anyof_mask=want)
                    if got is not None:
                        return got
            return s.pages(spans, category_anyof_mask=want)
    bits = PM_PRESENT | (PM_SWAPPED if want & PAGE_IS_SWAPPED else 0)
    parts = []
    for start, end in spans:
        # In windows: a PROT_NONE reservation of many GiB would otherwise be one read of 2 MiB of
        # entries per GiB, held at once.
        for lo in range(start, end, PAGEMAP_WINDOW):
            ents = read_pagemap(pid, lo, min(end, lo + PAGEMAP_WINDOW))
            idx = np.flatnonzero(ents & np.uint64(bits)).astype(np.uint64)
            if len(idx):
                parts.append(np.uint64(lo) + idx * np.uint64(PAGE_SIZE))
    return np.concatenate(parts) if parts else np.empty(0, np.uint64)


def runs(addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coalesce ascending page addresses into runs: (starts, page counts)."""
    r = ranges.runs(addrs)
    return r[:, 0], ((r[:, 1] - r[:, 0]) // np.uint64(PAGE_SIZE)).astype(np.int64)


class PageBuffer:
    """A large reusable destination for page copies.

    Faulted in (MADV_POPULATE_WRITE) before the freeze: first-touch faults cost 2-4 us a page here,
    which inside the freeze would double the time a target is stopped. Large buffers are faulted in
    by two threads.
    """

    borrowed = False  # rows of another's buffer (precopy.Rows): not ours to count, pool or unmap
    # Its own anonymous private mapping, whose pages `release` may give back: not a `ckpt service`'s
    # warm memfd (ckpt/warmbuf.py), whose pages are kept for the next dump.
    private = True

    def __init__(self, npages: int) -> None:
        self.npages = max(npages, 1)
        size = self.npages * PAGE_SIZE
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # 4 KiB pages on purpose: MADV_HUGEPAGE made pre-faulting 1 GiB take 48 ms to 1.9 s in a fresh
        # process on these VMs (the host backs never-touched guest memory lazily), 4 KiB a steady
        # ~0.34 s. Either way this happens before the freeze.
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self._populate(size)
        self.view = memoryview(self.map)

    POPULATE_SPLIT = 64 << 20  # above this, two threads share the page faults (ctypes drops the GIL)

    @classmethod
    def adopt(cls, mapping: mmap.mmap, npages: int, populated: bool, private: bool = True) -> PageBuffer:
        """A buffer over a mapping faulted in elsewhere (ckpt.prefault, while the command imported);
        `private`: an anonymous mapping of its own (False: a warm buffer's shared one)."""
        self = cls.__new__(cls)
        self.npages = npages
        self.map = mapping
        self.private = private
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        if not populated:
            for off in range(0, npages * PAGE_SIZE, PAGE_SIZE):
                self.map[off] = 0
        self.view = memoryview(self.map)
        return self

    def _populate(self, size: int) -> None:
        def part(lo: int, hi: int) -> int:
            # In steps (ckpt/prefault.py): one call over each half held our mmap lock throughout,
            # so the second thread could not even get its stack until the first was done.
            return 0 if populate(self.addr + lo, hi - lo) else -1

        if size > self.POPULATE_SPLIT:
            from concurrent.futures import ThreadPoolExecutor  # (its logging: not for every command)

            half = (size // 2) & ~(PAGE_SIZE - 1)
            with ThreadPoolExecutor(2) as ex:
                results = list(ex.map(lambda r: part(*r), [(0, half), (half, size)]))
        else:
            results = [part(0, size)]
        if any(r != 0 for r in results):  # Linux < 5.14: touch every page instead
            for off in range(0, size, PAGE_SIZE):
                self.map[off] = 0

    def release(self, lo: int, hi: int) -> None:
        """Give pages [lo, hi) back to the kernel now (MADV_DONTNEED; they read as zeros afterwards),
        where the buffer is `private` and not borrowed: what an unmap would free, in steps that each
        hold ckpt's mmap lock briefly (ckpt/unmapaside.py). ctypes lets go of the GIL."""
        if self.private and not self.borrowed and hi > lo:
            _libc.madvise(self.addr + lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE, MADV_DONTNEED)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):  # a view still in the writer's queue holds it; GC unmaps it
            self.map.close()


@dataclass
class ReadResult:
    addrs: ranges.Pages  # pages copied, ascending; their bytes are buf[i*PAGE:(i+1)*PAGE]
    failed: ranges.Pages  # pages that could not be read (unmapped under us, or EIO)
    nbytes: int


_IOV_MAX = 1024
# Pages in numpy's kind read_pages takes the list steps for: below it, numpy's fixed cost per call
# is the larger (scattered pages here: 32 in 0.12 ms either way, 4 in 0.16 against 0.03 ms).
READ_FEW = 32


class _ForcedReader:
    """/proc/PID/mem, opened on first use: it reads, with FOLL_FORCE, the pages process_vm_readv
    refuses with EFAULT, those of mappings that are not readable (PROT_NONE, write- or execute-only)
    but may hold data (written, then mprotect()ed). Slower than process_vm_readv (a bounce page per
    page), so only used for what that refuses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = -1

    def read(self, buf: PageBuffer, page: int, addr: int, npages: int) -> int:
        """Read up to npages pages at addr into buf's page `page`; how many whole pages came (0 when
        the first cannot be read either)."""
        if self.fd < 0:
            try:
                self.fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                raise TargetExited(f"process {self.pid} exited during the dump") from None
            except OSError:
                return 0
        view = buf.view[page * PAGE_SIZE : (page + npages) * PAGE_SIZE]
        try:
            n = os.preadv(self.fd, [view], addr)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise TargetExited(f"process {self.pid} exited during the dump") from None
            return 0
        finally:
            view.release()
        return n // PAGE_SIZE

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_pages(pid: int, addrs: ranges.Pages, buf: PageBuffer, offset_pages: int = 0) -> ReadResult:
    """Copy the given pages of pid into buf (starting at page offset_pages), contiguous, in order.

    Runs of adjacent pages become one remote iovec; up to IOV_MAX remote iovecs per call. Where
    process_vm_readv stops (a page of a mapping that is not readable), the rest of that run is read
    through /proc/PID/mem; a page neither can read is reported in `failed`, and the rest is still
    copied. Pages copied are contiguous in buf, failed ones take no room.
    """
    if offset_pages + len(addrs) > buf.npages:
        raise ValueError("page buffer too small")
    if ranges.is_small(addrs):
        return _read_small(pid, addrs, buf, offset_pages)
    if len(addrs) <= READ_FEW:
        # A few pages in numpy's kind (a pre-copied dump's frozen read): numpy's fixed cost per
        # call (~0.11 ms here) is more than the copy; the list steps, the result in numpy's kind.
        few = _read_small(pid, array("Q", addrs.tolist()), buf, offset_pages)
        return ReadResult(ranges.as_numpy(few.addrs), ranges.as_numpy(few.failed), few.nbytes)
    r = ranges.runs(addrs)
    nruns = len(r)
    # The remote iovecs, built by numpy and handed to the kernel as they lie in memory: a Python
    # loop filling ctypes structs cost ~0.6 us a run, a third of a scattered incremental copy.
    iov = np.empty((nruns, 2), dtype=np.uint64)
    iov[:, 0] = r[:, 0]
    iov[:, 1] = r[:, 1] - r[:, 0]
    ok: list[np.ndarray] = []  # (start, length) rows copied, in buffer order
    whole = True  # every run copied in full: the pages copied are `addrs` themselves
    failed: list[int] = []
    page = offset_pages  # next free page of buf
    forced = _ForcedReader(pid)
    local = IoVec()
    i = 0
    try:
        while i < nruns:
            k = min(_IOV_MAX, nruns - i)
            batch = iov[i : i + k]
            lens = np.cumsum(batch[:, 1])
            want = int(lens[-1])
            local.iov_base = buf.addr + page * PAGE_SIZE
            local.iov_len = want
            remote = ctypes.cast(batch.ctypes.data, ctypes.POINTER(IoVec))
            n = _libc.process_vm_readv(pid, ctypes.byref(local), 1, remote, k, 0)
            if n < 0:
                e = ctypes.get_errno()
                if e == errno.ESRCH:
                    raise TargetExited(f"process {pid} exited during the dump")
                n = 0
            if n == want:
                ok.append(batch.copy())
                page += want // PAGE_SIZE
                i += k
                continue
            whole = False
            # The kernel stopped inside run j, at the first page it would not read: keep the runs
            # before it, then read the rest of run j through /proc/PID/mem (mappings the process
            # cannot read), or give up on that one page.
            j = int(np.searchsorted(lens, n, side="right"))
            if j:
                ok.append(batch[:j].copy())
            done = (n - (int(lens[j - 1]) if j else 0)) // PAGE_SIZE
            page += (int(lens[j - 1]) if j else 0) // PAGE_SIZE
            start, length = int(batch[j, 0]), int(batch[j, 1])
            if done:
                ok.append(np.array([[start, done * PAGE_SIZE]], dtype=np.uint64))
                page += done
            bad = start + done * PAGE_SIZE
            rest = length // PAGE_SIZE - done
            got = forced.read(buf, page, bad, rest)
            if got:
                ok.append(np.array([[bad, got * PAGE_SIZE]], dtype=np.uint64))
                page += got
            else:
                failed.append(bad)
                got = 1
            left = rest - got
            iov[i + j] = (bad + got * PAGE_SIZE, left * PAGE_SIZE)
            i = i + j if left > 0 else i + j + 1
    finally:
        forced.close()
    if whole:
        got_addrs = np.asarray(addrs, dtype=np.uint64)
    elif ok:
        rows = np.concatenate(ok)
        got_addrs = ranges.to_pages(rows[:, 0], rows[:, 0] + rows[:, 1])
    else:
        got_addrs = np.empty(0, np.uint64)
    return ReadResult(got_addrs, np.array(failed, dtype=np.uint64), (page - offset_pages) * PAGE_SIZE)


def _read_small(pid: int, addrs: array[int], buf: PageBuffer, offset_pages: int) -> ReadResult:
    """read_pages for a small page set: the same steps on Python lists and ctypes iovecs, no numpy
    (a few hundred runs at most)."""
    runs: list[list[int]] = []  # [start, length], consumed as the kernel copies them
    for a in addrs:
        if runs and runs[-1][0] + runs[-1][1] == a:
            runs[-1][1] += PAGE_SIZE
        else:
            runs.append([a, PAGE_SIZE])
    got = array("Q")
    failed = array("Q")
    page = offset_pages
    forced = _ForcedReader(pid)
    local = IoVec()
    i = 0
    try:
        while i < len(runs):
            batch = runs[i : i + _IOV_MAX]
            remote = cbuf.vector(IoVec, [IoVec(a, n) for a, n in batch])
            want = sum(n for _, n in batch)
            local.iov_base = buf.addr + page * PAGE_SIZE
            local.iov_len = want
            n = _libc.process_vm_readv(pid, ctypes.byref(local), 1, remote, len(batch), 0)
            if n < 0:
                if ctypes.get_errno() == errno.ESRCH:
                    raise TargetExited(f"process {pid} exited during the dump")
                n = 0
            # As read_pages: the runs wholly copied, then the rest of the run the kernel stopped in
            # through /proc/PID/mem, or that one page given up.
            j = 0
            while j < len(batch) and n >= batch[j][1]:
                a, length = batch[j]
                got.extend(range(a, a + length, PAGE_SIZE))
                n -= length
                page += length // PAGE_SIZE
                j += 1
            if j == len(batch):
                i += j
                continue
            start, length = batch[j]
            done = n // PAGE_SIZE
            got.extend(range(start, start + done * PAGE_SIZE, PAGE_SIZE))
            page += done
            bad = start + done * PAGE_SIZE
            rest = length // PAGE_SIZE - done
            k = forced.read(buf, page, bad, rest)
            if k:
                got.extend(range(bad, bad + k * PAGE_SIZE, PAGE_SIZE))
                page += k
            else:
                failed.append(bad)
                k = 1
            left = rest - k
            runs[i + j] = [bad + k * PAGE_SIZE, left * PAGE_SIZE]
            i = i + j if left > 0 else i + j + 1
    finally:
        forced.close()
    return ReadResult(got, failed, (page - offset_pages) * PAGE_SIZE)


def zero_mask(data: memoryview | bytes | np.ndarray, npages: int) -> np.ndarray:
    """True for each page of data that is all zero bytes (numpy: ~20 GB/s here)."""
    from ckpt.image.pagescan import zero_rows

    return zero_rows(np.frombuffer(data, dtype=np.uint8, count=npages * PAGE_SIZE).reshape(npages, PAGE_SIZE))


def page_digests(data: memoryview | bytes, npages: int) -> np.ndarray:
    """xxh3_64 of each page."""
    from ckpt.image.pagescan import page_digests as digests

    return digests(memoryview(data).cast("B")[: npages * PAGE_SIZE])


SHARED_ANON_PATH = "/dev/zero (deleted)"


def shmem_pages(pid: int, vmas: Sequence[Vma]) -> ranges.Pages:
    """Pages of the shared anonymous mappings that their object holds (in RAM or in swap), whether or
    not the process's page table maps them: MADV_DONTNEED or reclaim takes a shared page out of the
    page table but keeps its bytes in the object, where pagemap cannot see them. Found with
    SEEK_DATA/SEEK_HOLE on /proc/PID/map_files (which needs CAP_SYS_ADMIN; without it, none)."""
    parts: list[tuple[int, int]] = []
    for v in vmas:
        if not (v.shared and (v.path == SHARED_ANON_PATH or is_shmem_object(v.path))):
            continue
        try:
            fd = os.open(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            lo, hi = v.offset, v.offset + v.size
            pos = lo
            while pos < hi:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after pos
                        break
                    raise
                if data >= hi:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), hi)
                parts.append((v.start + data - lo, v.start + hole - lo))
                pos = hole
        finally:
            os.close(fd)
    return ranges.pages_of(parts, small=ranges.npages(parts) <= small_max())
