"""`ckpt diff`: exact pages for known writes by a real process, mapping changes, dirty-but-unchanged
pages, mirror symmetry, bad input; and on synthetic layers, the corner cases and the 1 GiB timing."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckpt.api import diff as api_diff
from ckpt.diff import DiffResult, diff, ranges, runs
from ckpt.dump import dump
from ckpt.errors import CkptError, CorruptLayer
from ckpt.image import (
    PAGE_SIZE,
    FdRecord,
    FileId,
    Inventory,
    Layer,
    LayerMeta,
    LayerWriter,
    MmRecord,
    PageIndex,
    ThreadRecord,
    VmaRecord,
    open_layer,
    parent_ref,
)
from tests.util import Target, run_ckpt

PG = PAGE_SIZE
Spawn = Callable[..., Target]


# -- helpers ----------------------------------------------------------------------------------------
def pages_of(d: DiffResult, kind: str, lo: int, hi: int) -> set[int]:
    """Page addresses of one kind (changed, added, ...) in [lo, hi)."""
    arr: np.ndarray = getattr(d, kind)
    return {int(p) for p in arr if lo <= int(p) < hi}


def region_pages(base: int, idx: Iterable[int]) -> set[int]:
    return {base + i * PG for i in idx}


class Chain:
    """A memtarget and the layers dumped of it, one per step."""

    def __init__(self, spawn: Spawn, directory: Path, npages: int = 64) -> None:
        self.t = spawn("memtarget", str(npages))
        self.info = self.t.info()
        self.base = self.info["region"]
        self.end = self.base + self.info["npages"] * PG
        self.dir = directory
        self.layers: list[str] = []
        self.tracker: str | None = None

    def dump(self) -> str:
        r = dump(self.t.pid, self.dir, incremental=bool(self.layers))
        self.tracker = r.tracker
        self.layers.append(r.layer)
        return r.layer

    def cmd(self, line: str) -> str:
        out = self.t.cmd(line)
        assert out != "err" and out != "unknown", f"{line!r} -> {out!r}"
        return out

    def diff(self, i: int, j: int, **kw: Any) -> DiffResult:
        with open_layer(self.layers[i]) as a, open_layer(self.layers[j]) as b:
            return diff(a, b, **kw)


def maps_entry(pid: int, addr: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/maps") as f:
        for ln in f:
            lo, hi = (int(x, 16) for x in ln.split()[0].split("-"))
            if lo <= addr < hi:
                return lo, hi
    raise AssertionError(f"0x{addr:x} is not mapped")


def row_at(d: DiffResult, addr: int, side: str = "b") -> Any:
    for m in d.mappings:
        if any(s <= addr < e for s, e, _ in getattr(m, side)):
            return m
    rows = [m.to_dict() for m in d.mappings]
    raise AssertionError(f"no mapping row holds 0x{addr:x} on side {side}: {rows}")


# -- a real process ---------------------------------------------------------------------------------
def test_exact_changed_pages_across_a_chain_of_five(spawn: Spawn, tmp_path: Path) -> None:
    c = Chain(spawn, tmp_path / "d")
    # Region quarters: [0,16) random, [16,32) zeros, [32,48) text, [48,64) never touched.
    steps: list[tuple[list[str], set[int]]] = [
        (["write 1 2 3"], {1, 2, 3}),
        (["write 10", "fill 20 7"], {10, 20}),
        (["write 2 40"], {2, 40}),
        (["write 50 63", "fill 33 85"], {50, 63, 33}),
    ]
    c.dump()
    for cmds, _ in steps:
        for line in cmds:
            c.cmd(line)
        c.dump()
    assert len(c.layers) == 5
    for i in range(5):
        for j in range(i + 1, 5):
            want = region_pages(c.base, set().union(*(s for _, s in steps[i:j])))
            d = c.diff(i, j)
            assert pages_of(d, "changed", c.base, c.end) == want, (i, j)
            assert d.relation == "ancestor" and d.dirty_layers == j - i
            back = c.diff(j, i)
            assert pages_of(back, "changed", c.base, c.end) == want
            assert back.relation == "descendant"
            for r in (d, back):
                assert not pages_of(r, "added", c.base, c.end) and not pages_of(r, "removed", c.base, c.end)
            # The region's row holds those pages (its mapping may extend beyond the region).
            assert {int(p) for p in row_at(d, c.base).changed if c.base <= int(p) < c.end} == want


def test_a_layer_against_itself_is_empty(spawn: Spawn, tmp_path: Path) -> None:
    c = Chain(spawn, tmp_path / "d")
    c.dump()
    c.cmd("write 4 5")
    c.cmd("same 9")
    top = c.dump()
    d = c.diff(1, 1)
    assert d.empty and d.relation == "same"
    assert not len(d.changed) and not len(d.dirty_unchanged)
    assert not d.mappings and not d.threads and not d.fds
    assert d.pages_compared > 0
    # The same chain copied elsewhere is the same content: same digests, empty diff.
    shutil.copytree(tmp_path / "d", tmp_path / "copy")
    d2 = api_diff(top, tmp_path / "copy" / Path(top).name)
    assert d2.empty and d2.relation == "same"
    p = run_ckpt("diff", top, top, "--json", check=True)
    j = json.loads(p.stdout)
    assert j["empty"] is True
    assert j["changed_ranges"] == [] and j["dirty_unchanged_ranges"] == []
    assert j["added_ranges"] == [] and j["removed_ranges"] == [] and j["mappings"] == []
    p = run_ckpt("diff", top, str(tmp_path / "d"), check=True)  # a directory means its newest layer
    assert "no differences" in p.stdout


def _mirror_changes(changes: list[str]) -> frozenset[str]:
    swap = {"added": "removed", "removed": "added", "grown": "shrunk", "shrunk": "grown"}
    return frozenset(swap.get(c, c) for c in changes)


def assert_mirrors(ab: dict[str, Any], ba: dict[str, Any]) -> None:
    assert ab["changed_ranges"] == ba["changed_ranges"]
    assert ab["dirty_unchanged_ranges"] == ba["dirty_unchanged_ranges"]
    assert ab["uncompared_ranges"] == ba["uncompared_ranges"]
    assert ab["added_ranges"] == ba["removed_ranges"] and ab["removed_ranges"] == ba["added_ranges"]

    def rows(d: dict[str, Any], flip: bool) -> set[tuple[Any, ...]]:
        out = set()
        for m in d["mappings"]:
            a, b = (tuple(map(tuple, m["a"])), tuple(map(tuple, m["b"])))
            added, removed = m["pages_added"], m["pages_removed"]
            ch = frozenset(m["changes"])
            if flip:
                a, b, added, removed, ch = b, a, removed, added, _mirror_changes(m["changes"])
            out.add((a, b, ch, m["pages_changed"], added, removed, m["moved_pages_changed"]))
        return out

    assert rows(ab, False) == rows(ba, True)
    st = {"added": "removed", "removed": "added", "changed": "changed"}
    assert {(t["tid"], t["status"], tuple(t["registers"])) for t in ab["threads"]} == {
        (t["tid"], st[t["status"]], tuple(t["registers"])) for t in ba["threads"]
    }
    fs = {"opened": "closed", "closed": "opened", "changed": "changed", "moved": "moved"}
    assert {(f["fd"], f["status"]) for f in ab["fds"] if f["status"] != "moved"} == {
        (f["fd"], fs[f["status"]]) for f in ba["fds"] if f["status"] != "moved"
    }
    assert {k: v[::-1] for k, v in ab["mm"].items()} == ba["mm"]
    s1, s2 = ab["summary"], ba["summary"]
    assert (s1["pages_changed"], s1["pages_added"], s1["pages_removed"], s1["pages_dirty_unchanged"]) == (
        s2["pages_changed"], s2["pages_removed"], s2["pages_added"], s2["pages_dirty_unchanged"])  # fmt: skip


def test_mirror_symmetry(spawn: Spawn, tmp_path: Path) -> None:
    c = Chain(spawn, tmp_path / "d")
    c.dump()
    c.cmd("write 1 2")
    a = int(c.cmd("mmap 6").split()[1], 16)
    c.dump()
    c.cmd(f"mprotect {a:#x} 2 r")
    c.cmd("same 3")
    c.cmd("sbrk 20000")
    c.dump()
    c.cmd(f"munmap {a:#x} 1")
    c.cmd("fill 17 3")
    c.dump()
    b = int(c.cmd(f"mremap {a + 2 * PG:#x} 4 9").split()[1], 16)
    c.cmd("write 60")
    c.dump()
    if b != a + 2 * PG:
        assert row_at(c.diff(3, 4), b).changes == ["moved", "grown"]
        assert row_at(c.diff(4, 3), b, side="a").changes == ["moved", "shrunk"]
    for i, j in ((0, 1), (0, 2), (1, 3), (0, 3), (2, 3), (3, 4), (1, 4)):
        ab, ba = c.diff(i, j).to_dict(), c.diff(j, i).to_dict()
        assert_mirrors(ab, ba)
        assert ab["changed_ranges"], (i, j)
    assert c.diff(0, 3).to_dict()["added_ranges"]


def test_mapping_changes_are_named(spawn: Spawn, tmp_path: Path) -> None:
    c = Chain(spawn, tmp_path / "d")
    c.dump()
    a = int(c.cmd("mmap 8").split()[1], 16)
    lo, hi = maps_entry(c.t.pid, a)
    c.dump()
    d = c.diff(0, 1)
    m = row_at(d, a)
    assert pages_of(d, "added", a, a + 8 * PG) == {a + i * PG for i in range(8)}  # memtarget writes each page
    if (lo, hi) == (a, a + 8 * PG):
        assert m.changes == ["added"] and m.b == [(a, a + 8 * PG, "rw-p")] and m.a == []
    else:  # the kernel merged it with a neighbour: then it is that mapping grown
        assert "grown" in m.changes and any(s <= a and a + 8 * PG <= e for s, e in m.grown)

    c.cmd(f"mprotect {a:#x} 2 r")
    c.dump()
    d = c.diff(1, 2)
    m = row_at(d, a)
    assert "reprotected" in m.changes
    assert m.reprotected == [(a, a + 2 * PG, "rw-p", "r--p")]
    assert not len(m.changed) and not len(m.added) and not len(m.removed)

    # Grow the rest by mremap: with no room above it, the kernel moves it.
    b = int(c.cmd(f"mremap {a + 2 * PG:#x} 6 12").split()[1], 16)
    c.dump()
    d = c.diff(2, 3)
    if b != a + 2 * PG:
        m = row_at(d, b)
        assert m.changes == ["moved", "grown"]
        assert m.a == [(a + 2 * PG, a + 8 * PG, "rw-p")] and m.b == [(b, b + 12 * PG, "rw-p")]
        assert m.moved_pages_changed == 0  # the same bytes at the new place
        assert len(m.removed) == 6 and pages_of(d, "removed", a + 2 * PG, a + 8 * PG) == {
            a + i * PG for i in range(2, 8)
        }
    else:
        m = row_at(d, b)
        assert "grown" in m.changes and m.grown == [(a + 8 * PG, a + 14 * PG)]

    c.cmd(f"munmap {a:#x} 2")
    c.dump()
    d = c.diff(3, 4)
    m = row_at(d, a, side="a")
    assert m.changes == ["removed"] and m.a == [(a, a + 2 * PG, "r--p")] and m.b == []
    assert {int(p) for p in m.removed} == {a, a + PG}

    # Shrink in place, then take the access away from one page.
    assert int(c.cmd(f"mremap {b:#x} 12 4").split()[1], 16) == b
    c.dump()
    d = c.diff(4, 5)
    m = row_at(d, b)
    assert m.changes == ["shrunk"] and m.shrunk == [(b + 4 * PG, b + 12 * PG)]
    assert len(m.removed) == 8

    c.cmd(f"mprotect {b:#x} 1 none")
    c.dump()
    d = c.diff(5, 6)
    m = row_at(d, b)
    assert m.changes == ["reprotected"] and m.reprotected == [(b, b + PG, "rw-p", "---p")]
    # Its bytes are dumped in B too (read through /proc/PID/mem): compared, and the same.
    assert not len(m.uncompared) and not len(m.changed) and not len(m.removed)

    # Far apart in the chain: the mapping first seen in layer 1 is simply added, split in pieces.
    d = c.diff(0, 6)
    m = row_at(d, b)
    assert m.changes[0] in ("added", "grown")


def test_a_page_written_back_is_dirty_unchanged_not_changed(spawn: Spawn, tmp_path: Path) -> None:
    c = Chain(spawn, tmp_path / "d")
    c.dump()
    if c.tracker in (None, "hash"):
        pytest.skip(f"tracker {c.tracker} reports changed pages only; nothing is dirty but unchanged")
    c.cmd("same 5")  # random bytes rewritten with themselves
    c.cmd("fill 20 0")  # a zero page written with zeros
    c.cmd("fill 52 0")  # a never-touched page written with zeros: absent before, zero now, same bytes
    c.cmd("write 7")
    c.dump()
    d = c.diff(0, 1)
    du = pages_of(d, "dirty_unchanged", c.base, c.end)
    assert region_pages(c.base, [5, 20, 52]) <= du
    assert pages_of(d, "changed", c.base, c.end) == region_pages(c.base, [7])
    assert region_pages(c.base, [7]).isdisjoint(du)
    assert c.base + 5 * PG in {int(p) for p in Layer.open(c.layers[1]).pages.unchanged}

    # Written in one layer and back to the old bytes in the next: dirty, yet unchanged end to end.
    c.cmd("fill 25 65")
    c.dump()
    c.cmd("fill 25 0")
    c.dump()
    p25 = c.base + 25 * PG
    assert p25 in pages_of(c.diff(0, 2), "changed", c.base, c.end)
    assert p25 in pages_of(c.diff(2, 3), "changed", c.base, c.end)
    d = c.diff(0, 3)
    assert p25 not in pages_of(d, "changed", c.base, c.end)
    assert p25 in pages_of(d, "dirty_unchanged", c.base, c.end)
    du = pages_of(d, "dirty_unchanged", c.base, c.end)
    assert du == pages_of(c.diff(3, 0), "dirty_unchanged", c.base, c.end)
    # And through the CLI.
    j = json.loads(run_ckpt("diff", c.layers[0], c.layers[3], "--json", check=True).stdout)
    assert [p25, p25 + PG] in j["dirty_unchanged_ranges"]
    assert all(not (s <= p25 < e) for s, e in j["changed_ranges"])


def test_cli_json_text_and_pages(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "64")
    base = t.info()["region"]
    d = str(tmp_path / "d")
    l1 = json.loads(run_ckpt("dump", "--pid", str(t.pid), "-D", d, "--json", check=True).stdout)["layer"]
    t.cmd("write 3 4 5 9")
    t.cmd("same 12")
    p = run_ckpt("dump", "--pid", str(t.pid), "-D", d, "--incremental", "--json", check=True)
    l2 = json.loads(p.stdout)["layer"]
    j = json.loads(run_ckpt("diff", l1, l2, "--json", check=True).stdout)
    for key in ("changed_ranges", "dirty_unchanged_ranges", "added_ranges", "removed_ranges", "mappings",
                "threads", "fds", "summary"):  # fmt: skip
        assert key in j
    cr = j["changed_ranges"]
    assert [base + 3 * PG, base + 6 * PG] in cr and [base + 9 * PG, base + 10 * PG] in cr
    flat = [x for r in cr for x in r]
    assert all(x % PG == 0 for x in flat) and flat == sorted(flat) and all(s < e for s, e in cr)
    assert j["summary"]["pages_changed"] == sum((e - s) // PG for s, e in cr)
    assert j["relation"] == "ancestor" and j["same_process"] is True
    # Only the spinning thread runs between dumps; its registers differ, and are named.
    assert any(th["status"] == "changed" and th["registers"] for th in j["threads"])

    p = run_ckpt("diff", l1, l2, check=True)
    assert "page(s) changed" in p.stdout and "written but unchanged" in p.stdout
    assert "[anon]" in p.stdout and "~" in p.stdout
    p = run_ckpt("diff", l1, l2, "--pages", check=True)
    assert f"changed         {base + 3 * PG:012x}-{base + 6 * PG:012x}        3 page(s)" in p.stdout


def test_content_shows_only_differing_bytes_with_context(spawn: Spawn, tmp_path: Path) -> None:
    c = Chain(spawn, tmp_path / "d")
    c.dump()
    c.cmd("fill 21 1")
    c.dump()
    spin = c.info["spin"]  # a counter the target's second thread increments all the time
    d = c.diff(0, 1, content=spin)
    cd = d.content
    assert cd is not None and cd.addr == spin - spin % PG
    assert cd.bytes_differ is not None and 1 <= cd.bytes_differ < 64
    off = spin % PG
    line = off // 16 * 16
    # The counter's line differs; shown are exactly the differing lines and one line around each.
    # (Other bytes of the page may differ too: a GOT entry bound lazily by the first `fill`.)
    assert cd.line_diff(line)
    differing = {o for o in range(0, PG, 16) if cd.line_diff(o)}
    assert set(cd.lines) == {o for o in range(0, PG, 16) if {o - 16, o, o + 16} & differing}
    assert cd.bytes_differ == sum(len(cd.line_diff(o)) for o in cd.lines)

    page21 = c.base + 21 * PG
    cd = c.diff(0, 1, content=page21 + 100).content
    assert cd is not None and cd.bytes_differ == PG and len(cd.lines) == PG // 16
    assert cd.a_state == "data" or cd.a_state == "zero"
    assert cd.a_bytes == bytes(PG) and cd.b_bytes == b"\1" * PG

    p = run_ckpt("diff", c.layers[0], c.layers[1], "--content", hex(spin), check=True)
    assert "byte(s) differ" in p.stdout and f"+{line:04x} A" in p.stdout
    p = run_ckpt("diff", c.layers[0], c.layers[1], "--content", hex(page21), "--json", check=True)
    j = json.loads(p.stdout)
    assert j["content"]["bytes_differ"] == PG and j["content"]["lines"][0]["b"] == "01" * 16


def test_bad_input_gets_one_clear_line(spawn: Spawn, tmp_path: Path) -> None:
    c = Chain(spawn, tmp_path / "d")
    l1 = c.dump()
    c.cmd("write 1")
    l2 = c.dump()

    p = run_ckpt("diff", l1, str(tmp_path / "nope.ckpt"))
    assert p.returncode == 1 and p.stderr.startswith("ckpt: no layer at") and p.stderr.count("\n") == 1

    other = spawn("memtarget", "16")
    lo = dump(other.pid, tmp_path / "other").layer
    p = run_ckpt("diff", l1, lo)
    assert p.returncode == 1 and "different processes" in p.stderr and "--force" in p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    j = json.loads(run_ckpt("diff", l1, lo, "--force", "--json", check=True).stdout)
    assert j["same_process"] is False and j["relation"] == "unrelated" and j["dirty_unchanged_ranges"] == []

    # Damaged metadata: refused when opened, naming the layer.
    bad = tmp_path / "bad.ckpt"
    raw = bytearray(Path(l2).read_bytes())
    raw[-60] ^= 0xFF
    bad.write_bytes(raw)
    p = run_ckpt("diff", l1, str(bad))
    assert p.returncode == 1 and str(bad) in p.stderr and "corrupt" in p.stderr
    assert "Traceback" not in p.stderr

    # Damaged page data: the diff itself reads only metadata, but --content reads (and checks) pages.
    shutil.copytree(tmp_path / "d", tmp_path / "e")
    top = tmp_path / "e" / Path(l2).name
    full = tmp_path / "e" / Path(l1).name
    first = int(Layer.open(full).pages.data[0])
    raw = bytearray(full.read_bytes())
    raw[64 + 40] ^= 0xFF  # inside chunk 0
    full.write_bytes(raw)
    assert run_ckpt("diff", str(full), str(top), check=True).returncode == 0
    p = run_ckpt("diff", str(full), str(top), "--content", hex(first))
    assert p.returncode == 1 and "chunk 0" in p.stderr and "corrupt" in p.stderr
    with pytest.raises(CorruptLayer):
        api_diff(full, top, content=first)


# -- synthetic layers -------------------------------------------------------------------------------
BASE = 0x7F0000000000
FILE_AT = 0x500000000000


def stamped(idx: np.ndarray, stamp: int) -> bytes:
    """Pages that are cheap to make and compress, each unique: a number in the first 8 bytes."""
    buf = np.zeros((len(idx), PG // 8), dtype=np.uint64)
    buf[:, 0] = idx.astype(np.uint64) * np.uint64(1000003) + np.uint64(stamp)
    return buf.tobytes()


def make_layer(
    directory: Path,
    name: str,
    *,
    vmas: list[VmaRecord],
    data: tuple[np.ndarray, int] | None = None,  # (page numbers from BASE, stamp)
    raw: dict[int, bytes] | None = None,  # address -> the page's bytes
    unchanged: Iterable[int] = (),
    parent: Path | None = None,
    pid: int = 4242,
    start_time: int = 777,
    threads: list[ThreadRecord] | None = None,
    fds: list[FdRecord] | None = None,
    mm: MmRecord | None = None,
    created: float = 0.0,
) -> Path:
    inv = Inventory(pid=pid, start_time=start_time, boot_id="boot", incremental=parent is not None,
                    created=created)
    if parent is not None:
        with Layer.open(parent) as par:
            inv.parent = parent_ref(par, directory)
    uc = np.array(sorted(BASE + i * PG for i in unchanged), dtype=np.uint64)
    with LayerWriter(directory, name) as w:
        if data is not None:
            idx, stamp = data
            for lo in range(0, len(idx), 8192):
                sel = idx[lo : lo + 8192]
                w.add_pages(np.uint64(BASE) + sel.astype(np.uint64) * np.uint64(PG), stamped(sel, stamp))
        for addr in sorted(raw or {}):
            w.add_pages(np.array([addr], dtype=np.uint64), (raw or {})[addr])
        meta = LayerMeta(inventory=inv, vmas=vmas, threads=threads or [], fds=fds or [], mm=mm or MmRecord(),
                         pages=PageIndex(unchanged=uc))
        return w.finish(meta)


def anon(npages: int, start: int = BASE, perms: str = "rw-p") -> VmaRecord:
    return VmaRecord(start, start + npages * PG, perms, 0, "00:00", 0, "")


def test_one_gib_diff(tmp_path: Path) -> None:
    """Exact at 1 GiB scale. How fast is bench/bench_diff.py's business (no timed tests)."""
    n = 1 << 18  # 262144 pages: 1 GiB
    rng = np.random.default_rng(7)
    vm = [anon(n)]
    full = make_layer(tmp_path, "full.ckpt", vmas=vm, data=(np.arange(n), 1))
    written = np.sort(rng.choice(n, n // 10, replace=False))
    rest = np.setdiff1d(np.arange(n), written)
    same = np.sort(rng.choice(rest, 1000, replace=False))
    child = make_layer(tmp_path, "child.ckpt", vmas=vm, data=(written, 2), unchanged=same.tolist(),
                       parent=full)
    other = make_layer(tmp_path, "other.ckpt", vmas=vm, data=(np.arange(n), 3))
    for label, x, y in (("parent/child", full, child), ("unrelated", full, other)):
        with open_layer(x) as a, open_layer(y) as b:
            d = diff(a, b)
            d.to_dict()
        if label == "parent/child":
            assert np.array_equal(d.changed, np.uint64(BASE) + written.astype(np.uint64) * np.uint64(PG))
            assert np.array_equal(d.dirty_unchanged, np.uint64(BASE) + same.astype(np.uint64) * np.uint64(PG))
        else:
            assert len(d.changed) == n and ranges(d.changed) == [[BASE, BASE + n * PG]]


def test_siblings_and_unrelated_chains(tmp_path: Path) -> None:
    vm = [anon(64)]
    base = make_layer(tmp_path, "base.ckpt", vmas=vm, data=(np.arange(48), 1))
    c1 = make_layer(tmp_path, "c1.ckpt", vmas=vm, data=(np.array([1, 2]), 2), unchanged=[5, 6], parent=base)
    c2 = make_layer(tmp_path, "c2.ckpt", vmas=vm, data=(np.array([2, 3]), 3), unchanged=[6, 7], parent=base)
    c2b = make_layer(tmp_path, "c2b.ckpt", vmas=vm, data=(np.array([9]), 4), unchanged=[10, 3], parent=c2)
    alone = make_layer(tmp_path, "alone.ckpt", vmas=vm, data=(np.arange(48), 1), created=1.0)

    def pn(arr: np.ndarray) -> list[int]:
        return [(int(p) - BASE) // PG for p in arr]

    with open_layer(c1) as a, open_layer(c2b) as b:
        d = diff(a, b)
    assert d.relation == "siblings" and d.dirty_layers == 3
    assert pn(d.changed) == [1, 2, 3, 9]
    # Written somewhere above the common ancestor, equal in both: 5, 6, 7 and 10 (3 changed).
    assert pn(d.dirty_unchanged) == [5, 6, 7, 10]
    with open_layer(base) as a, open_layer(alone) as b:
        d = diff(a, b)
    assert d.relation == "unrelated" and d.empty and not len(d.dirty_unchanged)


def test_file_pages_compare_by_file_and_offset(tmp_path: Path) -> None:
    def fv(path: str, inode: int, offset: int = 0) -> VmaRecord:
        return VmaRecord(FILE_AT, FILE_AT + 4 * PG, "r--p", offset, "08:01", inode, path)

    la = make_layer(tmp_path, "a.ckpt", vmas=[fv("/lib/x.so", 11)])
    lb = make_layer(tmp_path, "b.ckpt", vmas=[fv("/lib/x.so", 11)])
    lc = make_layer(tmp_path, "c.ckpt", vmas=[fv("/lib/y.so", 12)])
    ld = make_layer(tmp_path, "d.ckpt", vmas=[fv("/lib/x.so", 11, PG)])
    with open_layer(la) as a, open_layer(lb) as b:
        assert diff(a, b).empty  # pages left in the same file compare equal without reading it
    with open_layer(la) as a, open_layer(lc) as c:
        d = diff(a, c)
        assert ranges(d.changed) == [[FILE_AT, FILE_AT + 4 * PG]]
        assert [m.changes for m in d.mappings] == [["removed"], ["added"]]
    with open_layer(la) as a, open_layer(ld) as e:
        d = diff(a, e)
        assert len(d.changed) == 4  # another part of the file at the same address
    # A page stored on one side and left in the file on the other is compared with the file's bytes.
    f = tmp_path / "lib.so"
    f.write_bytes(bytes(range(256)) * 16 * 4)
    st = os.stat(f)
    real = VmaRecord(FILE_AT, FILE_AT + 4 * PG, "r--p", 0, "08:01", st.st_ino, str(f), file=FileId.of(st))
    page1 = f.read_bytes()[PG : 2 * PG]
    lf = make_layer(tmp_path, "f.ckpt", vmas=[real])
    lsame = make_layer(tmp_path, "fsame.ckpt", vmas=[real], raw={FILE_AT + PG: page1})
    lother = make_layer(tmp_path, "fother.ckpt", vmas=[real], raw={FILE_AT + PG: b"\1" * PG})
    with open_layer(lf) as x, open_layer(lsame) as y, open_layer(lother) as z:
        assert diff(x, y).empty and diff(y, x).empty
        assert ranges(diff(x, z).changed) == [[FILE_AT + PG, FILE_AT + 2 * PG]]
        f.write_bytes(b"changed" + f.read_bytes()[7:])  # the file is no longer what was mapped
        assert len(diff(x, y).changed) == 1  # cannot be checked: counted as changed
    # A file mapping moved to another address is named as a move.
    moved = VmaRecord(FILE_AT + 64 * PG, FILE_AT + 68 * PG, "r--p", 0, "08:01", 11, "/lib/x.so")
    lm = make_layer(tmp_path, "m.ckpt", vmas=[moved])
    with open_layer(la) as a, open_layer(lm) as m:
        d = diff(a, m)
        assert [r.changes for r in d.mappings] == [["moved"]] and d.mappings[0].moved_pages_changed == 0


def test_threads_fds_and_mm_records(tmp_path: Path) -> None:
    def th(tid: int, **regs: int) -> ThreadRecord:
        return ThreadRecord(tid, {"rip": 1, "rsp": 2, "rax": 3, **regs}, b"x" * 64, 0, "S")

    def fd(n: int, path: str, kind: str = "file", pos: int = 0, ino: int = 1) -> FdRecord:
        return FdRecord(n, kind, path, 0o2, pos, 20, 2049, ino, 0o100644, 10, 0)

    vm = [anon(4)]
    la = make_layer(tmp_path, "a.ckpt", vmas=vm, threads=[th(10), th(11)],
                    fds=[fd(0, "/dev/pts/0", "tty", ino=3), fd(3, "/x"), fd(4, "pipe:[99]", "pipe", ino=99)],
                    mm=MmRecord(brk=0x1000))  # fmt: skip
    lb = make_layer(tmp_path, "b.ckpt", vmas=vm, threads=[th(10, rip=5, rax=9), th(12)],
                    fds=[fd(0, "/dev/pts/0", "tty", ino=3), fd(3, "/x", pos=100), fd(5, "/y", ino=7),
                         fd(7, "pipe:[99]", "pipe", ino=99)],
                    mm=MmRecord(brk=0x3000))  # fmt: skip
    with open_layer(la) as a, open_layer(lb) as b:
        d = diff(a, b)
        back = diff(b, a)
    assert [(t.tid, t.status, t.registers) for t in d.threads] == [
        (10, "changed", ["rax", "rip"]), (11, "removed", []), (12, "added", [])]  # fmt: skip
    assert [(f.fd, f.status, f.fields, f.moved_to) for f in d.fds] == [
        (3, "changed", ["pos"], None), (4, "moved", [], 7), (5, "opened", [], None)]  # fmt: skip
    assert [(f.fd, f.status, f.moved_to) for f in back.fds] == [(3, "changed", None), (5, "closed", None),
                                                                 (7, "moved", 4)]  # fmt: skip
    assert d.mm == {"brk": (0x1000, 0x3000)}
    assert_mirrors(d.to_dict(), back.to_dict())


def test_different_processes_need_force(tmp_path: Path) -> None:
    vm = [anon(4)]
    la = make_layer(tmp_path, "a.ckpt", vmas=vm, data=(np.arange(4), 1))
    lb = make_layer(tmp_path, "b.ckpt", vmas=vm, data=(np.arange(4), 1), start_time=778)  # a reused pid
    with open_layer(la) as a, open_layer(lb) as b:
        with pytest.raises(CkptError, match="different processes"):
            diff(a, b)
        d = diff(a, b, force=True)
    assert d.empty and not d.same_process


def test_runs_and_ranges() -> None:
    p = np.array([0, PG, 2 * PG, 5 * PG, 7 * PG, 8 * PG], dtype=np.uint64)
    assert runs(p).tolist() == [[0, 3 * PG], [5 * PG, 6 * PG], [7 * PG, 9 * PG]]
    assert ranges(np.zeros(0, dtype=np.uint64)) == []
