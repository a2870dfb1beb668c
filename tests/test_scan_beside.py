"""An incremental uffd-wp dump of a process of 64 MiB and more scans for dirty pages and holes
beside the collect: on threads of C's own (UffdWpTracker.scan_dirty_native, ckpt/proc/procgrab.c
ckpt_scans), or without that library on a Python thread (ckpt/dump.py: scan_pool; scan_dirty).
The layer must be what the one-thread order gives: every page written stored, every page dropped
absent, the merged view the memory page for page; and a collect that fails while the scans run
leaves the target running with its tracking taken out, and no layer."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import PAGETABLES_BACKGROUND, dump
from ckpt.errors import TargetError, TrackerError
from ckpt.image import open_layer
from ckpt.memory import PagemapScanner
from ckpt.proc import grab as procgrab
from ckpt.track import available, uffdwp
from ckpt.track.uffdwp import UffdWpTracker, uffd_fds
from tests.util import PAGE, LineChannel, Target, assert_view_equals_memory, build_c

dump_mod = importlib.import_module("ckpt.dump")  # (ckpt.dump, the name, is the function)

pytestmark = pytest.mark.skipif(
    not available()["uffd-wp"][0], reason="uffd-wp tracking unavailable on this kernel"
)

A = (PAGETABLES_BACKGROUND // PAGE) + 1024  # pages of data: the process is above the bound
B = 2048  # a second mapping, its upper half never touched before the first dump


@pytest.fixture
def target() -> Iterator[tuple[subprocess.Popen[bytes], LineChannel, int, int]]:
    """tests/targets/layout.c with the two mappings: (process, its channel, A's start, B's start)."""
    p = subprocess.Popen([str(build_c("layout"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        ch = LineChannel(p, timeout=60)
        assert p.stdin is not None
        p.stdin.write(
            f"map {A} rw hole 0 0\nrun d {A} 1\nmap {B} rw hole 4 0\nrun d {B // 2} 2\nbuild\n".encode()
        )
        words = ch.readline().split()
        assert words[0] == "ready", words
        yield p, ch, int(words[1], 16), int(words[2], 16)
    finally:
        p.kill()
        p.wait()


@pytest.fixture(params=[True, False], ids=["native", "python"])
def native(request: pytest.FixtureRequest) -> Iterator[bool]:
    procgrab.reset(request.param)
    if request.param and procgrab.lib() is None:
        pytest.fail("ckpt/proc/_procgrab.so is not built or not usable: run scripts/setup.sh")
    yield request.param
    procgrab.reset(True)


def _scans_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Where the scans ran: "native" (scan_dirty_native started them) or the name of the thread
    UffdWpTracker.scan_dirty ran on (the real ones, recorded)."""
    names: list[str] = []
    real = UffdWpTracker.scan_dirty
    real_native = UffdWpTracker.scan_dirty_native

    def recorded(self: UffdWpTracker, *a: Any) -> Any:
        names.append(threading.current_thread().name)
        return real(self, *a)

    def recorded_native(self: UffdWpTracker, *a: Any) -> Any:
        got = real_native(self, *a)
        if got is not None:
            names.append("native")
        return got

    monkeypatch.setattr(UffdWpTracker, "scan_dirty", recorded)
    monkeypatch.setattr(UffdWpTracker, "scan_dirty_native", recorded_native)
    return names


