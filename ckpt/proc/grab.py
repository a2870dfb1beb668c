"""A frozen target's fd table and some of its /proc files, read beside the injected batch.

The collect of a freeze reads ~45 /proc entries of the target (and ~3 more per fd), nearly all of
it system calls (ckpt/proc/procgrab.c says why they are read in C). Every dump starts them on a
thread of procgrab.c's own right after the seize (a full dump that arms uffd-wp: after the arming,
which injects a userfaultfd and moves it to the service range): that thread lets the GIL go for the
whole read, on the second CPU, while the freezing thread runs the injected batch; the collect then
takes the bytes from here instead of reading them again (`prefetched`, `take_file`, `take_link`,
`take_limits`, list_fds' ``table``).

Why this is the same as reading them in the collect: every entry is read while every thread of
the target is stopped, and nothing the batch does changes one of them (its calls only ask: signal
actions, prctl getters, brk(0), timers; its code's mmap and munmap change the mappings, not these
files; the registration of new mappings with the tracker's userfaultfd changes no fd). The
entries that the batch does change (/proc/PID/stat shows the thread that runs it as running, and
status its mask while it runs) are not taken here. Each grabbed file is taken once: a second read
of the same path in the freeze goes to the kernel. Anything that went wrong here (no library, a
failed read, a buffer too small) leaves that entry to be read as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from ctypes import c_int, c_size_t, c_void_p
from dataclasses import dataclass, field
from pathlib import Path

from ckpt.cbuf import vector
from ckpt.clib import Library

ABI = 12  # procgrab.c's ABI: a library built from another version of it is not used
HERE = Path(__file__).resolve().parent
BUILD = HERE / "_procgrab.so"
CLONED_MAX = 64  # threads whose status the grab reads (paths)
CAP = 1 << 20  # a grab's buffer, or PER_FD a fd where more (a table that overflows it: read as before)
_HDR = struct.Struct("<iI")
_FD = struct.Struct("<iiiIIIQQQQqQ")
_LIMIT = struct.Struct("<iIQQ")
_STAT = struct.Struct("<QQQq")
_PIPE = struct.Struct("<iIQ")
_lock = threading.Lock()
_spare: list[ctypes.Array[ctypes.c_char]] = []  # buffers, one per grab at a time
_local = threading.local()


def _setup(so: ctypes.CDLL) -> bool:
    so.ckpt_grab.restype = ctypes.c_int64
    so.ckpt_grab.argtypes = [c_int, ctypes.c_char_p, c_void_p, c_size_t]
    for start in (so.ckpt_grab_start, so.ckpt_scans_start):
        start.restype = c_void_p
        start.argtypes = [c_int, c_void_p, c_size_t, c_void_p, c_size_t]  # (id, data, n, out, cap)
    so.ckpt_join.restype = ctypes.c_int64
    so.ckpt_join.argtypes = [c_void_p]
    so.ckpt_scans_pair_start.restype = c_void_p
    # (fd, then specs, n, out, cap of each of the two groups)
    so.ckpt_scans_pair_start.argtypes = [
        c_int, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t,
    ]  # fmt: skip
    so.ckpt_scans_pair_join.restype = ctypes.c_int64
    so.ckpt_scans_pair_join.argtypes = [c_void_p, ctypes.POINTER(ctypes.c_int64)]
    so.ckpt_scans.restype = ctypes.c_int64
    so.ckpt_scans.argtypes = [c_int, c_void_p, c_size_t, c_void_p, c_size_t]  # (fd, specs, n, out, cap)
    so.ckpt_workers.restype = c_int
    so.ckpt_workers.argtypes = [c_int]
    so.ckpt_workers_end.restype = c_int
    so.ckpt_workers_end.argtypes = []
    return True


_LIB = Library("CKPT_PROCGRAB", (BUILD,), "ckpt_procgrab_abi", ABI, _setup)


def lib() -> ctypes.CDLL | None:
    """The library, loaded on first use; None where it is not built, is of another version, or
    CKPT_PROCGRAB=0 is set."""
    return _LIB.get()


def reset(enabled: bool) -> None:
    """Load again, honouring CKPT_PROCGRAB as set now (the tests compare both paths)."""
    _LIB.reset(enabled)


@dataclass
class FdEntry:
    """One fd as procgrab.c read it: what list_fds would have read with readlink, fdinfo and stat."""

    fd: int
    err: int  # 0, or the errno of the call that failed (which: 0 readlink, 1 fdinfo, 2 stat)
    which: int
    link: str
    info: bytes
    st_dev: int  # (named as os.stat_result's: list_fds takes either)
    st_ino: int
    st_mode: int
    st_size: int
    st_mtime_ns: int
    st_rdev: int


# A thread's scheduling and robust list as props._thread_props reads them (procgrab.c 'T').
Sched = tuple[int, int, int, int, list[int], list[int]]
_SCHED = struct.Struct("<iiiiQQI4x")
THREADS_MAX = 256  # threads whose scheduling the grab reads (paths' sched_tids)


@dataclass
class Grabbed:
    """What one grab read. ``fds``: None where the fd table could not be read here."""

    pid: int
    fds: list[FdEntry] | None
    limits: list[tuple[int, int, int]] | None = None  # (errno, soft, hard) by resource number
    files: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    stats: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # (dev, ino, size, mtime_ns)
    # tid -> (policy, rt_priority, nice, ioprio, [robust list head, length], affinity's CPUs): 'T'
    sched: dict[int, Sched] = field(default_factory=dict)
    pipes: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # fd -> (pipe size, buffered bytes)


def paths(pid: int, tids: list[int]) -> tuple[list[str], list[str]]:
    """(files, links) a freeze's collect reads that the batch leaves as they are."""
    p = f"/proc/{pid}"
    names = ("oom_score_adj", "loginuid", "coredump_filter", "personality", "auxv", "cmdline", "environ")
    files = [f"{p}/{n}" for n in names]
    files += [f"{p}/task/{t}/children" for t in tids]
    # The other threads' cloned state (ckpt/proc/threads.py read_cloned): status and loginuid, for
    # up to CLONED_MAX threads (~1.6 KiB each: more would crowd the fds out of the buffer).
    if len(tids) <= CLONED_MAX:
        files += [f"{p}/task/{t}/{n}" for t in tids if t != pid for n in ("status", "loginuid")]
    from ckpt.proc.props import NS_TYPES  # (props imports much; this module is imported early)

    links = [f"{p}/{n}" for n in ("cwd", "exe", "root")] + [f"{p}/ns/{t}" for t in NS_TYPES]
    return files, links


