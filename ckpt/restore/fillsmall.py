"""The fill's bookkeeping for a small page table (issue 9 part 3): restore/memory.py's page_work, jobs,
runs and per-chunk writes over a table of array.array columns (chain.PageTable, `small`), in plain
Python: a 1 MiB process has a few hundred rows, and numpy's import (~70-130 ms) would cost more than
all of it. Each function gives what its numpy twin in memory.py gives, in lists
(tests/test_smallfill.py compares them on generated tables and on real restores).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import xxhash

from ckpt.errors import RestoreError
from ckpt.image import STATE_DATA, STATE_ZERO, MergedView
from ckpt.image.format import PAGE_SIZE, ZERO_PAGE_DIGEST, TaskRecord
from ckpt.openas import open_as, open_many_as
from ckpt.ranges import span_at
from ckpt.restore.remote import Remote, buffer_address

if TYPE_CHECKING:
    from ckpt.restore.memory import FillStats
    from ckpt.restore.plan import RestorePlan, VmaPlan
    from ckpt.restore.uffdfill import UffdFill

Run = tuple[int, int, int]  # (address, first position, pages)
Job = tuple[int, int, list[int], list[int]]  # (layer, chunk, addresses, positions in the chunk)


def runs(addrs: Sequence[int], pos: Sequence[int], part: Sequence[int] | None = None) -> list[Run]:
    """(address, first position, count) of each run where both go up by one page at a time (and
    `part`, if given, stays the same): memory._runs / _runs_array."""
    out: list[Run] = []
    n = len(addrs)
    j = 0
    while j < n:
        a0, p0 = addrs[j], pos[j]
        e = j + 1
        while (
            e < n
            and addrs[e] == a0 + (e - j) * PAGE_SIZE
            and pos[e] == p0 + (e - j)
            and (part is None or part[e] == part[j])
        ):
            e += 1
        out.append((a0, p0, e - j))
        j = e
    return out


class FileFds:
    """The files page_work reads, each opened once with the process's rights: open_as starts a
    thread for each call, and a process's ~15 private file mappings are ~5 files. `open_all`
    opens them all in one such thread; a file that failed to open is refused where it is asked
    for (`get`), as if opened there."""

    def __init__(self, task: TaskRecord) -> None:
        self.task = task
        self.fds: dict[str, int] = {}
        self.failed: dict[str, BaseException] = {}

    def open_all(self, paths: list[str]) -> None:
        todo = list(dict.fromkeys(p for p in paths if p not in self.fds and p not in self.failed))
        if not todo:
            return
        for path, got in zip(todo, open_many_as(self.task, todo, os.O_RDONLY | os.O_CLOEXEC), strict=True):
            if isinstance(got, int):
                self.fds[path] = got
            else:
                self.failed[path] = got

    def get(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            try:
                err = self.failed.get(path)
                if err is not None:
                    raise err
                fd = self.fds[path] = open_as(self.task, path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise RestoreError(f"cannot read {path}: {e.strerror}") from None
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.failed.clear()


def file_digests(fd: int, offset: int, start: int, addrs: list[int]) -> list[int]:
    """memory._file_digests in a list: xxh3 of the file's bytes at each page (zeros past its end)."""
    out = [0] * len(addrs)
    h = xxhash.xxh3_64_intdigest
    for a, i, n in runs(addrs, range(len(addrs))):
        for k in range(0, n, 256):
            m = min(256, n - k)
            b = os.pread(fd, m * PAGE_SIZE, offset + a + k * PAGE_SIZE - start).ljust(m * PAGE_SIZE, b"\0")
            mv = memoryview(b)
            for q in range(m):
                out[i + k + q] = h(mv[q * PAGE_SIZE : (q + 1) * PAGE_SIZE])
    return out


def page_work(plan: RestorePlan, stats: FillStats) -> tuple[list[int], list[int], list[int]]:
    """memory.page_work for a small table: (rows to write, addresses to zero, rows left to the file)."""
    write: list[int] = []
    trusted: list[int] = []
    zeros: list[int] = []
    files = FileFds(plan.task)
    try:
        _page_work(plan, stats, files, write, trusted, zeros)
    finally:
        files.close()
    return sorted(write), zeros, sorted(trusted)


