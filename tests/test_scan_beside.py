"""The uffd-wp tracker's two frozen walks side by side (ckpt/track/beside.py, issue 9 part 2).

For a big process an incremental dump walks the written pages (re-protecting them) in a thread
while the holes' walk runs in the freezing thread. The layer must be the same as with the walks one
after the other: the pages written, the pages dropped (MADV_DONTNEED: holes now), the pages
populated since the parent, page for page (tests/targets/layout.c)."""

from __future__ import annotations

import importlib
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import dump
from ckpt.image import open_layer
from ckpt.track import available
from ckpt.track.beside import Result, beside
from tests.util import PAGE, LineChannel, assert_view_equals_memory, build_c

uffdwp = importlib.import_module("ckpt.track.uffdwp")


def test_beside_runs_in_a_thread_and_hands_back_its_result() -> None:
    me = threading.get_ident()
    ran_in: list[int] = []
    gate = threading.Event()

    def walk() -> int:
        ran_in.append(threading.get_ident())
        gate.wait(10)  # runs while the block runs: the block opens the gate
        return 42

    with beside(walk, True) as got:
        gate.set()
    assert got.get() == 42 and ran_in and ran_in[0] != me


def test_beside_serial_runs_first_in_the_callers_thread() -> None:
    order: list[str] = []
    with beside(lambda: order.append("walk") or 7, False) as got:
        order.append("block")
        assert got.get() == 7
    assert order == ["walk", "block"] and got.get() == 7


@pytest.mark.parametrize("parallel", [True, False])
def test_beside_raises_the_walks_error_at_get(parallel: bool) -> None:
    def walk() -> int:
        raise OSError(5, "scan failed")

    with beside(walk, parallel) as got:
        pass
    with pytest.raises(OSError, match="scan failed"):
        got.get()


def test_beside_joins_its_thread_when_the_block_fails() -> None:
    ended = threading.Event()

    def walk() -> None:
        ended.wait(0.05)  # still running when the block raises (a bounded wait, no sleep-and-hope)
        ended.set()

    with pytest.raises(ValueError), beside(walk, True):
        raise ValueError("block")
    assert ended.is_set()  # joined before the error left the block


@pytest.fixture
def layout() -> Iterator[tuple[subprocess.Popen[bytes], LineChannel, list[int]]]:
    """Three mappings with gaps between them: present data, zeros, never touched pages."""
    p = subprocess.Popen([str(build_c("layout"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        ch = LineChannel(p, timeout=60)
        assert p.stdin is not None
        p.stdin.write(
            b"map 300 rw hole 0 0\nrun d 200 1\nrun a 100 0\n"
            b"map 200 rw hole 3 0\nrun z 50 0\nrun d 150 2\n"
            b"map 100 rw guard 2 0\nrun d 100 3\nbuild\n"
        )
        words = ch.readline().split()
        assert words[0] == "ready", words
        yield p, ch, [int(w, 16) for w in words[1:]]
    finally:
        p.kill()
        p.wait()


def _pages(layer: str, lo: int, hi: int) -> tuple[set[int], set[int]]:
    """(pages stored, as data or as zero pages; pages gone) of the layer in [lo, hi)."""
    pg = open_layer(layer).layers[0].meta.pages
    stored = {int(a) for a in [*pg.data, *pg.zero] if lo <= a < hi}
    return stored, {int(a) for a in pg.absent if lo <= a < hi}


@pytest.mark.skipif(not available()["uffd-wp"][0], reason="uffd-wp tracking unavailable on this kernel")
@pytest.mark.parametrize("threshold", [0, 1 << 62], ids=["side-by-side", "one-after-the-other"])
def test_incremental_with_walks_beside_is_exact(
    layout: tuple[subprocess.Popen[bytes], LineChannel, list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    threshold: int,
) -> None:
    p, ch, (a, b, c) = layout
    seen: list[bool] = []
    real = uffdwp.beside

    def spy(fn: Callable[[], Any], parallel: bool) -> AbstractContextManager[Result[Any]]:
        seen.append(parallel)
        return real(fn, parallel)

    monkeypatch.setattr(uffdwp, "PARALLEL_BYTES", threshold)
    monkeypatch.setattr(uffdwp, "beside", spy)
    d = tmp_path / "d"
    dump(p.pid, d, track="uffd-wp")
    assert ch.cmd(f"data {a + 10 * PAGE:x} 20 9") == "ok"  # written
    assert ch.cmd(f"data {a + 250 * PAGE:x} 5 9") == "ok"  # never touched before: populated now
    assert ch.cmd(f"drop {b + 60 * PAGE:x} 30") == "ok"  # the parent's data, dropped: holes now
    assert ch.cmd(f"zero {c + 90 * PAGE:x} 4") == "ok"  # zeros over data
    r = dump(p.pid, d, incremental=True, precopy=False)
    assert_view_equals_memory(p.pid, r.layer)
    assert seen == [threshold == 0]
    stored = _pages(r.layer, a, a + 300 * PAGE)[0] | _pages(r.layer, c, c + 100 * PAGE)[0]
    want = {a + i * PAGE for i in [*range(10, 30), *range(250, 255)]} | {c + i * PAGE for i in range(90, 94)}
    assert want <= stored  # (a digest match keeps nothing out here: every byte changed)
    assert _pages(r.layer, b, b + 200 * PAGE)[1] == {b + i * PAGE for i in range(60, 90)}
    assert ch.cmd(f"same {a:x} 1") == "ok"  # it runs on