SPLIT = 128  # from this many fds on (counted before the freeze), two threads read the table
PER_FD = 512  # bytes of buffer an fd may need (its record, link and fdinfo: ~200 typically)


def stat_paths(pid: int) -> list[str]:
    """The paths whose stat() the collect takes (take_stat): the executable's file."""
    return [f"/proc/{pid}/exe"]


# The last _ops made, by (pid, tids, part): the freezes of one process (a chain, a migration's
# rounds) grab the same entries each time.
_ops_made: list[tuple[tuple[int, tuple[int, ...], str], tuple[bytes, list[str], list[str]]]] = []


def sched_tids(tids: list[int]) -> list[int]:
    """The threads whose scheduling and robust list the grab reads ('T'): all, up to THREADS_MAX."""
    return list(tids) if len(tids) <= THREADS_MAX else []


def _part(fds: int) -> str:
    return "2,0" if fds >= SPLIT else ""  # (start()'s first share of two, or the whole table)


def prime(pid: int, tids: list[int], fds: int = 0) -> None:
    """start()'s list of what to read made now, before the freeze, for these threads (a new ckpt
    process made it in its first freeze: ~50 us there); the freeze finds it if its threads are
    these."""
    _ops(pid, tids, _part(fds))


def _ops(pid: int, tids: list[int], part: str = "") -> tuple[bytes, list[str], list[str]]:
    key = (pid, tuple(tids), part)
    if _ops_made and _ops_made[0][0] == key:
        return _ops_made[0][1]
    files, links = paths(pid, tids)
    ops = [b"F" + part.encode(), b"P"] + [b"r" + os.fsencode(f) for f in files]
    ops += [b"l" + os.fsencode(x) for x in links]
    ops += [b"s" + os.fsencode(x) for x in stat_paths(pid)]
    ops += [b"T%d" % t for t in sched_tids(tids)]
    made = (b"\0".join(ops) + b"\0\0", files, links)
    _ops_made[:] = [(key, made)]
    return made


