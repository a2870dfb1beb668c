"""The cheap rounds of a migration (issue 10, round 3): the page table a source keeps round by
round, the smaps walk a pre-dump reuses while the mappings stay the same, the copy buffer kept
from round to round, and the VmFlags the destination's warm helper sets before the final freeze.

Real processes throughout: pre-dumps and the final dump of C targets, a warm restore that builds a
real process, madvise() injected into the target with ptrace where a test needs the flags to change."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ckpt import sysno as nr
from ckpt.bufpool import BufferPool
from ckpt.dump import dump
from ckpt.image import Layer, MergedView
from ckpt.migrate.chaintable import ChainTable
from ckpt.migrate.warm import WarmRestore
from ckpt.proc.props import read_vmflags
from ckpt.proc.ptcache import PageTablesCache
from ckpt.ptrace import Frozen, deferred_signals
from ckpt.restore.plan import IGNORED_VMFLAGS
from tests.util import Target

MADV_DONTFORK = 10
MADV_WIPEONFORK = 18
PAGE = 4096


def _advise(pid: int, addr: int, size: int, advice: int) -> None:
    """madvise() run by the target itself (injected with ptrace): flags that show only in smaps."""
    with deferred_signals(), Frozen(pid) as fz:
        assert fz.syscall(nr.MADVISE, addr, size, advice) == 0


def _tables_equal(a: object, b: object) -> None:
    for k in ("addr", "state", "layer", "index", "digest"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k


def test_rounds_as_the_source_runs_them(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """Pre-dumps stacked the way `ckpt migrate` stacks them (the parent's table advanced round by
    round, smaps' walk reused, one copy buffer), the heap grown between two rounds, then the final
    dump leaving the process stopped: each table equals the one built from the whole chain, the walk
    is reused exactly while the mappings stay the same, and the merged view of the chain holds the
    process's memory at the final freeze, page for page."""
    t = spawn("rounds", "1024")
    info = t.info()
    d = tmp_path / "d"
    ctab, walks, pool = ChainTable(), PageTablesCache(), BufferPool()
    below: MergedView | None = None
    prev_below: MergedView | None = None
    table = None
    views: list[MergedView] = []
    try:
        for i in range(5):
            if i == 3:
                t.cmd("grow 65536")  # the mappings change: the walk is read again, the table rebuilt
            hits = walks.hits
            r = dump(t.pid, d, incremental=i > 0, pre_dump=True, parent_below=prev_below,
                     parent_table=table, walks_cache=walks, buffer_pool=pool)  # fmt: skip
            assert walks.hits == hits + (1 if i in (1, 2, 4) else 0), i
            prev_below, below = below, MergedView(Layer.open(r.layer), below=below)
            views.append(below)
            table = ctab.add(below)
            _tables_equal(table, below.page_table())
            t.cmd("round")
        r = dump(t.pid, d, incremental=True, leave_stopped=True, parent_below=prev_below,
                 parent_table=table, buffer_pool=pool)  # fmt: skip
        assert t.stopped_state() == "T"
        with MergedView(Layer.open(r.layer)) as view:
            assert view.read(info["region"], 1024 * PAGE) == t.read_mem(info["region"], 1024 * PAGE)
            heap = info["brk"]
            assert view.read(heap, 65536) == t.read_mem(heap, 65536)
            # The final layer read smaps frozen: its flags are the process's own now.
            want = {s: f for s, f in read_vmflags(t.pid).items()}
            got = {v.start: v.flags for v in view.top.meta.vmas if v.flags is not None}
            assert got == {s: want[s] for s in got}
    finally:
        pool.close()
        for v in views:
            v.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(t.pid, signal.SIGCONT)


@pytest.fixture
def our_stdin() -> Iterator[None]:
    """A copy restored in this process is our child with our stdin: a pipe kept open, so that it
    waits for a command instead of seeing EOF (pytest's stdin) and exiting."""
    rfd, wfd = os.pipe()
    saved = os.dup(0)
    os.dup2(rfd, 0)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        for fd in (saved, rfd, wfd):
            os.close(fd)


def _flags(pid: int, start: int) -> set[str]:
    return set(read_vmflags(pid)[start].split()) - IGNORED_VMFLAGS


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("changed", [False, True], ids=["same-flags", "flags-changed-late"])
def test_vmflags_set_before_the_final_layer(
    tmp_path: Path, spawn: Callable[..., Target], our_stdin: None, changed: bool
) -> None:
    """The warm helper gets its VmFlags (here MADV_WIPEONFORK on the region) set and checked at
    SYNC, before the final freeze, and the final restore skips that walk. A flag set after that
    (MADV_DONTFORK, invisible in /proc/PID/maps) makes the final restore a cold one, which says so:
    the copy has exactly the flags of the final freeze either way, and the helper set up early is
    gone (one process: the copy)."""
    t = spawn("rounds", "256", stderr=subprocess.DEVNULL)  # pytest's capture file would be refused
    info = t.info()
    region = info["region"]
    _advise(t.pid, region, 256 * PAGE, MADV_WIPEONFORK)
    d = tmp_path / "d"
    dump(t.pid, d, pre_dump=True)
    t.cmd("round")
    dump(t.pid, d, incremental=True, pre_dump=True)
    warm = WarmRestore()
    pid = None
    try:
        warm.round(d / "layer-0001.ckpt")
        warm.round(d / "layer-0002.ckpt")
        assert warm.drain() is True
        assert warm.flags_set is not None and warm.prep is not None and not warm.notes
        early = warm.prep.pid
        assert "wf" in _flags(early, region)
        if changed:
            _advise(t.pid, region, 256 * PAGE, MADV_DONTFORK)
        t.cmd("round")
        dump(t.pid, d, incremental=True, leave_stopped=True)
        want = _flags(t.pid, region)
        assert ("dc" in want) is changed
        mem = t.read_mem(region, 256 * PAGE)
        rp = warm.finish(d / "layer-0003.ckpt")
        pid = rp.pid
        assert _flags(pid, region) == want
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            assert os.pread(fd, len(mem), region) == mem
        finally:
            os.close(fd)
        if changed:
            assert not warm.warm_final and any("VmFlags changed" in n for n in warm.notes)
            assert pid != early and not _alive(early)
        else:
            assert warm.warm_final and pid == early and not warm.notes
    finally:
        warm.close()
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        with contextlib.suppress(ProcessLookupError):
            os.kill(t.pid, signal.SIGCONT)


def test_buffer_pool_keeps_the_larger_buffer() -> None:
    pool = BufferPool()
    a = pool.get(16)
    pool.put(a)
    assert pool.get(8) is a  # large enough: the same mapping, not faulted in again
    pool.put(a)
    b = pool.get(64)  # too small: a goes, a new one comes
    assert b is not a and b.npages == 64
    pool.put(b)
    small = pool.get(1)
    assert small is b
    pool.put(small)
    pool.close()