@pytest.mark.parametrize("precopy", [False, True], ids=["frozen", "pre-copy"])
def test_scans_beside_the_collect_find_what_one_thread_finds(
    target: tuple[subprocess.Popen[bytes], LineChannel, int, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precopy: bool,
    native: bool,
) -> None:
    p, ch, a, b = target
    d = tmp_path / "d"
    dump(p.pid, d, track="uffd-wp")
    assert ch.cmd(f"data {a + 100 * PAGE:x} 50 9") == "ok"
    assert ch.cmd(f"data {a + (A - 3) * PAGE:x} 3 11") == "ok"  # the last pages of A
    assert ch.cmd(f"drop {a + 200 * PAGE:x} 40") == "ok"  # the parent's, dropped
    assert ch.cmd(f"data {b + (B - 10) * PAGE:x} 10 3") == "ok"  # first touched since the parent
    names = _scans_on(monkeypatch)
    r = dump(p.pid, d, incremental=True, precopy=precopy, leave_stopped=True)
    try:
        assert names == (["native"] if native else ["ckpt-scan_0"])
        assert_view_equals_memory(p.pid, r.layer)
        with open(f"/proc/{p.pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
    finally:
        os.kill(p.pid, signal.SIGCONT)
    pages = open_layer(r.layer).layers[0].meta.pages
    mine = [(a, a + A * PAGE), (b, b + B * PAGE)]
    stored = {int(x) for x in pages.data if any(lo <= x < hi for lo, hi in mine)}
    want = [a + i * PAGE for i in [*range(100, 150), *range(A - 3, A)]] + [
        b + i * PAGE for i in range(B - 10, B)
    ]
    assert stored == set(want)
    absent = {int(x) for x in pages.absent if any(lo <= x < hi for lo, hi in mine)}
    assert absent == {a + i * PAGE for i in range(200, 240)}
    # The tracking goes on: the next layer holds what was written after this one, nothing more.
    assert ch.cmd(f"data {a + 5 * PAGE:x} 1 4") == "ok"
    r2 = dump(p.pid, d, incremental=True, precopy=False)
    pages = open_layer(r2.layer).layers[0].meta.pages
    assert {int(x) for x in pages.data if any(lo <= x < hi for lo, hi in mine)} == {a + 5 * PAGE}


def test_a_collect_failing_beside_the_scans(
    target: tuple[subprocess.Popen[bytes], LineChannel, int, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    native: bool,
) -> None:
    """The collect fails while the scans may still run: the dump waits for them before it undoes
    the tracking (their dirty bits are consumed: later incrementals refuse), and leaves no layer."""
    p, ch, a, _ = target
    d = tmp_path / "d"
    dump(p.pid, d, track="uffd-wp")
    assert ch.cmd(f"data {a:x} 64 5") == "ok"
    names = _scans_on(monkeypatch)

    def failing(*_: Any, **__: Any) -> Any:
        raise TargetError("injected failure in the collect")

    monkeypatch.setattr(dump_mod, "_collect", failing)
    with pytest.raises(TargetError, match="injected failure"):
        dump(p.pid, d, incremental=True, precopy=False)
    monkeypatch.undo()
    assert names == (["native"] if native else ["ckpt-scan_0"])
    assert uffd_fds(p.pid) == []  # taken out of the process, after the scans ended
    with pytest.raises(TrackerError):
        dump(p.pid, d, incremental=True)
    assert [x.name for x in d.glob("layer-*")] == ["layer-0001.ckpt"]
    assert ch.cmd(f"same {a:x} 1") == "ok"  # it runs on, its memory its own
    with open(f"/proc/{p.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()


@pytest.mark.parametrize("split", [False, True], ids=["one group", "two groups"])
@pytest.mark.parametrize("room", ["none", "one call"])
def test_native_scans_out_of_room_go_on_in_python(
    target: tuple[subprocess.Popen[bytes], LineChannel, int, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    room: str,
    split: bool,
) -> None:
    """More dirty regions (every other page of 4500) than one call's vector (4096): with room for no
    call, the walks are all made in Python; with room for one, the dirty walk goes on in Python
    where it stopped, the pages its first call re-armed kept, and the hole walk is made in Python
    (one group: after the dirty walk, in its buffer) or in C (two groups, as from SCANS_SPLIT_MIN
    of followed memory: a buffer of its own). Either way every written page is stored once, and the
    next layer holds only what was written after."""
    if split:
        monkeypatch.setattr(uffdwp, "SCANS_SPLIT_MIN", 0)
    p, ch, a, _ = target
    d = tmp_path / "d"
    dump(p.pid, d, track="uffd-wp")
    written = [a + 2 * i * PAGE for i in range(4500)]
    for x in written:
        assert ch.cmd(f"data {x:x} 1 7") == "ok"
    monkeypatch.setattr(procgrab, "SCAN_CAP", 40 if room == "none" else 32 + 16 + 4096 * 24 + 1000)
    # No bigger buffer kept, from before or from the grab (joined during the batch, before the
    # scans start: its buffer would be theirs).
    monkeypatch.setattr(procgrab, "_spare", [])
    monkeypatch.setattr(procgrab, "_give_back", lambda buf: None)
    went_on: list[int] = []  # where a walk went on in Python
    real_raw = PagemapScanner.raw

    def raw(self: PagemapScanner, start: int, end: int, **kw: Any) -> Any:
        if sys._getframe(1).f_code.co_name == "_scans_of":  # (other walks of the dump aside)
            went_on.append(start)
        return real_raw(self, start, end, **kw)

    monkeypatch.setattr(PagemapScanner, "raw", raw)
    r = dump(p.pid, d, incremental=True, precopy=False, leave_stopped=True)
    try:
        assert_view_equals_memory(p.pid, r.layer)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    pages = open_layer(r.layer).layers[0].meta.pages
    stored = sorted(int(x) for x in pages.data if a <= x < a + A * PAGE)
    assert stored == written
    if room == "none":
        assert len(went_on) == 2  # both walks, whole
    else:
        # The dirty walk went on after its first call's 4096 regions (the first few of them the
        # target's other mappings', below A; then pages 0, 2, 4, ... of A); the hole walk, on the
        # same thread after it, was then made whole in Python (from the followed span's start), or
        # in a group with a buffer of its own (procgrab.scans_start's split), whole in C.
        assert len(went_on) == (1 if split else 2), went_on
        assert a + 8000 * PAGE < went_on[0] <= a + 8192 * PAGE, went_on
        assert split or went_on[1] < a
    monkeypatch.undo()
    assert ch.cmd(f"data {a + 1 * PAGE:x} 1 4") == "ok"
    r2 = dump(p.pid, d, incremental=True, precopy=False)
    pages = open_layer(r2.layer).layers[0].meta.pages
    assert {int(x) for x in pages.data if a <= x < a + A * PAGE} == {a + PAGE}


@pytest.mark.parametrize("far", [False, True], ids=["near", "far"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_present_pages_of_many_spans(seed: int, far: bool) -> None:
    """memory.present_in(small=True) over many small spans (an 8-thread process's stack guards, say):
    spans closer than HULL_GAP walked as one, the pages between dropped ("near"); spans far apart
    walked in one call of procgrab.c (grab.scans_now, "far"). The pages it finds are those the
    kernel's pagemap marks present (bit 63, read page by page), the same with the library and
    without, for spans of one page to hundreds, touched in runs, alternately and not at all, and
    (near) one span whose every other page is touched: more regions than a walk's vector holds."""
    import ctypes
    import random

    from ckpt import ranges
    from ckpt.memory import HULL_GAP, NATIVE_SPANS, PM_PRESENT, present_in, read_pagemap

    print(f"seed {seed}")
    rnd = random.Random(seed)
    crowded = not far and seed % 2 == 0  # (walked apart after all: the pages between are many)
    stride = (HULL_GAP + (1 << 20)) // PAGE + 300 if far else 0  # (a gap of HULL_GAP and more)
    size = (40 * stride + 12000) * PAGE if far else 12000 * PAGE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    int_ = ctypes.c_int
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, int_, int_, int_, ctypes.c_long]
    base = libc.mmap(None, size, 3, 0x22 | 0x4000, -1, 0)  # RW, PRIVATE|ANONYMOUS|NORESERVE
    assert base not in (None, ctypes.c_void_p(-1).value)
    try:
        assert libc.madvise(ctypes.c_void_p(base), ctypes.c_size_t(size), 15) == 0  # MADV_NOHUGEPAGE
        spans: list[tuple[int, int]] = []
        at = 0
        while len(spans) < 40 and at + 300 < size // PAGE:
            n = rnd.choice([1, 2, 3, 17, 64, 300])
            kind = rnd.choice(["all", "none", "odd", "run"])
            for i in range(n):
                if kind == "all" or (kind == "odd" and i % 2) or (kind == "run" and i < n // 2):
                    ctypes.memset(base + (at + i) * PAGE, 1, 1)
            spans.append((base + at * PAGE, base + (at + n) * PAGE))
            gap = max(n + rnd.randint(1, 5), stride) - n
            if crowded:  # the pages between touched too: the one walk finds more than the limit
                for i in range(gap):
                    ctypes.memset(base + (at + n + i) * PAGE, 1, 1)
            at += n + gap
        if not far:  # one span of every other page of 8200: 4100 regions, past a walk's 4096
            lo = at + 3
            for i in range(0, 8200, 2):
                ctypes.memset(base + (lo + i) * PAGE, 1, 1)
            spans.append((base + lo * PAGE, base + (lo + 8200) * PAGE))
        assert len(spans) >= NATIVE_SPANS
        want = []
        for a, b in spans:
            ents = read_pagemap(os.getpid(), a, b)
            want += [a + i * PAGE for i in range(len(ents)) if int(ents[i]) & PM_PRESENT]
        limit = sum(e - s for s, e in spans) // PAGE
        os.environ["CKPT_PAGESET_SMALL_MAX"] = str(limit)  # (every span's pages fit the small path)
        calls: list[bool] = []
        real = procgrab.scans_now

        def counted(*a: Any) -> Any:
            out = real(*a)
            calls.append(out is not None)
            return out

        try:
            got = {}
            procgrab.scans_now = counted  # type: ignore[assignment]
            for lib in (True, False):
                procgrab.reset(lib)
                got[lib] = [int(x) for x in ranges.as_set(present_in(os.getpid(), spans, small=True))]
        finally:
            procgrab.scans_now = real  # type: ignore[assignment]
            procgrab.reset(True)
            del os.environ["CKPT_PAGESET_SMALL_MAX"]
        # far: one C call with the library, none without; near: one walk, from Python
        assert calls == ([True, False] if far else [])
        assert got[True] == want, f"seed {seed}"
        assert got[False] == want, f"seed {seed}"
    finally:
        libc.munmap(ctypes.c_void_p(base), ctypes.c_size_t(size))


def test_the_candidates_are_found_while_the_scans_run(
    spawn: Callable[..., Target], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process whose walks run beside the collect (dump.PAGETABLES_BACKGROUND): the candidates'
    present pages (a mapping made since the parent: every page; shared memory; [vdso]) are found
    before the scans are joined (dump._candidates, from UffdWpTracker.candidate_ranges), and the
    layer is what it was: the new mapping's pages and the one written page of the region stored,
    the merged view the process's memory."""
    n = PAGETABLES_BACKGROUND * 4 // 3 // PAGE + 1024  # (a quarter of memtarget's region untouched)
    t = spawn("memtarget", str(n))
    region = int(t.cmd("info").split()[1], 16)
    d = tmp_path / "d"
    dump(t.pid, d, track="uffd-wp")
    new = int(t.cmd("mmap 10").split()[1], 16)
    assert t.cmd("write 5") == "ok"
    order: list[str] = []
    real_candidates = dump_mod._candidates
    real_result = procgrab.PendingScans.result

    def candidates(*a: Any) -> Any:
        order.append("candidates")
        return real_candidates(*a)

    def result(self: procgrab.PendingScans) -> Any:
        order.append("joined")
        return real_result(self)

    monkeypatch.setattr(dump_mod, "_candidates", candidates)
    monkeypatch.setattr(procgrab.PendingScans, "result", result)
    r = dump(t.pid, d, incremental=True, precopy=False, leave_stopped=True)
    try:
        assert_view_equals_memory(t.pid, r.layer)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert order == ["candidates", "joined"], order
    pages = open_layer(r.layer).layers[0].meta.pages
    stored = {int(x) for x in pages.data}
    assert {new + i * PAGE for i in range(10)} <= stored
    assert {x for x in stored if region <= x < region + n * PAGE} == {region + 5 * PAGE}
    assert t.cmd("sum").startswith("sum")  # it runs on
