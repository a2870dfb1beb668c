"""A small restore without numpy (issue 9 part 3): a layer of at most pageset.small_max() page entries
is read into array('Q') columns, a small chain's page table is built in array.array columns, and the
restore's fill works on lists (ckpt/restore/fillsmall.py). Both kinds must give the same answers:
the same page table for any chain, the same refusal of any hostile page index, the same process.
`CKPT_PAGESET_SMALL_MAX=0` forces numpy everywhere; the seed is pytest's header's."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ckpt.image import Layer, MergedView, open_layer
from ckpt.image.format import ADDR_LIMIT, ChunkRecord, MetaError, PageIndex
from ckpt.image.validate import first_common, first_outside
from ckpt.restore import memory, restore_process, restorer
from tests.test_image import anon, build, page, pg
from tests.test_restore_fill import _assert_anon_memory_is_the_image, _kill, dump
from tests.test_startup import CKPT, ENV, _modules, imported
from tests.util import HYPOTHESIS_SEED, LineChannel, Target

P = 4096
SMALL = "CKPT_PAGESET_SMALL_MAX"


@contextlib.contextmanager
def small_max(v: str | None) -> Iterator[None]:
    """pageset.small_max() for the block: "0" makes every non-empty column numpy's."""
    old = os.environ.get(SMALL)
    if v is None:
        os.environ.pop(SMALL, None)
    else:
        os.environ[SMALL] = v
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SMALL, None)
        else:
            os.environ[SMALL] = old


def kind(a: Any) -> str:
    return "numpy" if type(a).__module__ == "numpy" else "array"


def ints(a: Any) -> list[int]:
    return [int(x) for x in a]


# -- chains ---------------------------------------------------------------------------------------
@st.composite
def chains(draw: st.DrawFn) -> list[dict[str, Any]]:
    """1-4 layers over pages 0..63: mappings that move between layers, and in each layer data, zero,
    absent and unchanged pages and fresh ranges (absent, unchanged and fresh only above the first)."""
    out = []
    for k in range(draw(st.integers(1, 4))):
        cuts = sorted(draw(st.sets(st.integers(1, 63), min_size=1, max_size=8)))
        bounds = [0, *cuts, 64]
        spans = [(lo, hi) for lo, hi in zip(bounds[::2], bounds[1::2], strict=False) if hi > lo]
        inside = [i for lo, hi in spans for i in range(lo, hi)]
        roles = draw(st.lists(st.sampled_from("dzau-"), min_size=len(inside), max_size=len(inside)))
        if not k:
            roles = [r if r in "dz-" else "-" for r in roles]
        by = {r: [i for i, x in zip(inside, roles, strict=True) if x == r] for r in "dzau"}
        fresh = [spans[0]] if k and draw(st.booleans()) else []
        out.append({"spans": spans, "fresh": fresh, **by})
    return out


def _write_chain(d: Path, layers: list[dict[str, Any]]) -> Path:
    prev: Path | None = None
    for k, spec in enumerate(layers):
        prev = build(
            d,
            f"layer-{k + 1:04d}.ckpt",
            vmas=[anon(lo, hi - lo) for lo, hi in spec["spans"]],
            data={pg(i): page(100 * k + i) for i in spec["d"]},
            zero=[pg(i) for i in spec["z"]],
            absent=[pg(i) for i in spec["a"]],
            unchanged=[pg(i) for i in spec["u"]],
            fresh=[(pg(lo), pg(hi)) for lo, hi in spec["fresh"]],
            parent=prev,
            chunk_pages=3,
        )
    assert prev is not None
    return prev


def _same_tables(a: Any, b: Any) -> None:
    for col in ("addr", "state", "layer", "index", "digest"):
        assert ints(getattr(a, col)) == ints(getattr(b, col)), col
    assert [(int(s), int(e)) for s, e in a.spans] == [(int(s), int(e)) for s, e in b.spans]
    assert [bool(x) for x in a.anon] == [bool(x) for x in b.anon]
    assert a.counts() == b.counts() and a.total == b.total and len(a) == len(b)