def count_fds(pid: int) -> int:
    """How many fds the process has now (before a freeze: how to split the grab), 0 if unknown."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _buffer(size: int) -> ctypes.Array[ctypes.c_char]:
    """A spare buffer of at least ``size`` bytes, or a new one: anonymous memory mapped now, its
    pages first touched by the C thread that writes them (a zeroed create_string_buffer of 1 MiB
    costs the freezing thread ~0.1 ms)."""
    with _lock:
        fits = [(len(b), i) for i, b in enumerate(_spare) if len(b) >= size]
        if fits:  # (the smallest that fits: a scan's larger one stays for the scans)
            return _spare.pop(min(fits)[1])
    return _new_buffer(size)


def _new_buffer(size: int) -> ctypes.Array[ctypes.c_char]:
    return (ctypes.c_char * size).from_buffer(mmap.mmap(-1, size))


def _give_back(buf: ctypes.Array[ctypes.c_char]) -> None:
    with _lock:
        if len(_spare) < 6:
            _spare.append(buf)


def warm(fds: int = 0, scans: bool = False) -> None:
    """Buffers kept for the freeze's grab of a process of ``fds`` fds (count_fds), one for the
    walks made in one call beside it (scans_now, file_start) and, with ``scans``, two for the dirty
    and the hole walks (scans_start's two groups); and the workers their jobs go to (procgrab.c
    ckpt_workers: the grab's one or two, the dirty scans', a small process's smaps): made now, out
    of the freeze, once per ckpt process (a new mapping and its ctypes type in the freeze: ~40 us
    each, where a new `ckpt dump` found none kept)."""
    so = lib()
    if so is not None:
        size = max(CAP, fds * PER_FD // 2 if fds >= SPLIT else fds * PER_FD)
        want = 2 if fds >= SPLIT else 1
        needs = sorted([size] * want + [CAP] + ([SCAN_CAP] * 2 if scans else []), reverse=True)
        with _lock:
            free = sorted(len(b) for b in _spare)
        for need in needs:  # (each matched to the smallest kept one that holds it, or made)
            fit = next((n for n in free if n >= need), None)
            if fit is None:
                _give_back(_new_buffer(need))
            else:
                free.remove(fit)
        so.ckpt_workers(want + 2)


def end_workers() -> int:
    """warm()'s workers ended and joined (a fork server keeps no thread but its own); the next
    warm() makes them again. How many there were."""
    so = lib()
    return 0 if so is None else int(so.ckpt_workers_end())


def _joined(handle: int, buf: ctypes.Array[ctypes.c_char]) -> bytes | None:
    """A job's thread joined (the GIL let go while it waits), the bytes it wrote (None: it failed
    as a whole, e.g. -ENOSPC), its buffer given back for the next job."""
    so = lib()
    assert so is not None
    n = so.ckpt_join(handle)
    try:
        return _written(buf, n)
    finally:
        _give_back(buf)


def _written(buf: ctypes.Array[ctypes.c_char], n: int) -> bytes | None:
    """The ``n`` bytes a job wrote into ``buf`` (None: it failed as a whole, n < 0)."""
    return None if n < 0 else memoryview(buf)[:n].tobytes()


@dataclass
class Pending:
    """A grab running on threads of its own (start); result() is what it read."""

    pid: int
    jobs: list[tuple[int, ctypes.Array[ctypes.c_char]]]  # (handle, buffer): the first reads all
    files: list[str]  # but the table, the others a share of it
    links: list[str]
    sched: list[int] = field(default_factory=list)  # the threads of its 'T' ops, in order

    def result(self) -> Grabbed | None:
        """What the grab read, parsed here; None where it failed as a whole. Once."""
        jobs, self.jobs = self.jobs, []
        if not jobs:
            return None
        raws = [_joined(h, buf) for h, buf in jobs]
        if raws[0] is None:
            return None
        g = _parse(self.pid, raws[0], self.files, self.links, self.sched)
        for raw in raws[1:]:
            part = None if raw is None or g.fds is None else _parse(self.pid, raw, [], [])
            share = None if part is None else part.fds
            g.fds = None if share is None or g.fds is None else g.fds + share
            if part is not None:
                g.pipes.update(part.pipes)
        return g


def start(pid: int, tids: list[int], fds: int = 0) -> Pending | None:
    """The fd table and paths()' entries of a frozen process, read on a thread of procgrab.c's own
    (two for ``fds`` >= SPLIT: count_fds before the freeze) in one call each without the GIL;
    None without the library or a thread. The caller must take result() (it joins them)."""
    so = lib()
    if so is None:
        return None
    parts = 2 if fds >= SPLIT else 1
    size = max(CAP, fds * PER_FD // parts)
    jobs: list[tuple[int, ctypes.Array[ctypes.c_char]]] = []
    ops, files, links = _ops(pid, tids, _part(fds))
    for i in range(parts):
        if i:
            ops = f"F{parts},{i}".encode() + b"\0\0"  # (a share of the table: the files once, in the first)
        buf = _buffer(size)
        h = so.ckpt_grab_start(pid, ops, len(ops), buf, len(buf))
        if not h:
            _give_back(buf)
            Pending(pid, jobs, [], []).result()  # (those started are joined)
            return None
        jobs.append((h, buf))
    return Pending(pid, jobs, files, links, sched_tids(tids))


def _files_at(raw: bytes, at: int, names: list[str]) -> tuple[dict[str, bytes], int]:
    """'r' records from ``at``, one per name: those read (err 0), and where the next record is."""
    out: dict[str, bytes] = {}
    for name in names:
        e, ln = _HDR.unpack_from(raw, at)
        at += 8
        if not e:
            out[name] = raw[at : at + ln]
        at += (ln + 7) & ~7
    return out, at


def _parse(
    pid: int, raw: bytes, files: list[str], links: list[str], sched: list[int] | None = None
) -> Grabbed:
    err, count = _HDR.unpack_from(raw, 0)
    at = 8
    fds: list[FdEntry] | None = []
    pipes: dict[int, tuple[int, bytes]] = {}
    for _ in range(count):
        fd, e, which, ll, il, piped, dev, ino, mode, size, mt, rdev = _FD.unpack_from(raw, at)
        at += _FD.size
        link = os.fsdecode(raw[at : at + ll])
        at += (ll + 7) & ~7
        info = raw[at : at + il]
        at += (il + 7) & ~7
        fds.append(FdEntry(fd, e, which, link, info, dev, ino, mode, size, mt, rdev))  # type: ignore[union-attr]
        if piped:  # (procgrab.c one_pipe: read there once per pipe; an error left to pipes.py)
            perr, psize, n = _PIPE.unpack_from(raw, at)
            at += _PIPE.size
            if not perr:
                pipes[fd] = (psize, raw[at : at + n])
            at += (n + 7) & ~7
    if err:
        fds = None
    out = Grabbed(pid, fds, pipes=pipes)
    if at == len(raw):  # (a share of the table alone: start)
        return out
    _z, n = _HDR.unpack_from(raw, at)
    at += 8
    rows = (_LIMIT.unpack_from(raw, at + 24 * r) for r in range(n))
    out.limits = [(e, soft, hard) for e, _, soft, hard in rows]
    at += 24 * n
    out.files, at = _files_at(raw, at, files)
    got, at = _files_at(raw, at, links)
    out.links = {name: os.fsdecode(data) for name, data in got.items()}
    for name in stat_paths(pid):
        e, _ln = _HDR.unpack_from(raw, at)
        if not e:
            out.stats[name] = _STAT.unpack_from(raw, at + 8)
        at += 8 + _STAT.size
    for tid in sched or ():
        e, ln = _HDR.unpack_from(raw, at)
        if not e:
            policy, prio, nice, ioprio, head, length, nb = _SCHED.unpack_from(raw, at + 8)
            mask = int.from_bytes(raw[at + 8 + _SCHED.size : at + 8 + _SCHED.size + nb], "little")
            cpus = []
            while mask:  # (the set bits alone: 1024 of them to look at otherwise)
                low = mask & -mask
                cpus.append(low.bit_length() - 1)
                mask ^= low
            out.sched[tid] = (policy, prio, nice, ioprio, [head, length], cpus)
        at += 8 + ((ln + 7) & ~7)
    return out


@contextlib.contextmanager
def prefetched(g: Grabbed | None) -> Iterator[None]:
    """take_file and take_link of this thread answer from ``g`` inside the block."""
    old = getattr(_local, "g", None)
    _local.g = g
    try:
        yield
    finally:
        _local.g = old


def take_file(path: str) -> bytes | None:
    """The grabbed bytes of ``path`` (once), or None: read it."""
    g = getattr(_local, "g", None)
    return None if g is None else g.files.pop(path, None)


def take_sched(tid: int) -> Sched | None:
    """The grabbed scheduling and robust list of thread ``tid`` (once), or None: ask them."""
    g = getattr(_local, "g", None)
    return None if g is None else g.sched.pop(tid, None)


def take_stat(path: str) -> tuple[int, int, int, int] | None:
    """The grabbed stat() of ``path`` (once) as (dev, ino, size, mtime_ns), or None: stat it."""
    g = getattr(_local, "g", None)
    return None if g is None else g.stats.pop(path, None)


def take_table(pid: int) -> list[FdEntry] | None:
    """The grabbed fd table of ``pid`` (once), or None: list_fds reads it."""
    g = getattr(_local, "g", None)
    if g is None or g.pid != pid:
        return None
    out, g.fds = g.fds, None
    return out


def grabbed(p: Pending | None) -> Grabbed | None:
    """What the grab ``p`` read (its threads joined), or None: none started, or it failed."""
    if p is None:
        return None
    try:
        return p.result()
    except Exception:  # (what it did not read is read by the collect)
        return None


def take_limits(pid: int) -> list[tuple[int, int, int]] | None:
    """The grabbed prlimit answers of ``pid`` (once), or None: ask them."""
    g = getattr(_local, "g", None)
    if g is None or g.pid != pid:
        return None
    out, g.limits = g.limits, None
    return out


def take_pipe(pid: int, fds: list[int]) -> tuple[int, bytes] | None:
    """The size and buffered bytes of the pipe behind one of ``fds`` of ``pid`` (each an fd of
    one pipe), as the grab read them (procgrab.c one_pipe), or None: read it."""
    g = getattr(_local, "g", None)
    if g is None or g.pid != pid:
        return None
    for fd in fds:
        got = g.pipes.get(fd)
        if got is not None:
            return got
    return None


def take_link(path: str) -> str | None:
    """The grabbed text of the link ``path`` (once), or None: read it."""
    g = getattr(_local, "g", None)
    return None if g is None else g.links.pop(path, None)


@dataclass
class PendingFile:
    """One file read whole on a thread of procgrab.c's own (file_start); result() is its bytes."""

    handle: int | None
    buf: ctypes.Array[ctypes.c_char]

    def result(self) -> bytes | None:
        """The file's bytes, or None where it could not be read there (an error, or larger than
        the buffer): then read it as before. Once; the thread is joined whatever happens."""
        h, self.handle = self.handle, None
        if h is None:
            return None
        raw = _joined(h, self.buf)
        return None if raw is None else _files_at(raw, 0, [""])[0].get("")


