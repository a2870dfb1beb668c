"""Property tests (issue 9): every memory layout dumps exactly, full and incremental, on one or two chains.

Hypothesis draws layouts (several mappings from one page to hundreds of MiB, runs of absent, zero and
data pages with lengths on either side of every batch and chunk size ckpt uses, stripes with more
regions than the kernel's 512-region scan batch, holes, PROT_NONE guards, read-only and PROT_NONE
mappings holding data, THP on or off), and dump settings (the streaming path with a small page budget,
one or two compression threads; copies of 1024 pages and more split across two threads). Each case is
a real process, tests/targets/layout.c, which builds the layout and then idles in read(): the merged
view of every layer must equal its memory page for page (tests.util.assert_view_equals_memory).

The seed is fixed so that a run replays (CKPT_HYPOTHESIS_SEED varies it; pytest's header prints it),
and a failure prints a @reproduce_failure blob. Example counts are bounded so the file runs in about
a minute or two on a loaded 2-core machine; CKPT_LAYOUT_EXAMPLES scales them for a longer hunt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st

from ckpt.dump import DEFAULT_MAX_BUFFER, dump
from ckpt.proc import read_maps
from ckpt.track import available
from tests.util import HYPOTHESIS_SEED, PAGE, LineChannel, assert_view_equals_memory, build_c

SCALE = float(os.environ.get("CKPT_LAYOUT_EXAMPLES", "1"))
# Lengths on either side of the writer's chunk (256 pages), the dumper's batch (256) and zero-detection
# window (4096), the two-thread copy threshold (1024) and the kernel's scan batch (512 regions).
EDGES = (1, 2, 7, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 4095, 4096, 4097)
SMALL_CAP = 24_000  # pages (~94 MiB) per generated layout; the large explicit examples go beyond
BUFFERS = (DEFAULT_MAX_BUFFER, 1 << 20, (5 << 20) + 3 * PAGE)  # streaming: 256 pages, 1283 pages


@dataclass
class Run:
    kind: str  # a: never touched, z: zeros written, d: bytes from seed
    npages: int
    seed: int = 0


@dataclass
class Mapping:
    prot: str  # rw, r, none (untouched guard), nonedata (filled, then PROT_NONE)
    gap_kind: str  # hole or guard, for the gap pages before it
    gap: int
    thp: bool
    runs: list[Run]

    @property
    def npages(self) -> int:
        return sum(r.npages for r in self.runs)


@dataclass
class Op:
    kind: str  # data, zero, drop, same
    map_index: int
    page: int
    npages: int
    seed: int = 0


@dataclass
class Case:
    maps: list[Mapping]
    max_buffer: int = DEFAULT_MAX_BUFFER
    threads: int = 2
    tracker: str = "uffd-wp"
    rounds: list[list[Op]] = field(default_factory=list)

    def __repr__(self) -> str:  # what hypothesis prints for a failing case: short, and enough to rebuild it
        maps = ", ".join(
            f"{m.prot}/{m.gap_kind}{m.gap}/{'thp' if m.thp else 'nothp'}:"
            + "+".join(f"{r.kind}{r.npages}" for r in m.runs)
            for m in self.maps
        )
        return (
            f"Case(maps=[{maps}], max_buffer={self.max_buffer}, threads={self.threads}, "
            f"tracker={self.tracker}, rounds={self.rounds})"
        )


def stripe(period: int, cycles: int, zero_at: int, s: int) -> list[Run]:
    """`cycles` repeats of: one page never touched, data, one zero page at `zero_at`, data (issue 9's
    layout is period 8, zero_at 4): one scan region per cycle."""
    out: list[Run] = []
    for c in range(cycles):
        out.append(Run("a", 1))
        if zero_at > 1:
            out.append(Run("d", zero_at - 1, s + c))
        out.append(Run("z", 1))
        if period - zero_at - 1 > 0:
            out.append(Run("d", period - zero_at - 1, s + c))
    return out


run_length = st.one_of(st.integers(1, 12), st.sampled_from(EDGES), st.integers(13, 2500))


@st.composite
def runs_of(draw: st.DrawFn, big: bool) -> list[Run]:
    out: list[Run] = []
    for _ in range(draw(st.integers(1, 5))):
        shape = draw(st.sampled_from(["a", "z", "d", "d", "stripe"] + (["big"] if big else [])))
        s = draw(st.integers(0, 2**32))
        if shape == "stripe":
            period = draw(st.sampled_from([3, 5, 8, 8, 16]))
            cycles = draw(st.one_of(st.integers(1, 40), st.sampled_from([511, 513, 700, 1100])))
            out += stripe(period, cycles, draw(st.integers(1, period - 1)), s)
        elif shape == "big":
            out.append(Run(draw(st.sampled_from("dza")), draw(st.integers(8192, 24_000)), s))
        else:
            out.append(Run(shape, draw(run_length), s))
    return out


@st.composite
def mappings(draw: st.DrawFn, big: bool) -> Mapping:
    prot = draw(st.sampled_from(["rw", "rw", "rw", "rw", "r", "none", "nonedata"]))
    runs = draw(runs_of(big))
    if prot == "none":
        runs = [Run("a", sum(r.npages for r in runs))]
    return Mapping(
        prot=prot,
        gap_kind=draw(st.sampled_from(["hole", "guard"])),
        gap=draw(st.sampled_from([0, 0, 1, 2, 17])),
        thp=draw(st.integers(0, 3)) == 0,
        runs=runs,
    )


def _capped(maps: list[Mapping], cap: int) -> list[Mapping]:
    """Trim the last runs so the layout stays within `cap` pages (keeps a generated case affordable)."""
    out, left = [], cap
    for m in maps:
        runs = []
        for r in m.runs:
            if left <= 0:
                break
            runs.append(Run(r.kind, min(r.npages, left), r.seed))
            left -= runs[-1].npages
        if runs:
            out.append(Mapping(m.prot, m.gap_kind, m.gap, m.thp, runs))
    return out


def _writable() -> list[str]:
    return [t for t in ("uffd-wp", "hash") if available()[t][0]]


@st.composite
def ops(draw: st.DrawFn, maps: list[Mapping]) -> list[Op]:
    rw = [i for i, m in enumerate(maps) if m.prot == "rw"]
    if not rw:
        return []
    out = []
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.sampled_from(rw))
        n = maps[i].npages
        page = draw(st.integers(0, n - 1))
        count = draw(st.one_of(st.integers(1, 8), st.sampled_from(EDGES)))
        out.append(
            Op(
                draw(st.sampled_from(["data", "data", "zero", "drop", "same"])),
                i,
                page,
                min(count, n - page),
                draw(st.integers(0, 2**32)),
            )
        )
    return out


@st.composite
def cases(draw: st.DrawFn, rounds: int = 0, big: bool = False, cap: int = SMALL_CAP) -> Case:
    maps = _capped(draw(st.lists(mappings(big), min_size=1, max_size=5)), cap)
    trackers = _writable()
    return Case(
        maps=maps,
        max_buffer=draw(st.sampled_from(BUFFERS)),
        threads=draw(st.sampled_from([1, 2])),
        tracker=draw(st.sampled_from(trackers)) if trackers else "none",
        rounds=[draw(ops(maps)) for _ in range(rounds)],
    )


class LayoutTarget:
    """tests/targets/layout.c running a case's layout, idle in read() between commands."""

    def __init__(self, maps: list[Mapping]) -> None:
        self.proc = subprocess.Popen(
            [str(build_c("layout"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.pid = self.proc.pid
        self.chan = LineChannel(self.proc, timeout=300)
        lines = []
        for m in maps:
            lines.append(f"map {m.npages} {m.prot} {m.gap_kind} {m.gap} {int(m.thp)}")
            lines += [f"run {r.kind} {r.npages} {r.seed}" for r in m.runs]
        lines.append("build")
        assert self.proc.stdin is not None
        self.proc.stdin.write(("\n".join(lines) + "\n").encode())
        words = self.chan.readline().split()
        assert words[0] == "ready", words
        self.addrs = [int(w, 16) for w in words[1:]]

    def apply(self, maps: list[Mapping], ops: list[Op]) -> None:
        for op in ops:
            addr = self.addrs[op.map_index] + op.page * PAGE
            tail = f" {op.seed}" if op.kind == "data" else ""
            assert self.chan.cmd(f"{op.kind} {addr:x} {op.npages}{tail}") == "ok", op

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()


@contextmanager
def running(case: Case) -> Iterator[tuple[LayoutTarget, Path]]:
    t = LayoutTarget(case.maps)
    try:
        with tempfile.TemporaryDirectory(prefix="ckpt-layouts-") as d:
            yield t, Path(d)
    finally:
        t.close()


def _dump(t: LayoutTarget, d: Path, case: Case, incremental: bool) -> None:
    """One dump, checked: the layer's merged view is the process's memory and its mappings are the
    process's; the target runs on, untraced.

    The target is left stopped by the dump (--leave-stopped), so its memory is compared at the very
    point the dump saw: a target that had answered "ready" may still be on its way into read() (libc
    unlocking stdout) when it is frozen, and would change a byte right after the thaw."""
    from ckpt.image import open_layer

    r = dump(
        t.pid,
        d,
        incremental=incremental,
        track=case.tracker if not incremental else "auto",
        max_buffer=case.max_buffer,
        threads=case.threads,
        leave_stopped=True,
    )
    try:
        assert r.incremental == incremental
        assert_view_equals_memory(t.pid, r.layer)
        got = [(v.start, v.end, v.perms) for v in open_layer(r.layer).layers[0].meta.vmas]
        assert got == [(v.start, v.end, v.perms) for v in read_maps(t.pid)]
        with open(f"/proc/{t.pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert t.proc.poll() is None


def _settings(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,
        print_blob=True,
        # Every example is a real process and real dumps: shrinking a failure can take many minutes, so
        # it is asked for (CKPT_HYPOTHESIS_SHRINK=1) rather than done by default; the blob replays.
        phases=[Phase.explicit, Phase.generate]
        + ([Phase.shrink] if os.environ.get("CKPT_HYPOTHESIS_SHRINK") else []),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


ISSUE_9 = Case(maps=[Mapping("rw", "hole", 0, False, stripe(8, 4096 // 8, 4, 7))])
LARGE = Case(
    maps=[
        # ~230 MiB: THP allowed, runs across every batch size, a stripe of 2200 scan regions
        Mapping(
            "rw", "hole", 0, True, [Run("d", 30_000, 1), Run("a", 9000), Run("z", 4097), Run("d", 20_001, 2)]
        ),
        Mapping("nonedata", "guard", 3, False, [Run("d", 1025, 3)]),
        Mapping("rw", "hole", 1, False, stripe(8, 2200, 4, 4)),
    ],
    max_buffer=(5 << 20) + 3 * PAGE,
)


@seed(HYPOTHESIS_SEED)
@_settings(14)
@given(case=cases(big=True))
@example(case=ISSUE_9)
@example(case=Case(ISSUE_9.maps, max_buffer=1 << 20, threads=1))
@example(case=LARGE)
def test_full_dump_equals_memory(case: Case) -> None:
    with running(case) as (t, d):
        _dump(t, d, case, incremental=False)


@pytest.mark.skipif(not _writable(), reason="no dirty tracker on this kernel")
@seed(HYPOTHESIS_SEED)
@_settings(8)
@given(case=cases(rounds=2, cap=12_000))
@example(case=Case(ISSUE_9.maps, rounds=[[Op("data", 0, 3, 300, 9), Op("drop", 0, 1000, 513)], []]))
def test_incremental_equals_memory(case: Case) -> None:
    with running(case) as (t, d):
        _dump(t, d, case, incremental=False)
        for ops_ in case.rounds:
            t.apply(case.maps, ops_)
            _dump(t, d, case, incremental=True)


@pytest.mark.skipif(not _writable(), reason="no dirty tracker on this kernel")
@seed(HYPOTHESIS_SEED)
@_settings(4)
@given(case=cases(rounds=3, cap=6000))
@example(case=Case(ISSUE_9.maps, rounds=[[Op("data", 0, 1, 2, 5)], [Op("zero", 0, 9, 600)], []]))
def test_two_chains_of_one_process(case: Case) -> None:
    """Chain B starts while chain A tracks the process (its mappings are busy for B's tracker): both
    chains stay exact through writes made before and after each other's dumps."""
    with running(case) as (t, root):
        a, b = root / "a", root / "b"
        _dump(t, a, case, incremental=False)
        t.apply(case.maps, case.rounds[0])
        _dump(t, b, case, incremental=False)
        t.apply(case.maps, case.rounds[1])
        _dump(t, a, case, incremental=True)
        t.apply(case.maps, case.rounds[2])
        _dump(t, b, case, incremental=True)
        _dump(t, a, case, incremental=True)


@pytest.mark.parametrize("regions", [511, 512, 513, 1100, 4095, 4096, 4097, 5000, 9000])
def test_pagemap_scan_reports_each_page_once(regions: int) -> None:
    """The root of issue 9's failure, on this process's own memory: every other page touched gives
    `regions` present regions. The kernel walks in batches of 512 regions and leaves walk_end stale
    when a later batch completes the walk; resuming there reported pages twice, out of order."""
    import mmap

    import numpy as np

    from ckpt.memory import PAGE_IS_PRESENT, PagemapScanner, present_in

    m = mmap.mmap(-1, 2 * regions * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_NOHUGEPAGE)  # one huge page would make every page present
        base = np.frombuffer(m, dtype=np.uint8).ctypes.data
        for i in range(regions):
            m[2 * i * PAGE] = 1
        want = np.arange(regions, dtype=np.uint64) * np.uint64(2 * PAGE) + np.uint64(base)
        with PagemapScanner(os.getpid()) as sc:
            r = sc.scan_arrays(base, base + 2 * regions * PAGE, category_anyof_mask=PAGE_IS_PRESENT)
        assert len(r) == regions and bool(np.all(r[1:, 0] > r[:-1, 0]))
        got = present_in(os.getpid(), [(base, base + 2 * regions * PAGE)])
        assert np.array_equal(got, want)
    finally:
        m.close()