@seed(HYPOTHESIS_SEED)
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=chains(), queries=st.lists(st.integers(-2, 70), max_size=40))
def test_small_and_numpy_tables_agree(
    tmp_path_factory: pytest.TempPathFactory, layers: list[dict[str, Any]], queries: list[int]
) -> None:
    """The same chain read as array('Q') columns and as numpy columns, its table built in
    array.array columns and in numpy: the same rows, and the same answers to every question a
    restore, a dump or a diff asks of it."""
    top = _write_chain(tmp_path_factory.mktemp("chain"), layers)
    with small_max("0"):
        big = open_layer(top)
    small = open_layer(top)
    try:
        assert all(kind(x.pages.data) == "numpy" for x in big.layers if len(x.pages.data))
        assert all(kind(x.pages.data) == "array" for x in small.layers)
        ref = big.page_table()
        assert not ref.small
        for view in (small, big):
            t = view.page_table(small=True)
            assert t.small and kind(t.addr) == "array"
            _same_tables(t, ref)
            _same_tables(view.page_table(), ref)
            _same_tables(t.numpy(), ref)
            for lo, hi in layers[-1]["spans"]:
                assert t.rows(pg(lo), pg(hi)) == ref.rows(pg(lo), pg(hi))
                assert t.present_in(pg(lo), pg(hi)) == ref.present_in(pg(lo), pg(hi))
            for k in range(len(view.layers)):
                assert ints(t.data_indexes(k)) == ints(ref.data_indexes(k))
            q = sorted({pg(i) for i in queries if i >= 0}) + [pg(i) + 17 for i in queries if i < 0]
            rows, digs = t.lookup(q)
            want_rows, want_digs = ref.lookup(np.array(q, dtype=np.uint64))
            assert (ints(rows), ints(digs)) == (ints(want_rows), ints(want_digs))
            assert [bool(x) for x in t.mapped(q)] == ref.mapped(np.array(q, dtype=np.uint64)).tolist()
            for a in q:  # the numpy kind answers a numpy question from a small table too
                assert ints(t.lookup(np.array([a], dtype=np.uint64))[0]) == ints(ref.lookup([a])[0])
        for lo, hi in layers[-1]["spans"]:
            for i in range(lo, hi):
                got = small.page_state(pg(i))
                want = big.page_state(pg(i))
                assert (got[0], got[1].path if got[1] else None) == (
                    want[0],
                    want[1].path if want[1] else None,
                )
            assert small.read(pg(lo), (hi - lo) * P) == big.read(pg(lo), (hi - lo) * P)
    finally:
        small.close()
        big.close()


# -- hostile page indexes -------------------------------------------------------------------------
def _addr_bytes(xs: list[int]) -> bytes:
    return np.array(xs, dtype="<u8").tobytes()


addresses = st.lists(
    st.sampled_from([0x1000, 0x2000, 0x3000, 0x7F00_0000_0000, ADDR_LIMIT - P, ADDR_LIMIT, 0x1001])
    | st.integers(0, 40).map(lambda i: 0x10000 + i * P)
    | st.integers(0, (1 << 64) - 1),
    max_size=12,
)


@st.composite
def page_indexes(draw: st.DrawFn) -> dict[str, Any]:
    """A page index's map as a hostile layer may hold it: columns out of order, unaligned, above the
    limit, repeated or shared between columns, of odd length; digests and chunks that do not match."""
    cols = {k: draw(addresses) for k in ("data", "zero", "absent", "unchanged")}
    if draw(st.booleans()):  # mostly well-formed, so that the later checks are reached too
        cols = {k: sorted({x & ~(P - 1) for x in v if x < ADDR_LIMIT}) for k, v in cols.items()}
    d: dict[str, Any] = {k: _addr_bytes(v) for k, v in cols.items()}
    n = len(cols["data"])
    d["digests"] = _addr_bytes(list(range(n + draw(st.sampled_from([0, 0, 0, 1, -1])))))
    if draw(st.integers(0, 9)) == 0:
        k = draw(st.sampled_from(sorted(cols)))
        d[k] = d[k] + b"\0" * draw(st.integers(1, 7))
    npages = n + draw(st.sampled_from([0, 0, 0, 1]))
    d["chunks"] = [ChunkRecord(64 + 10 * i, 10, 1, 0, False, 0).to_dict() for i in range(npages)]
    d.update(page_size=P, chunk_pages=4, fresh=[])
    return d


def _parse(d: dict[str, Any]) -> PageIndex | str:
    try:
        return PageIndex.from_dict(d)
    except MetaError as e:
        return str(e)