def file_start(path: str) -> PendingFile | None:
    """``path`` read whole now on a thread of its own, without the GIL (a frozen small process's
    smaps: the kernel's walk of its page tables, ~0.3-0.6 ms, beside the collect); None without the
    library or a thread. The caller must take result() (it joins the thread)."""
    so = lib()
    if so is None:
        return None
    ops = b"r" + os.fsencode(path) + b"\0\0"
    buf = _buffer(CAP)
    h = so.ckpt_grab_start(0, ops, len(ops), buf, len(buf))
    if not h:
        _give_back(buf)
        return None
    return PendingFile(h, buf)


# PAGEMAP_SCAN walks on a thread of procgrab.c's own (ckpt_scans): an incremental's dirty and hole
# scans beside the collect (ckpt/track/uffdwp.py scan_dirty_native). Each walk as
# ckpt/memory.py PagemapScanner.raw gives it: each call's rows and their floor.
ScanSpec = tuple[int, int, dict[str, int]]  # start, end, PagemapScanner.raw's keywords
SCAN_CAP = 4 << 20  # a walk's rows past this: the scans are made again in Python


def _spec_rows(specs: list[ScanSpec]) -> ctypes.Array[ctypes.c_uint64]:
    """The walks as procgrab.c's ckpt_scans reads them: seven u64 each (_spec_row)."""
    return vector(ctypes.c_uint64, [x for sp in specs for x in _spec_row(sp)])  # (its type made once)


