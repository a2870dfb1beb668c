"""The small path without numpy (issue 9 part 3): numpy's import is ~30% of a small dump's or restore's
start, so what a small process needs must work without it (ckpt/pageset.py holds small page sets in
an array('Q')). Here: the numpy-free code gives the numpy code's answers on real memory, and which
commands still import numpy (run as a user runs them, under `python -X importtime`)."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ckpt.memory import COUNT_SPANS_APART, PAGE_IS_PRESENT, PAGE_IS_WRITTEN, PagemapScanner, Region
from ckpt.pageset import BigPages, SmallPages
from ckpt.proc.maps import PAGE_SIZE
from ckpt.track import available
from tests.test_startup import CKPT, ENV, _modules, imported
from tests.util import LineChannel, Target

ROOT = Path(__file__).resolve().parent.parent


def test_regions_equal_scan_arrays_over_many_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """More present runs than one PAGEMAP_SCAN call returns (VEC_LEN): the walk resumes several
    times, and the list of regions is the numpy array's, row for row, and counts the same pages."""
    n = 3 * PagemapScanner.VEC_LEN * 2 + 10
    m = mmap.mmap(-1, n * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for i in range(0, n, 2):  # every other page: one region each
            m[i * PAGE_SIZE] = 1
        for i in range(1, n, 98):  # and some runs of two
            m[i * PAGE_SIZE] = 1
        base = int(np.frombuffer(m, dtype=np.uint8, count=1).ctypes.data)
        spans = [
            (base, base + n * PAGE_SIZE // 2),
            (base + n * PAGE_SIZE // 2 + PAGE_SIZE, base + n * PAGE_SIZE),
        ]
        with PagemapScanner(os.getpid()) as s:
            both = PAGE_IS_PRESENT | PAGE_IS_WRITTEN
            for kw in (
                {"category_anyof_mask": PAGE_IS_PRESENT},
                {"category_mask": PAGE_IS_PRESENT, "return_mask": both},
            ):
                for a, b in [(base, base + n * PAGE_SIZE), *spans]:
                    got = s.regions(a, b, **kw)
                    want = s.scan_arrays(a, b, **kw)
                    assert got == [tuple(r) for r in want.tolist()]
                    assert all(type(x) is int for r in got for x in r)
                    assert s.scan(a, b, **kw) == [Region(*r) for r in got]
                assert len(s.regions(base, base + n * PAGE_SIZE, **kw)) > 2 * PagemapScanner.VEC_LEN
                want_pages = sum(
                    (e - a) // PAGE_SIZE for a, e, _ in s.scan_arrays(base, base + n * PAGE_SIZE, **kw)
                )
                assert s.count([(base, base + n * PAGE_SIZE)], **kw) == want_pages
                assert s.count(spans, **kw) == len(s.pages(spans, **kw))
                assert want_pages == len(range(0, n, 2)) + sum(1 for i in range(1, n, 98))
            # count over many spans (one walk, its regions cut to the spans) is the pages inside
            # them, and each span's own count summed: spans cut runs in the middle, and runs of
            # two cross from one span into the next
            step = n // 20 * PAGE_SIZE
            many = [(base + i * step + PAGE_SIZE, base + (i + 1) * step - 3 * PAGE_SIZE) for i in range(20)]
            touching = [(base + i * 3 * PAGE_SIZE, base + (i + 1) * 3 * PAGE_SIZE) for i in range(n // 3)]
            for sp in (many, touching, spans, many[:COUNT_SPANS_APART], many[: COUNT_SPANS_APART + 1]):
                kw = {"category_anyof_mask": PAGE_IS_PRESENT}
                got_count = s.count(sp, **kw)
                assert got_count == len(s.pages(sp, **kw))
                assert got_count == sum(s.count([x], **kw) for x in sp)
            assert s.count(touching, category_anyof_mask=PAGE_IS_PRESENT) == want_pages
            assert s.count([], category_anyof_mask=PAGE_IS_PRESENT) == 0
            # page_set is pages, through few spans (one scan each) or many (one scan, then filtered),
            # as either kind of set
            step = n // 20 * PAGE_SIZE
            many = [(base + i * step + PAGE_SIZE, base + (i + 1) * step - 3 * PAGE_SIZE) for i in range(20)]
            for limit in ("0", "100000000"):
                monkeypatch.setenv("CKPT_PAGESET_SMALL_MAX", limit)
                for sp in (spans, many, many[:3]):
                    got_set = s.page_set(sp, category_anyof_mask=PAGE_IS_PRESENT)
                    assert isinstance(got_set, BigPages if limit == "0" else SmallPages)
                    assert list(got_set) == s.pages(sp, category_anyof_mask=PAGE_IS_PRESENT).tolist()
    finally:
        m.close()


def test_pageset_alone_imports_no_numpy() -> None:
    """Small sets never load numpy; a set above the threshold does."""
    code = (
        "import sys\n"
        "from ckpt import pageset\n"
        "p = pageset.from_runs([(0x10000, 0x20000)]).union(pageset.of([0x30000, 0x10000]))\n"
        "q = pageset.from_bytes(p.to_bytes())\n"
        "assert q == p and q.runs() == [(0x10000, 0x20000), (0x30000, 0x31000)]\n"
        "assert pageset.first_unordered(q) == -1\n"
        "assert p.within([(0x1f000, 0x40000)]).isin(p) == [True, True]\n"
        "assert 'numpy' not in sys.modules, 'small sets imported numpy'\n"
        "big = pageset.from_runs([(0, (pageset.small_max() + 1) * 4096)])\n"
        "assert 'numpy' in sys.modules and len(big) == pageset.small_max() + 1\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


NOT_YET = pytest.mark.xfail(
    strict=True,
    reason="issue 9 part 3, not done yet: the page pipelines of dump and restore (dump.py, image/writer.py, "
    "format.PageIndex, image/chain.py, restore/memory.py) still hold every page set in numpy; "
    "bench/numpy_calls.py lists what is left",
)


def test_small_dump_imports_no_numpy(spawn: Callable[..., Target], tmp_path: Path) -> None:
    """The aim: a 1 MiB process's dump never imports numpy: a full dump without a tracker, a full
    dump arming uffd-wp (the default), and an incremental dump on it (its own path: the dirty scan,
    the parent's page table, the digest compare)."""
    t = spawn("rounds", "256", stderr=subprocess.DEVNULL)
    assert t.cmd("mix") == "ok"
    mods, out = imported(["dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--track", "none"])
    assert "full dump" in out
    assert "numpy" not in mods
    if not available()["uffd-wp"][0]:
        return
    mods, out = imported(["dump", "--pid", str(t.pid), "-D", str(tmp_path / "u")])
    assert "full dump" in out and "uffd-wp" in out
    assert "numpy" not in mods
    assert t.cmd("round").startswith("round")
    mods, out = imported(["dump", "--pid", str(t.pid), "-D", str(tmp_path / "u"), "--incremental"])
    assert "incremental dump" in out
    assert "numpy" not in mods


def test_small_restore_imports_no_numpy(
    spawn: Callable[..., Target], subreaper: list[int], tmp_path: Path
) -> None:
    t = spawn("rounds", "256", stderr=subprocess.DEVNULL)
    assert t.cmd("mix") == "ok"
    want = t.cmd("sum")
    d = tmp_path / "d"
    argv = ["dump", "--pid", str(t.pid), "-D", str(d), "--track", "none", "--kill"]
    subprocess.run(
        [sys.executable, "-m", "ckpt", *argv], check=True, capture_output=True, env=ENV, timeout=120
    )
    t.proc.wait()
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