def _page_work(
    plan: RestorePlan,
    stats: FillStats,
    files: FileFds,
    write: list[int],
    trusted: list[int],
    zeros: list[int],
) -> None:
    t = plan.table
    addr, state, digest = t.addr, t.state, t.digest
    files_of: list[tuple[VmaPlan, list[int]]] = []  # private file mappings with pages to compare
    for p in plan.vmas:
        if not p.fill or p.kind == "shared":
            continue
        lo, hi = t.rows(p.vma.start, p.vma.end)
        if p.kind == "objpriv":
            write.extend(j for j in range(lo, hi) if state[j] == STATE_DATA)
            zeros.extend(addr[j] for j in range(lo, hi) if state[j] == STATE_ZERO)
            continue
        if p.kind != "file":
            write.extend(j for j in range(lo, hi) if state[j] == STATE_DATA)
            continue
        cand = [j for j in range(lo, hi) if state[j] in (STATE_DATA, STATE_ZERO)]
        if cand:
            files_of.append((p, cand))
    files.open_all([p.vma.path for p, _ in files_of])
    for p, cand in files_of:
        fdig = file_digests(files.get(p.vma.path), p.vma.offset, p.vma.start, [addr[j] for j in cand])
        for j, got in zip(cand, fdig, strict=True):
            is_data = state[j] == STATE_DATA
            if got == (digest[j] if is_data else ZERO_PAGE_DIGEST):
                stats.skipped_file_pages += 1
                if is_data:
                    trusted.append(j)
            elif is_data:
                write.append(j)
            else:
                zeros.append(addr[j])


def chunks_of(view: MergedView, plan: RestorePlan, rows: list[int]) -> list[tuple[int, int]]:
    """(layer, chunk) of each chunk the rows' pages are in, in order."""
    t = plan.table
    return sorted({(t.layer[j], view.layers[t.layer[j]].chunk_of(t.index[j])) for j in rows})


def jobs(view: MergedView, plan: RestorePlan, rows: list[int]) -> list[Job]:
    """memory.fill_pages's jobs: the rows' pages by layer, then by chunk."""
    t = plan.table
    by_layer: dict[int, tuple[list[int], list[int]]] = {}
    for j in rows:
        aa, ii = by_layer.setdefault(t.layer[j], ([], []))
        aa.append(t.addr[j])
        ii.append(t.index[j])
    out: list[Job] = []
    for k in sorted(by_layer):
        aa, ii = by_layer[k]
        layer = view.layers[k]
        first = layer.chunk_starts
        ch = layer.chunk_of(ii)
        # Rows are in address order and a layer's data pages are too, so each chunk's rows are contiguous.
        s = 0
        for e in range(1, len(ch) + 1):
            if e == len(ch) or ch[e] != ch[s]:
                c = ch[s]
                f = int(first[c])
                out.append((k, c, aa[s:e], [i - f for i in ii[s:e]]))
                s = e
    return out


def run_counts(plan: RestorePlan, rows: list[int]) -> Iterator[tuple[int, int, int, int]]:
    """For memory.uffd_spans: (start, end, pages, runs) of each mapping that has rows, where a run is
    adjacent pages that are adjacent in one layer's chunk."""
    t = plan.table
    addr = [t.addr[j] for j in rows]
    lay = [t.layer[j] for j in rows]
    idx = [t.index[j] for j in rows]
    run_no = []
    r = 0
    for j in range(len(addr)):
        if not (
            j and addr[j] - addr[j - 1] == PAGE_SIZE and lay[j] == lay[j - 1] and idx[j] - idx[j - 1] == 1
        ):
            r += 1
        run_no.append(r)
    for p in plan.vmas:
        if not p.fill or p.direct or p.kind not in ("anon", "copy"):
            continue
        lo, hi = bisect.bisect_left(addr, p.vma.start), bisect.bisect_left(addr, p.vma.end)
        if hi > lo:
            yield p.vma.start, p.vma.end, hi - lo, run_no[hi - 1] - run_no[lo] + 1


def fill_job(
    remote: Remote,
    data: memoryview,
    addrs: list[int],
    pos: list[int],
    direct: list[tuple[int, int]],
    uffd: UffdFill | None,
) -> tuple[int, int, int]:
    """memory._fill_job's writes for one chunk's pages in lists: (runs written, pages, UFFDIO_COPY
    calls). Pages of a registered mapping go by UFFDIO_COPY, a run never crossing into the next
    mapping; pages of `direct` mappings through /proc/PID/mem; the rest by process_vm_writev."""
    dstart = [s for s, _ in direct]
    ua: list[int] = []
    up: list[int] = []
    us: list[int] = []
    wa: list[int] = []
    wp: list[int] = []
    fa: list[int] = []
    fp: list[int] = []
    for a, p in zip(addrs, pos, strict=True):
        si = uffd.span_index(a) if uffd is not None else -1
        if si >= 0:
            ua.append(a)
            up.append(p)
            us.append(si)
        elif direct and span_at(dstart, direct, a) >= 0:
            fa.append(a)
            fp.append(p)
        else:
            wa.append(a)
            wp.append(p)
    n = calls = 0
    if ua:
        assert uffd is not None
        base = buffer_address(data)
        for a, p0, cnt in runs(ua, up, us):
            calls += uffd.copy(a, base + p0 * PAGE_SIZE, cnt * PAGE_SIZE)
            n += 1
    if wa:
        w = runs(wa, wp)
        remote.write_runs(data, w)
        n += len(w)
    for a, p0, cnt in runs(fa, fp):
        remote.write(a, data[p0 * PAGE_SIZE : (p0 + cnt) * PAGE_SIZE])
        n += 1
    return n, len(addrs), calls
