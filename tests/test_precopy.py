"""Live pre-copy inside an incremental dump (ckpt/precopy.py, issue 9 part 2): the pages written since
the parent are copied while the process runs, the freeze takes what was written meanwhile, and the
layer is still the memory at the freeze, page for page.

Writes "between the live copy and the freeze" are made deterministic by the dump's progress callback:
its "seize" note comes after the live copy and before the freeze, and the target answers each command
before the callback returns."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from ckpt.dump import dump
from ckpt.errors import TrackerError
from ckpt.image import open_layer
from ckpt.track import available
from ckpt.track.uffdwp import uffd_fds
from tests.util import PAGE, LineChannel, Target, assert_view_equals_memory, build_c, run_ckpt

Spawn = Callable[..., Target]
dump_mod = importlib.import_module("ckpt.dump")  # (ckpt.dump, the name, is the function)

pytestmark = pytest.mark.skipif(
    not available()["uffd-wp"][0], reason="uffd-wp tracking unavailable on this kernel"
)


def _stored_in(layer: str, lo: int, hi: int) -> set[int]:
    pg = open_layer(layer).layers[0].meta.pages
    return {int(a) for a in pg.data if lo <= a < hi}


def _write(t: Target, pages: Iterable[int]) -> None:
    """New bytes into these pages of the region (in commands short enough for the target's line)."""
    ps = list(pages)
    for i in range(0, len(ps), 64):
        assert t.cmd("write " + " ".join(map(str, ps[i : i + 64]))) == "ok"


def _at_seize(action: Callable[[], None]) -> Callable[[str, int, int], None]:
    """A progress callback that runs ``action`` once, when the dump is about to freeze."""
    done = [False]

    def note(phase: str, _done: int, _total: int) -> None:
        if phase == "seize" and not done[0]:
            done[0] = True
            action()

    return note


def _check(t: Target, layer: str) -> None:
    """The stopped target's memory is the layer's merged view; then it runs on, untraced."""
    try:
        assert_view_equals_memory(t.pid, layer)
        with open(f"/proc/{t.pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("info").startswith("region")


def _full(t: Target, d: Path) -> None:
    r = dump(t.pid, d, track="uffd-wp", leave_stopped=True)
    _check(t, r.layer)


def test_writes_during_the_live_copy_are_taken_in_the_freeze(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "1024")
    region = t.info()["region"]
    lo, hi = region, region + 1024 * PAGE
    d = tmp_path / "d"
    _full(t, d)
    before = list(range(0, 1024, 3))  # 342 pages written before the dump: copied live
    again = [0, 3, 300, 999]  # of those, written again after the live copy
    new = [1, 2, 500, 1023]  # written only after the live copy
    _write(t, before)

    def between() -> None:
        _write(t, again + new)

    r = dump(t.pid, d, incremental=True, precopy=True, leave_stopped=True, progress=_at_seize(between))
    _check(t, r.layer)
    want = {lo + i * PAGE for i in before + new}
    assert _stored_in(r.layer, lo, hi) == want  # exactly the written pages of the region
    # The live copy's pages of the region that were not written again are the ones it kept (1023
    # is in `before` and in `new`: written again too). At least: pages outside the region (the
    # stack, the target's data) may be kept from the live copy as well.
    assert r.pages_precopied >= len(set(before) - set(again) - set(new))
    assert r.pages_dirty >= len(want)
    assert open_layer(r.layer).layers[0].meta.inventory.consistent
    # And the next incremental, without a live copy, sees only what is written after this one.
    assert t.cmd("write 7 8") == "ok"
    r2 = dump(t.pid, d, incremental=True, precopy=False, leave_stopped=True)
    _check(t, r2.layer)
    assert r2.pages_precopied == 0
    assert _stored_in(r2.layer, lo, hi) == {lo + 7 * PAGE, lo + 8 * PAGE}


def test_mapping_replaced_after_the_live_copy(spawn: Spawn, tmp_path: Path) -> None:
    """Pages copied live from a mapping that is unmapped, and replaced by another at the same place,
    before the freeze are not taken from the live copy: the new mapping is read whole, frozen."""
    t = spawn("memtarget", "512")
    region = t.info()["region"]
    d = tmp_path / "d"
    b = int(t.cmd("mmap 40").split()[1], 16)
    _full(t, d)
    _write(t, range(0, 512, 2))  # copied live
    got: list[int] = []

    def between() -> None:
        assert t.cmd(f"munmap {region:#x} 512") == "ok"
        got.append(int(t.cmd("mmap 512").split()[1], 16))  # other bytes, most likely at the same place
        assert t.cmd(f"munmap {b:#x} 40") == "ok"  # gone

    r = dump(t.pid, d, incremental=True, precopy=True, leave_stopped=True, progress=_at_seize(between))
    try:
        assert_view_equals_memory(t.pid, r.layer)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    starts = {v.start for v in open_layer(r.layer).layers[0].meta.vmas}
    assert b not in starts
    stored = _stored_in(r.layer, region, region + 512 * PAGE)
    assert stored == ({region + i * PAGE for i in range(512)} if got[0] == region else set())


def test_streaming_while_frozen_keeps_the_pages_ascending(spawn: Spawn, tmp_path: Path) -> None:
    """A frozen copy larger than the buffer budget is written while frozen, in parts: the live pages
    go out in order between them."""
    t = spawn("memtarget", "2048")
    region = t.info()["region"]
    lo, hi = region, region + 2048 * PAGE
    d = tmp_path / "d"
    _full(t, d)
    before = list(range(1, 2048, 2))  # odd pages: live
    after = list(range(0, 2048, 2))  # even pages: in the freeze, more than the budget

    def between() -> None:
        _write(t, after)

    _write(t, before)
    r = dump(
        t.pid,
        d,
        incremental=True,
        precopy=True,
        max_buffer=300 * PAGE,
        leave_stopped=True,
        progress=_at_seize(between),
    )
    _check(t, r.layer)
    assert _stored_in(r.layer, lo, hi) == {lo + i * PAGE for i in range(2048)}
    assert r.pages_precopied >= len(before)


def test_a_failed_live_copy_takes_the_tracking_out(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live scan consumed the dirty bits: a dump that fails after it must leave no tracking that
    a later incremental could trust (it refuses), and the target runs on with no injected fd."""
    t = spawn("memtarget", "512")
    d = tmp_path / "d"
    _full(t, d)
    assert len(uffd_fds(t.pid)) == 1
    _write(t, range(300))
    real = dump_mod.copy_live

    def failing(pid: int, scanned: object, huge: int = 0) -> object:
        real(pid, scanned, huge)  # type: ignore[arg-type]
        raise OSError(5, "injected failure after the live copy")

    monkeypatch.setattr(dump_mod, "copy_live", failing)
    with pytest.raises(OSError):
        dump(t.pid, d, incremental=True, precopy=True)
    monkeypatch.undo()
    assert uffd_fds(t.pid) == []
    with pytest.raises(TrackerError):
        dump(t.pid, d, incremental=True)
    assert [p.name for p in d.glob("layer-*")] == ["layer-0001.ckpt"]  # no half-written layer
    assert t.cmd("info").startswith("region")


def test_cli_pre_copy(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "512")
    region = t.info()["region"]
    d = tmp_path / "d"
    run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--track", "uffd-wp", check=True)
    _write(t, range(0, 512, 2))
    p = run_ckpt(
        "dump", "--pid", str(t.pid), "-D", str(d), "--incremental", "--pre-copy", "--json", check=True
    )
    out = json.loads(p.stdout)
    assert out["pages_precopied"] >= 256
    assert _stored_in(out["layer"], region, region + 512 * PAGE) == {
        region + i * PAGE for i in range(0, 512, 2)
    }
    p = run_ckpt(
        "dump", "--pid", str(t.pid), "-D", str(d), "--incremental", "--no-pre-copy", "--json", check=True
    )
    assert json.loads(p.stdout)["pages_precopied"] == 0


def test_pages_dropped_after_the_live_copy_read_as_zeros(tmp_path: Path) -> None:
    """MADV_DONTNEED between the live copy and the freeze: the dropped pages are holes at the freeze,
    so the layer says they are gone (absent), whatever the live copy held (tests/targets/layout.c)."""
    p = subprocess.Popen([str(build_c("layout"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        ch = LineChannel(p, timeout=60)
        assert p.stdin is not None
        p.stdin.write(b"map 600 rw hole 0 0\nrun d 600 1\nbuild\n")
        words = ch.readline().split()
        assert words[0] == "ready", words
        a = int(words[1], 16)
        d = tmp_path / "d"
        dump(p.pid, d, track="uffd-wp")
        assert ch.cmd(f"data {a:x} 400 7") == "ok"  # pages 0-399 written: copied live

        def between() -> None:
            assert ch.cmd(f"drop {a + 100 * PAGE:x} 50") == "ok"  # 100-149: copied live, then dropped
            assert ch.cmd(f"drop {a + 500 * PAGE:x} 10") == "ok"  # 500-509: the parent's, dropped

        r = dump(p.pid, d, incremental=True, precopy=True, leave_stopped=True, progress=_at_seize(between))
        try:
            assert_view_equals_memory(p.pid, r.layer)
        finally:
            os.kill(p.pid, signal.SIGCONT)
        pages = open_layer(r.layer).layers[0].meta.pages
        stored = {int(x) for x in pages.data if a <= x < a + 600 * PAGE}
        assert stored == {a + i * PAGE for i in [*range(100), *range(150, 400)]}
        absent = {int(x) for x in pages.absent if a <= x < a + 600 * PAGE}
        assert absent == {a + i * PAGE for i in [*range(100, 150), *range(500, 510)]}
        assert r.pages_precopied >= 350
        assert ch.cmd("same 0 1".replace("0", f"{a:x}", 1)) == "ok"  # it runs on
    finally:
        p.kill()
        p.wait()


def test_merged_hands_out_every_page_once_in_order() -> None:
    """PreCopied.merged() on its own: live and frozen pages interleaved, handed out in parts (as a
    dump streaming while frozen does), each page once, ascending, with its own bytes."""
    import numpy as np

    from ckpt.memory import PageBuffer
    from ckpt.precopy import PreCopied

    def filled(addrs: list[int]) -> tuple[PageBuffer, np.ndarray]:
        b = PageBuffer(len(addrs))
        for i, a in enumerate(addrs):
            b.view[i * PAGE : (i + 1) * PAGE] = bytes([a // PAGE % 251]) * PAGE
        return b, np.array(addrs, dtype=np.uint64)

    live_addrs = [p * PAGE for p in (1, 2, 3, 7, 8, 20, 21, 22)]
    lb, la = filled(live_addrs)
    pre = PreCopied(la, lb, np.arange(len(la), dtype=np.int64), np.empty(0, np.uint64), la, 0)
    # Page 7 was written again after the live copy; page 21 is in a hole now; 30+ are not followed.
    pre.keep(
        np.array([7 * PAGE], np.uint64), [(0, 30 * PAGE)], [], np.array([[21 * PAGE, 22 * PAGE]], np.uint64)
    )
    assert [int(a) // PAGE for a in pre.addrs] == [1, 2, 3, 8, 20, 22]
    fb1, fa1 = filled([p * PAGE for p in (0, 5, 7)])
    fb2, fa2 = filled([p * PAGE for p in (9, 25)])
    out = pre.merged([(fb1, 0, fa1)], int(fa1[-1]) + 1) + pre.merged([(fb2, 0, fa2)], None)
    got: list[int] = []
    for b, first, a in out:
        for i, addr in enumerate(int(x) for x in a):
            assert (
                bytes(b.view[(first + i) * PAGE : (first + i + 1) * PAGE])
                == bytes([addr // PAGE % 251]) * PAGE
            )
            got.append(addr // PAGE)
    assert got == [0, 1, 2, 3, 5, 7, 8, 9, 20, 22, 25]
    # Nothing frozen, one run of the live buffer: handed out as it lies, no copy.
    pre2 = PreCopied(la, lb, np.arange(len(la), dtype=np.int64), np.empty(0, np.uint64), la, 0)
    assert [(b is lb, first) for b, first, _ in pre2.merged([], None)] == [(True, 0)]
    for b in (fb1, fb2):
        b.close()
    pre.close()