@seed(HYPOTHESIS_SEED)
@settings(max_examples=400, deadline=None, database=None)
@given(d=page_indexes())
def test_hostile_page_index_same_refusal_in_both_kinds(d: dict[str, Any]) -> None:
    with small_max("0"):
        big = _parse(d)
    with small_max("100000"):
        small = _parse(d)
    if isinstance(big, str) or isinstance(small, str):
        assert small == big
        return
    assert small == big and small.to_dict() == big.to_dict() == PageIndex.from_dict(big.to_dict()).to_dict()
    assert all(kind(getattr(small, k)) == "array" for k in ("data", "digests", "zero", "absent"))
    assert ints(small.chunk_first()) == ints(big.chunk_first())


@seed(HYPOTHESIS_SEED)
@settings(max_examples=300, deadline=None, database=None)
@given(q=addresses, a=addresses, spans=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 5)), max_size=6))
def test_first_common_and_first_outside_agree(
    q: list[int], a: list[int], spans: list[tuple[int, int]]
) -> None:
    a = sorted(set(a))
    sp: list[tuple[int, int]] = []
    for s, n in sorted(spans):
        if not sp or 0x10000 + s * P >= sp[-1][1]:
            sp.append((0x10000 + s * P, 0x10000 + (s + n) * P))
    qa, qn = array("Q", q), np.array(q, dtype=np.uint64)
    aa, an = array("Q", a), np.array(a, dtype=np.uint64)
    want = next((i for i, x in enumerate(q) if x in set(a)), -1)
    assert first_common(qa, aa) == first_common(qn, an) == first_common(qa, an) == want
    want = next((i for i, x in enumerate(q) if not any(s <= x < e for s, e in sp)), -1)
    assert first_outside(qa, sp) == first_outside(qn, sp) == want


def test_small_layer_columns_and_chunks(tmp_path: Path) -> None:
    """A small layer's columns are array('Q')s, its chunk lookups plain ints; the same as numpy's."""
    top = build(
        tmp_path, "layer-0001.ckpt", vmas=[anon(0, 16)], data={pg(i): page(i) for i in range(0, 16, 2)}
    )
    with Layer.open(top) as s:
        with small_max("0"):
            b = Layer.open(top)
        try:
            assert kind(s.pages.data) == "array" and kind(b.pages.data) == "numpy"
            assert s.pages == b.pages
            for i in range(8):
                assert s.chunk_of(i) == int(b.chunk_of(i))
                assert s.data_index(pg(2 * i)) == b.data_index(pg(2 * i)) == i
            assert s.data_index(pg(1)) == b.data_index(pg(1)) == -1
            assert s.chunk_of(list(range(8))) == b.chunk_of(np.arange(8)).tolist()
            for ci in range(len(s.pages.chunks)):
                assert ints(s.chunk_addrs(ci)) == ints(b.chunk_addrs(ci))
                assert s.read_chunk(ci) == b.read_chunk(ci)  # the page digests checked both ways
        finally:
            b.close()


# -- a real process ---------------------------------------------------------------------------------
@pytest.fixture
def fills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, memory.FillStats]]:
    """(table small?, FillStats) of every restore the test runs."""
    seen: list[tuple[bool, memory.FillStats]] = []
    real = restorer.fill_pages

    def spy(remote: Any, view: MergedView, plan: Any, work: memory.FillWork | None) -> memory.FillStats:
        assert work is not None  # made beside the helper's start (restorer.restore_one)
        s = real(remote, view, plan, work)
        seen.append((plan.table.small, s))
        return s

    monkeypatch.setattr(restorer, "fill_pages", spy)
    return seen