def _spec_row(spec: ScanSpec) -> list[int]:
    start, end, kw = spec
    mask, anyof = kw.get("category_mask", 0), kw.get("category_anyof_mask", 0)
    rmask = kw.get("return_mask")
    return [
        start,
        end,
        kw.get("flags", 0),
        kw.get("category_inverted", 0),
        mask,
        anyof,
        mask | anyof if rmask is None else rmask,
    ]


@dataclass
class PendingScans:
    """Walks running on a thread of their own (scans_start); result() is what each gave. With
    ``then`` (a second group of walks, its buffer: scans_start's ``split``), that group is made
    by the thread after its own walks or by result() if the thread has not begun it yet."""

    pid: int
    fd: int
    handle: int | None
    buf: ctypes.Array[ctypes.c_char]
    specs: list[ScanSpec]
    then: tuple[ctypes.Array[ctypes.c_char], list[ScanSpec]] | None = None

    def result(self) -> list[list[tuple[bytes, int]]]:
        """Per walk, the RawScan (PagemapScanner.raw's). A walk that ran out of room goes on in
        Python where it stopped (its calls so far kept: a WP_MATCHING walk re-armed what they
        report), and the walks after it in its group are made in Python. A failed walk raises as
        PagemapScanner's would. Once; the thread is joined and the pagemap fd closed whatever
        happens."""
        h, self.handle = self.handle, None
        assert h is not None, "PendingScans.result() taken twice"
        if self.then is None:
            try:
                raw = _joined(h, self.buf) or b""
            finally:
                os.close(self.fd)
            return _scans_of(self.pid, raw, self.specs)
        buf2, specs2 = self.then
        so = lib()
        assert so is not None
        got2 = ctypes.c_int64(-1)
        try:
            n = so.ckpt_scans_pair_join(h, ctypes.byref(got2))  # (the GIL let go: ctypes)
            raw, raw2 = _written(self.buf, n) or b"", _written(buf2, got2.value) or b""
        finally:
            _give_back(self.buf)
            _give_back(buf2)
            os.close(self.fd)
        return _scans_of(self.pid, raw, self.specs) + _scans_of(self.pid, raw2, specs2)


