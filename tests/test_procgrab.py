"""ckpt/proc/grab: a frozen target's fd table and /proc files read in C beside the injected batch.

What it reads must be what the collect would have read itself: the same fd records and fdinfo
texts, the same bytes of each file, the same links and limits; and a dump that uses it must store
the same records as one that does not.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import dump, untrack
from ckpt.image import Layer
from ckpt.proc import grab as procgrab
from ckpt.proc.fds import list_fds
from ckpt.proc.grab import FdEntry
from ckpt.proc.pipes import read_pipes
from tests.util import Target

KINDS = "pipe,bigpipe,fifo,follow,eventfd,timerfd,signalfd,epoll,socket,inotify"


@pytest.fixture
def native() -> Iterator[None]:
    """The library loaded afresh; the test fails where setup.sh could have built it and did not."""
    procgrab.reset(True)
    if procgrab.lib() is None:
        if shutil.which("gcc"):
            pytest.fail("ckpt/proc/_procgrab.so is not built or not usable: run scripts/setup.sh")
        pytest.skip("no gcc: the collect reads everything itself")
    yield
    procgrab.reset(True)


def _grab(pid: int) -> procgrab.Grabbed | None:
    p = procgrab.start(pid, [pid])
    assert p is not None
    return p.result()


@pytest.fixture
def kinds(spawn: Callable[..., Target], tmp_path: Path) -> Target:
    os.mkfifo(tmp_path / "fifo")
    t = spawn("fdkinds", KINDS, str(tmp_path), stderr=subprocess.DEVNULL)
    assert t.cmd("check") == "ok"
    return t


def test_the_fd_table_is_list_fds_own(native: None, kinds: Target) -> None:
    """Every kind of fd (pipes, a FIFO, a dup of a terminal, eventfd, timerfd, signalfd, epoll,
    socketpairs, inotify), the target blocked in read(): the records and fdinfo texts from the
    grabbed table equal list_fds' own, field for field (a timerfd's time left aside)."""
    pid = kinds.pid
    g = _grab(pid)
    assert g is not None and g.fds is not None
    texts_a: dict[int, str] = {}
    texts_b: dict[int, str] = {}
    a = list_fds(pid, texts_a, g.fds)
    b = list_fds(pid, texts_b)
    assert [f.fd for f in a] == [f.fd for f in b] == sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    assert len(a) >= 25
    for x, y in zip(a, b, strict=True):
        assert vars(x) == vars(y), x.fd
        if not texts_a[x.fd].count("it_value"):  # (a timerfd's fdinfo counts down between reads)
            assert texts_a[x.fd] == texts_b[x.fd], x.fd
    assert {f.kind for f in a} >= {"pipe", "fifo", "anon", "socket"}


def test_pipes_are_read_as_pipes_py_reads_them(native: None, kinds: Target) -> None:
    """Every pipe's size and buffered bytes as read_pipes reads them itself: the grab read the small
    ones once each (5000 bytes, an empty one, 1 byte, the FIFO's 100 through its read end), left the
    full 1 MiB pipe to read_pipes, and took none of the bytes from the target."""
    pid = kinds.pid
    g = _grab(pid)
    assert g is not None and g.fds is not None
    fds = list_fds(pid)
    grabbed = dict(g.pipes)
    with procgrab.prefetched(g):
        a = read_pipes(pid, fds)
    b = read_pipes(pid, fds)
    assert a == b
    sizes = sorted(len(r["data"]) for r in a)  # type: ignore[arg-type]
    assert sizes[-4:] == [1, 100, 5000, 1 << 20] and not any(sizes[:-4])  # (and the stdin, stdout pipes)
    # One fd of each pipe (the first of a pipe's fds met), all of them but the full one.
    assert sorted(len(data) for _, data in grabbed.values()) == sizes[:-1]
    assert not {60, 61} & set(grabbed)
    assert kinds.cmd("check") == "ok"  # (every byte still in its pipe)


def test_files_links_and_limits_are_the_kernels(native: None, kinds: Target) -> None:
    pid = kinds.pid
    g = _grab(pid)
    assert g is not None
    files, links = procgrab.paths(pid, [pid])
    assert set(g.files) == set(files)  # every one of them readable here
    for p in files:
        with open(p, "rb") as f:
            assert g.files[p] == f.read(), p
    assert set(g.links) == set(links) - {p for p in links if not os.path.lexists(p)}
    for p, text in g.links.items():
        assert text == os.readlink(p), p
    assert g.limits is not None and len(g.limits) == 16
    for r, (e, soft, hard) in enumerate(g.limits):
        assert e == 0
        assert (soft, hard) == tuple(v & (2**64 - 1) for v in resource.prlimit(pid, r))
    # The executable's stat() through the magic link (dump.py's exe_file), the kernel's own.
    exe = f"/proc/{pid}/exe"
    st = os.stat(exe)
    assert g.stats == {exe: (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)}
    with procgrab.prefetched(g):
        assert procgrab.take_stat(exe) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        assert procgrab.take_stat(exe) is None  # once


def test_taken_once_and_only_inside_the_block(native: None, kinds: Target) -> None:
    """A grabbed file answers one read in the block; a second read, or one outside, is the kernel's."""
    pid = kinds.pid
    g = _grab(pid)
    assert g is not None
    path = f"/proc/{pid}/cmdline"
    g.files[path] = b"grabbed"  # (marked, to tell the two answers apart)
    assert procgrab.take_file(path) is None
    with procgrab.prefetched(g):
        assert procgrab.take_file(path) == b"grabbed"
        assert procgrab.take_file(path) is None
        assert procgrab.take_limits(pid + 1) is None  # another process's limits are never these
        assert procgrab.take_limits(pid) is not None
        assert procgrab.take_limits(pid) is None
    assert procgrab.take_link(f"/proc/{pid}/cwd") is None


def test_a_buffer_too_small_is_refused_not_cut(native: None, kinds: Target) -> None:
    """The C side never writes past its buffer: too small a one is -ENOSPC (the collect then reads
    everything itself), whatever the size."""
    so = procgrab.lib()
    assert so is not None
    ops, _, _ = procgrab._ops(kinds.pid, [kinds.pid])
    full = ctypes.create_string_buffer(procgrab.CAP)
    need = so.ckpt_grab(kinds.pid, ops, full, procgrab.CAP)
    assert need > 0
    for cap in (0, 8, 64, need // 2, need - 1):
        buf = ctypes.create_string_buffer(cap + 64)
        ctypes.memset(ctypes.addressof(buf) + cap, 0xA5, 64)
        assert so.ckpt_grab(kinds.pid, ops, buf, cap) == -errno.ENOSPC, cap
        assert buf.raw[cap:] == b"\xa5" * 64  # nothing written past cap
    buf = ctypes.create_string_buffer(need)
    assert so.ckpt_grab(kinds.pid, ops, buf, need) == need


def test_a_big_table_is_read_in_two_halves(native: None) -> None:
    """From SPLIT fds on two threads read the table, each the fds of one parity: together the
    same table as list_fds' own, no fd twice."""
    n = 3 * procgrab.SPLIT
    src = (
        "import os, sys\n"
        f"fds = [os.open('/dev/null', os.O_RDONLY) for _ in range({n})]\n"
        "print('ready', flush=True)\nsys.stdin.read()"
    )
    p = subprocess.Popen([sys.executable, "-c", src], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline().startswith(b"ready")
        count = procgrab.count_fds(p.pid)
        assert count >= n
        pending = procgrab.start(p.pid, [p.pid], count)
        assert pending is not None and len(pending.jobs) == 2
        g = pending.result()
        assert g is not None and g.fds is not None and g.limits is not None and g.files
        assert len({e.fd for e in g.fds}) == len(g.fds) == count
        texts_a: dict[int, str] = {}
        texts_b: dict[int, str] = {}
        a = list_fds(p.pid, texts_a, g.fds)
        b = list_fds(p.pid, texts_b)
        assert [vars(x) for x in a] == [vars(y) for y in b]
        assert texts_a == texts_b
        assert pending.result() is None  # (joined once)
    finally:
        p.kill()
        p.wait()


def test_a_failed_entry_fails_as_the_call_would() -> None:
    """An entry whose fd was closed between the listing and its reads is left out, as list_fds
    leaves it; any other failure is the OSError that call raises, naming its path."""
    ok = FdEntry(3, 0, 0, "/dev/null", b"pos:\t0\nflags:\t02\nmnt_id:\t1\n", 5, 6, 0o20666, 0, 0, 0x103)
    gone = FdEntry(4, errno.ENOENT, 1, "/x", b"", 0, 0, 0, 0, 0, 0)
    assert [f.fd for f in list_fds(1, {}, [gone, ok])] == [3]
    denied = FdEntry(7, errno.EACCES, 1, "/x", b"", 0, 0, 0, 0, 0, 0)
    with pytest.raises(PermissionError, match="/proc/1/fdinfo/7"):
        list_fds(1, {}, [ok, denied])
    esrch = FdEntry(8, errno.ESRCH, 0, "", b"", 0, 0, 0, 0, 0, 0)
    with pytest.raises(ProcessLookupError, match="/proc/1/fd/8"):
        list_fds(1, {}, [esrch])


@pytest.fixture
def used(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each dump's grab started (procgrab.start, the real one, recorded)."""
    out: list[bool] = []
    start = procgrab.start

    def counted(pid: int, tids: list[int], fds: int = 0) -> procgrab.Pending | None:
        p = start(pid, tids, fds)
        out.append(p is not None)
        return p

    monkeypatch.setattr(procgrab, "start", counted)
    return out


def _records(d: Path) -> dict[str, Any]:
    with Layer.open(sorted(d.glob("layer-*.ckpt"))[-1]) as layer:
        m = layer.meta.to_dict()
    props = m["props"] or {}
    keep = ("oom_score_adj", "loginuid", "coredump_filter", "namespaces")
    # (a timerfd's and others' positions aside: fdinfo's pos of a file is compared)
    fds = [{k: v for k, v in f.items() if k != "pos" or f.get("kind") == "file"} for f in m["fds"]]
    kept = {k: props.get(k) for k in keep}
    return {"fds": fds, "mm": m["mm"], "task": m["task"], "props": kept, "pipes": m["pipes"]}


@pytest.mark.parametrize("track", ["uffd-wp", "none"])
def test_a_full_dump_stores_the_same_records_either_way(
    native: None, kinds: Target, tmp_path: Path, used: list[bool], track: str
) -> None:
    """Full dumps, the grab used and not (after the arming, with uffd-wp: the tracker's fd is not
    among the fds either way, and no fd of its injection's shows)."""
    top = tmp_path / "dumps"  # (not in the target's DIR: its inotify watches DIR/b)
    dump(kinds.pid, top / "a", track=track)
    assert used == [True]
    a = _records(top / "a")
    if track == "uffd-wp":
        assert untrack(kinds.pid)  # (a second chain would find the mappings held by the first's)
    procgrab.reset(False)
    dump(kinds.pid, top / "b", track=track)
    b = _records(top / "b")
    assert a == b
    assert not any("userfaultfd" in str(f.get("path")) for f in a["fds"])
    assert kinds.cmd("check") == "ok"


def test_an_incremental_dump_stores_the_same_records_either_way(
    native: None, kinds: Target, tmp_path: Path, used: list[bool]
) -> None:
    """Incremental uffd-wp dumps of the same idle process, the grab used and not: fd records, mm
    fields (cmdline, environ, auxv, cwd, exe, root), the task (limits, personality, children) and
    the props read from /proc are equal; and the grab was used."""
    d = tmp_path / "dumps" / "chain"
    dump(kinds.pid, d, track="uffd-wp")
    dump(kinds.pid, d, incremental=True, track="uffd-wp")
    assert used == [True, True]  # (the full dump's after its arming)
    a = _records(d)
    procgrab.reset(False)
    dump(kinds.pid, d, incremental=True, track="uffd-wp")
    assert used == [True, True, False]
    b = _records(d)
    assert a == b
    assert a["mm"]["cmdline"] and a["mm"]["environ"] and a["mm"]["auxv"] and a["mm"]["cwd"]
    assert len(a["fds"]) >= 25
    assert kinds.cmd("check") == "ok"


def test_a_small_process_walks_read_beside_are_the_kernels(
    native: None, kinds: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small process's smaps, read on a thread of C's own while frozen (PageTableReads with
    background False), gives the VmFlags and guard regions Python's own read gives; where the
    buffer is too small for it, or the library is not there, Python reads it (the same answer)."""
    from ckpt.proc.maps import read_maps
    from ckpt.proc.props import PageTableReads, read_guards, read_vmflags
    from ckpt.ptrace.freeze import Frozen

    with Frozen(kinds.pid) as fz:
        fz.freeze()
        vmas = read_maps(kinds.pid)
        flags = read_vmflags(kinds.pid)
        want = (flags, read_guards(kinds.pid, vmas, flags))
        pt = PageTableReads(kinds.pid, background=False, vmas=vmas)
        pt.begin()
        assert pt._smaps is not None  # (read in C)
        assert pt.result() == want
        monkeypatch.setattr(procgrab, "CAP", 64)  # (a smaps larger than the buffer)
        procgrab._spare.clear()
        pt = PageTableReads(kinds.pid, background=False, vmas=vmas)
        pt.begin()
        assert pt.result() == want
        monkeypatch.undo()
        procgrab._spare.clear()
        dropped = PageTableReads(kinds.pid, background=False, vmas=vmas)  # (joined when dropped)
        dropped.begin()
        del dropped
        procgrab.reset(False)
        pt = PageTableReads(kinds.pid, background=False, vmas=vmas)
        pt.begin()
        assert pt._smaps is None and pt.result() == want
    assert kinds.cmd("check") == "ok"


def test_jobs_go_to_the_workers_and_beyond(native: None, kinds: Target) -> None:
    """Jobs handed to the workers made before a freeze (procgrab.c ckpt_workers), more jobs at
    once than there are workers (the rest get threads of their own), joined in any order: every
    one reads what a grab of its own reads; and the workers are reused."""
    so = procgrab.lib()
    assert so is not None
    procgrab.warm()
    n = so.ckpt_workers(0)  # (asks for none: how many there are)
    assert n >= 3
    want = _grab(kinds.pid)
    assert want is not None and want.fds
    for _ in range(3):
        pending = [procgrab.start(kinds.pid, [kinds.pid]) for _ in range(n + 2)]
        smaps = [procgrab.file_start(f"/proc/{kinds.pid}/maps") for _ in range(2)]
        for p in reversed(pending):
            assert p is not None
            got = p.result()
            assert got is not None and [e.fd for e in got.fds or []] == [e.fd for e in want.fds]
        for f in smaps:
            assert f is not None and f.result() == Path(f"/proc/{kinds.pid}/maps").read_bytes()
    assert so.ckpt_workers(0) == n
    # Ended and joined (a fork server keeps no thread but its own), made again by the next warm().
    before = set(os.listdir("/proc/self/task"))
    assert procgrab.end_workers() == n
    assert so.ckpt_workers(0) == 0
    gone = before - set(os.listdir("/proc/self/task"))
    assert len(gone) == n
    p = procgrab.start(kinds.pid, [kinds.pid])  # (a thread of its own)
    assert p is not None and p.result() is not None
    procgrab.warm()
    assert so.ckpt_workers(0) == n


def test_a_forked_child_makes_its_own_workers(native: None, kinds: Target) -> None:
    """A fork of ckpt (a service's worker) has none of its parent's worker threads: its jobs get
    workers of its own, or threads, and never wait on a thread that is not there."""
    procgrab.warm()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one byte, whether its grabs came back
        try:
            ok = all((p := procgrab.start(kinds.pid, [kinds.pid])) and p.result() for _ in range(3))
            procgrab.warm()
            ok = ok and all((p := procgrab.start(kinds.pid, [kinds.pid])) and p.result() for _ in range(3))
            os.write(w, b"y" if ok else b"n")
        finally:
            os._exit(0)
    os.close(w)
    ready: list[int] = []
    try:
        ready, _, _ = select.select([r], [], [], 30)
        assert ready, "the forked child's grab did not come back"
        assert os.read(r, 1) == b"y"
    finally:
        os.close(r)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_the_threads_cloned_state_is_grabbed_and_stored_the_same(
    native: None,
    spawn: Callable[..., Target],
    tmp_path: Path,
    used: list[bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other threads' status and loginuid (proc/threads.py read_cloned) come from the grab: its
    bytes are the kernel's, and a dump stores the same threads' records with the grab and without
    (a thread with its own no_new_privs named in both). With the grab, their parse and compare with
    the main thread's wait for the thaw (proc/threads.py take_cloned, Props.finish)."""
    t = spawn("threads", "3", "nnp", stderr=subprocess.DEVNULL)
    assert t.cmd("waiting") == "waiting" and t.cmd("check") == "ok" and t.cmd("waiting") == "waiting"
    tids = sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
    files, _ = procgrab.paths(t.pid, tids)
    want = [f"/proc/{t.pid}/task/{x}/{n}" for x in tids if x != t.pid for n in ("status", "loginuid")]
    assert set(want) <= set(files)
    from ckpt.ptrace import Frozen

    with Frozen(t.pid) as f:
        p = procgrab.start(t.pid, list(f.tids))
        assert p is not None
        g = p.result()
        assert g is not None
        for path in want:
            with open(path, "rb") as fh:
                assert g.files[path] == fh.read(), path

    def threads(d: Path) -> list[tuple[int, list[str]]]:
        with Layer.open(sorted(d.glob("layer-*.ckpt"))[-1]) as layer:
            return [(x.tid, x.props.own if x.props else []) for x in layer.meta.threads]

    from ckpt.proc import procfs

    taken: list[str] = []
    take = procfs.take_file

    def noted(path: str) -> bytes | None:
        got = take(path)
        if got is not None:
            taken.append(path)
        return got

    import importlib

    dump_mod = importlib.import_module("ckpt.dump")  # (ckpt.dump, the name, is the function)
    read = dump_mod.read_cloned
    parsed: list[int] = []  # (read_cloned's calls: the texts read and parsed in the freeze)

    def counted(pid: int, tids: list[int]) -> Any:
        parsed.append(len(tids))
        return read(pid, tids)

    monkeypatch.setattr(procfs, "take_file", noted)
    monkeypatch.setattr(dump_mod, "read_cloned", counted)
    dump(t.pid, tmp_path / "a", track="none")
    assert set(want) <= set(taken)  # (none read again by the collect)
    assert parsed == []  # (the grab's bytes parsed after the thaw: props.read_props' cloned_raw)
    procgrab.reset(False)
    dump(t.pid, tmp_path / "b", track="none")
    assert used[-2:] == [True, False]
    assert parsed == [len(tids) - 1]  # (without the grab: read and parsed in the freeze, as before)
    a, b = threads(tmp_path / "a"), threads(tmp_path / "b")
    assert a == b and any(own == ["no_new_privs"] for _, own in a), a
    assert t.cmd("check") == "ok"


def test_the_threads_scheduling_is_grabbed_as_props_reads_it(
    native: None, spawn: Callable[..., Target], tmp_path: Path, used: list[bool]
) -> None:
    """Each thread's policy, priority, nice, I/O priority, robust list and affinity (procgrab.c 'T',
    props._thread_props' syscalls) as Python's own calls answer them (tests/targets/threads.c gives
    its workers their own: SCHED_FIFO 1, SCHED_BATCH, nice i % 5, CPU i % ncpu); and a dump records
    the same threads' props with the grab and without."""
    from ckpt.proc import props
    from ckpt.ptrace import Frozen

    t = spawn("threads", "3", stderr=subprocess.DEVNULL)
    assert t.cmd("waiting") == "waiting" and t.cmd("check") == "ok" and t.cmd("waiting") == "waiting"
    tids = sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
    with Frozen(t.pid) as f:
        p = procgrab.start(t.pid, list(f.tids))
        assert p is not None
        g = p.result()
        assert g is not None and set(g.sched) == set(tids)
        for tid in tids:
            ioprio = props._libc.syscall(props.IOPRIO_GET, props.IOPRIO_WHO_PROCESS, tid)
            want = (
                os.sched_getscheduler(tid),
                os.sched_getparam(tid).sched_priority,
                os.getpriority(os.PRIO_PROCESS, tid),
                ioprio,
                props._robust_list(tid),
                sorted(os.sched_getaffinity(tid)),
            )
            assert g.sched[tid] == want, tid
    kinds = {
        (p, rt, nice, cpus[0] if len(cpus) == 1 else None) for p, rt, nice, _, _, cpus in g.sched.values()
    }
    assert (os.SCHED_FIFO, 1, 0, 0) in kinds and any(p == os.SCHED_BATCH and n for p, _, n, _ in kinds), kinds

    def threads(d: Path) -> list[Any]:
        with Layer.open(sorted(d.glob("layer-*.ckpt"))[-1]) as layer:
            return [(x.tid, x.props.to_dict() if x.props else None) for x in layer.meta.threads]

    dump(t.pid, tmp_path / "a", track="none")
    procgrab.reset(False)
    dump(t.pid, tmp_path / "b", track="none")
    assert used[-2:] == [True, False]
    assert threads(tmp_path / "a") == threads(tmp_path / "b")
    assert t.cmd("check") == "ok"


@pytest.mark.parametrize("workers", [True, False], ids=["worker", "thread"])
def test_scans_in_two_groups_are_the_kernels_whoever_makes_the_second(native: None, workers: bool) -> None:
    """scans_start(split=): the first group of walks on the job's thread, the second made by that
    thread after them or by result(), whichever comes first (procgrab.c ckpt_scans_pair_start).
    Whoever made it, each walk's rows are PagemapScanner.raw's for the same arguments: read-only
    walks (present pages, holes) of this process's 64 MiB mapping, touched in a pattern, joined at
    once (the caller most likely makes the second group) and after a walk of the same size in
    Python (the thread most likely has); on a worker and on a thread of its own."""
    import mmap

    from ckpt.memory import PAGE_IS_PRESENT, PagemapScanner

    if not workers:
        procgrab.end_workers()
    size = 64 << 20
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for off in range(0, size, 4096 * 3):  # every third page touched: many rows
            m[off] = 1
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        pid = os.getpid()
        present = {"category_mask": PAGE_IS_PRESENT, "return_mask": PAGE_IS_PRESENT}
        holes = {
            "category_inverted": PAGE_IS_PRESENT,
            "category_mask": PAGE_IS_PRESENT,
            "return_mask": PAGE_IS_PRESENT,
        }
        half = base + size // 2
        specs: list[procgrab.ScanSpec] = [
            (base, half, dict(present)),
            (half, base + size, dict(present)),
            (base, base + size, dict(holes)),
            (base, half, dict(holes)),
        ]
        with PagemapScanner(pid) as sc:
            want = [sc.raw(a, b, **kw) for a, b, kw in specs]
        for later in (False, True, False, True):
            pending = procgrab.scans_start(pid, specs, 2)
            assert pending is not None and pending.then is not None
            if later:
                with PagemapScanner(pid) as sc:
                    sc.raw(base, base + size, **present)
            assert pending.result() == want
    finally:
        m.close()
        procgrab.warm()