@pytest.mark.parametrize("npages", ["64", "600"])
def test_restore_small_and_numpy_fill_the_same(
    tmp_path: Path,
    spawn: Callable[..., Target],
    subreaper: list[int],
    datafile: Path,
    fills: list[tuple[bool, memory.FillStats]],
    npages: str,
) -> None:
    """A chain of a full and two incremental layers of a process with a private file mapping (one page
    written), zero pages and scattered rewrites: restored with the small table and with numpy forced,
    the memory is the image's before the process runs, the process answers the same checksum, and
    the fill wrote the same pages by the same paths (runs, UFFDIO_COPY calls, pages left to the file)."""
    t = spawn("rounds", npages, str(datafile), stderr=subprocess.DEVNULL)
    assert t.cmd("mix") == "ok"
    d = tmp_path / "chain"
    dump(t.pid, d)
    for i in range(2):
        t.cmd("round")
        dump(t.pid, d, "--incremental", *(["--kill"] if i == 1 else []))
    t.proc.wait(30)
    top = d / "layer-0003.ckpt"
    images = []
    seen: list[int] = []
    for limit in (None, "0"):

        def check(pid: int) -> None:
            seen.append(pid)
            _assert_anon_memory_is_the_image(pid, top)
            images.append(_memory(pid, top))

        with small_max(limit), open_layer(top) as view:
            rp = restore_process(view, before_run=check)
        subreaper.append(rp.pid)
        assert seen[-1] == rp.pid
        _kill(rp.pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(rp.pid, 0)
    assert [small for small, _ in fills] == [True, False]
    assert fills[0][1] == fills[1][1]
    assert fills[0][1].skipped_file_pages > 0  # the file mapping's unwritten pages were compared
    assert images[0] == images[1]


def _memory(pid: int, layer: Path) -> list[tuple[int, bytes]]:
    """The bytes of every readable dumped mapping of process `pid` (the file's too) but the threads'
    rseq areas (the CPU the helper last ran on)."""
    with open_layer(layer) as view:
        rseq = [th.rseq for th in view.top.threads if th.rseq is not None]
        out = []
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            for v in view.top.vmas:
                if v.dumped and v.perms[0] == "r" and v.path != "[vdso]":
                    b = bytearray(os.pread(fd, v.end - v.start, v.start))
                    for a, n, _ in rseq:
                        lo, hi = max(a, v.start), min(a + n, v.end)
                        if lo < hi:
                            b[lo - v.start : hi - v.start] = bytes(hi - lo)
                    out.append((v.start, bytes(b)))
        finally:
            os.close(fd)
    return out


def test_small_chain_restore_and_show_import_no_numpy(
    spawn: Callable[..., Target], subreaper: list[int], tmp_path: Path
) -> None:
    """A chain of a full and an incremental layer of a 1 MiB process: `ckpt show` and `ckpt
    restore` of it, run as a user runs them, never import numpy; the process comes back whole."""
    t = spawn("rounds", "256", stderr=subprocess.DEVNULL)
    assert t.cmd("mix") == "ok"
    d = tmp_path / "d"
    ckpt = [sys.executable, "-m", "ckpt"]
    subprocess.run(
        [*ckpt, "dump", "--pid", str(t.pid), "-D", str(d)], check=True, capture_output=True, env=ENV
    )
    t.cmd("round")
    want = t.cmd("sum")
    argv = ["dump", "--pid", str(t.pid), "-D", str(d), "--incremental", "--kill"]
    subprocess.run([*ckpt, *argv], check=True, capture_output=True, env=ENV, timeout=120)
    t.proc.wait(30)
    mods, out = imported(["show", str(d), "--json"])
    assert len(json.loads(out)["chain"]) == 2 and "numpy" not in mods
    p = subprocess.Popen([*CKPT, "restore", str(d), "--detach", "--json"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, bufsize=0)  # fmt: skip
    try:
        chan = LineChannel(p, 120)
        subreaper.append(json.loads(chan.readline())["pid"])
        assert chan.cmd("sum") == want
        chan.send("exit 0")
        assert p.wait(60) == 0
        assert p.stderr is not None
        mods = _modules(p.stderr.read().decode(errors="replace"))
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert "numpy" not in mods


@seed(HYPOTHESIS_SEED)
@settings(max_examples=200, deadline=None, database=None)
@given(rows=st.lists(st.tuples(st.integers(0, 9), st.integers(-1, 50)), max_size=80))
def test_data_indexes_of_a_small_table_are_each_layers_own(rows: list[tuple[int, int]]) -> None:
    """A small table's data_indexes(k), grouped by layer once (the restore's plan asks for every layer
    of the chain), gives what one pass per layer gave, in the table's order, as a list of its own."""
    from ckpt.image.chain import PageTable

    n = len(rows)
    t = PageTable(
        array("Q", range(0, n * 4096, 4096)),
        array("B", [2] * n),
        array("i", [k for k, _ in rows]),
        array("q", [i for _, i in rows]),
        array("Q", [0] * n),
        [],
        [],
    )
    assert t.small
    for k in range(11):
        want = [i for i, lay in zip(t.index, t.layer, strict=True) if lay == k and i >= 0]
        got = t.data_indexes(k)
        assert got == want
        got.append(-5)  # (the caller's to change: the next ask is the same)
        assert t.data_indexes(k) == want