def _scans_of(pid: int, raw: bytes, specs: list[ScanSpec]) -> list[list[tuple[bytes, int]]]:
    from ckpt.errors import TargetExited
    from ckpt.memory import PagemapScanner  # (memory imports numpy's proxy; this module is early)

    out: list[list[tuple[bytes, int]]] = []
    at = 0
    for start, end, kw in specs:
        if at == len(raw):  # (not reached: an earlier walk ran out of room)
            with PagemapScanner(pid) as sc:
                out.append(sc.raw(start, end, **kw))
            continue
        err, calls, resume, floor = struct.unpack_from("<qQQQ", raw, at)
        at += 32
        walk = []
        for _ in range(calls):
            n, fl = struct.unpack_from("<QQ", raw, at)
            at += 16
            walk.append((raw[at : at + 24 * n], fl))
            at += 24 * n
        if err == errno.ENOSPC:  # go on where it stopped, its floor raised to there
            with PagemapScanner(pid) as sc:
                walk += [(b, max(f, floor)) for b, f in sc.raw(resume, end, **kw)]
        elif err == errno.ESRCH:
            raise TargetExited(f"process {pid} exited")
        elif err:
            raise OSError(err, f"PAGEMAP_SCAN on pid {pid} [{start:#x}, {end:#x}): {os.strerror(err)}")
        out.append(walk)
    return out


def scans_now(pid: int, fd: int, specs: list[ScanSpec]) -> list[list[tuple[bytes, int]]] | None:
    """The walks made now, in the calling thread, by one call of procgrab.c (ckpt_scans, the GIL let
    go) on the open pagemap ``fd``: walks of small spans far apart (memory.present_in) cost ~9 us
    each made one by one from Python, ~6 here (in a loop on a frozen target; most of it the ioctl's
    own set-up). As PendingScans.result
    answers (a walk that ran out of room goes on in Python); None without the library."""
    so = lib()
    if so is None:
        return None
    rows = _spec_rows(specs)
    buf = _buffer(CAP)
    try:
        n = so.ckpt_scans(fd, rows, len(specs), buf, len(buf))
        raw = memoryview(buf)[:n].tobytes() if n > 0 else b""
    finally:
        _give_back(buf)
    return _scans_of(pid, raw, specs)


@dataclass
class ReadyScans:
    """scans_start's set-up made ahead (scans_ready): the pagemap open, the walks' rows and their
    buffers. go() starts them (once); close() gives back what go() did not take."""

    pid: int
    fd: int
    specs: list[ScanSpec]
    split: int  # (scans_start's)
    rows: list[ctypes.Array[ctypes.c_uint64]]  # per group
    bufs: list[ctypes.Array[ctypes.c_char]]
    taken: bool = False

    def go(self) -> PendingScans | None:
        """The walks started now, as scans_start's; None without a thread (nothing started)."""
        so = lib()
        assert so is not None and not self.taken
        self.taken = True
        first, then = self.specs[: self.split], self.specs[self.split :]
        buf = self.bufs[0]
        if len(self.bufs) == 1:
            h = so.ckpt_scans_start(self.fd, self.rows[0], len(first), buf, len(buf))
        else:
            buf2 = self.bufs[1]
            h = so.ckpt_scans_pair_start(
                self.fd, self.rows[0], len(first), buf, len(buf), self.rows[1], len(then), buf2, len(buf2)
            )
        if not h:
            self.taken = False
            self.close()
            return None
        pair = (self.bufs[1], then) if len(self.bufs) > 1 else None
        return PendingScans(self.pid, self.fd, h, buf, first, pair)

    def close(self) -> None:
        if not self.taken:
            self.taken = True
            for b in self.bufs:
                _give_back(b)
            os.close(self.fd)


def scans_ready(pid: int, specs: list[ScanSpec], split: int = 0) -> ReadyScans | None:
    """scans_start's set-up alone (~30 us: a freeze makes it while its batch runs, so that the walks
    start at once when it ends); None without the library."""
    if lib() is None:
        return None
    from ckpt.memory import open_pagemap  # (memory imports numpy's proxy; this module is early)

    groups = [specs[:split], specs[split:]] if 0 < split < len(specs) else [specs]
    fd = open_pagemap(pid)
    bufs: list[ctypes.Array[ctypes.c_char]] = []
    try:
        rows = [_spec_rows(g) for g in groups]
        for _ in groups:
            bufs.append(_buffer(SCAN_CAP))
        return ReadyScans(pid, fd, specs, split if len(groups) > 1 else len(specs), rows, bufs)
    except BaseException:
        for b in bufs:
            _give_back(b)
        os.close(fd)
        raise


def scans_start(pid: int, specs: list[ScanSpec], split: int = 0) -> PendingScans | None:
    """The walks, one after the other, on a thread of their own, now; None without the library or
    a thread (then nothing was started). ``split``: the walks from that index on are a second
    group, with a buffer of its own, made by that thread after the first group or by result(),
    whichever comes to them first (procgrab.c ckpt_scans_pair_start): a freezing thread that has
    nothing left to do but wait for the walks makes the second group itself."""
    ready = scans_ready(pid, specs, split)
    return None if ready is None else ready.go()
