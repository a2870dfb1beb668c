"""ckpt/unmapaside: a big dump's copy buffer is unmapped on a thread of its own beside the metadata
and the publish, and that thread is joined before the dump returns, whichever way it ends."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckpt.dump as dump_mod
from ckpt import unmapaside
from ckpt.dump import dump
from ckpt.errors import CkptError
from ckpt.image import Layer
from ckpt.memory import PageBuffer
from tests.test_prefault_touch import _resident
from tests.util import PAGE, Target, assert_view_equals_memory


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[threading.Thread | None, Any]]:
    seen: list[tuple[threading.Thread | None, Any]] = []

    def spy(pages: Any, locks: Any) -> threading.Thread | None:
        t = unmapaside.close_aside(pages, locks)
        seen.append((t, pages))
        return t

    monkeypatch.setattr(dump_mod, "close_aside", spy)
    return seen


def test_the_buffer_is_unmapped_aside_and_joined(
    spawn: Callable[..., Target], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unmapaside, "ASIDE_MIN", 0)
    seen = _spy(monkeypatch)
    t = spawn("rounds", "1024")
    assert t.cmd("mix") == "ok"
    r = dump(t.pid, tmp_path / "d", track="none")
    assert len(seen) == 1
    th, pages = seen[0]
    assert th is not None and th.name == "ckpt-unmap"
    assert not th.is_alive()  # joined before dump() returned
    assert pages.buffers == []  # closed
    assert not [x for x in threading.enumerate() if x.name == "ckpt-unmap"]
    with Layer.open(r.layer) as layer:
        layer.verify()
        assert len(layer.pages.data) == r.pages_dumped
    assert t.cmd("sum").startswith("sum ")  # the target runs on


def test_a_small_buffer_is_unmapped_in_place(
    spawn: Callable[..., Target], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy(monkeypatch)
    t = spawn("rounds", "256")
    dump(t.pid, tmp_path / "d", track="none")
    assert len(seen) == 1 and seen[0][0] is None and seen[0][1].buffers == []


def test_joined_when_the_dump_fails_after_it(
    spawn: Callable[..., Target], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publish fails after the unmap started: the thread is still joined before the error
    reaches the caller."""
    monkeypatch.setattr(unmapaside, "ASIDE_MIN", 0)
    seen = _spy(monkeypatch)

    def refuse(*args: Any, **kw: Any) -> Any:
        raise CkptError("refused for the test")

    monkeypatch.setattr(dump_mod, "restore_refusals", refuse)
    t = spawn("rounds", "1024")
    with pytest.raises(CkptError, match="refused for the test"):
        dump(t.pid, tmp_path / "d", track="none")
    assert len(seen) == 1 and seen[0][0] is not None
    assert not seen[0][0].is_alive()
    assert t.cmd("sum").startswith("sum ")



@pytest.mark.parametrize("aside", [True, False])
def test_the_pages_go_back_in_steps_before_the_unmap(
    spawn: Callable[..., Target], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aside: bool
) -> None:
    """The unmap thread gives the buffer's pages back RELEASE_STEP pages at a time (MADV_DONTNEED),
    every page of every buffer of its own, before it unmaps them (one munmap held the mmap lock for
    all of it); afterwards none is resident. A buffer unmapped in place (below ASIDE_MIN) is not
    stepped through. Either way the layer equals the memory and the target runs on."""
    if aside:
        monkeypatch.setattr(unmapaside, "ASIDE_MIN", 0)
    monkeypatch.setattr(unmapaside, "RELEASE_STEP", 1000)  # several steps, a partial one at the end
    events: list[tuple[str, Any, int, int, int]] = []  # (what, buffer, lo, hi, pages resident after)
    real_release, real_close = PageBuffer.release, PageBuffer.close

    def release(self: PageBuffer, lo: int, hi: int) -> None:
        real_release(self, lo, hi)
        events.append(("release", self, lo, hi, _resident(self.addr, self.npages)))

    def close(self: PageBuffer) -> None:
        events.append(("close", self, 0, 0, _resident(self.addr, self.npages)))
        real_close(self)

    monkeypatch.setattr(PageBuffer, "release", release)
    monkeypatch.setattr(PageBuffer, "close", close)
    t = spawn("rounds", "9000")  # above the small-set bound: the numpy path, 3 batches
    assert t.cmd("mix") == "ok"
    r = dump(t.pid, tmp_path / "d", track="none", leave_stopped=True)
    try:
        assert r.bytes_raw // PAGE >= 9000
        closed = [e[1] for e in events if e[0] == "close"]
        assert closed  # (the copy buffer, and any other buffer of the dump)
        for b in closed:
            steps = [(lo, hi) for what, x, lo, hi, _ in events if what == "release" and x is b]
            at_close = next(e[4] for e in events if e[0] == "close" and e[1] is b)
            if not aside:
                assert steps == [] and at_close > 0
                continue
            want = [(lo, min(lo + 1000, b.npages)) for lo in range(0, b.npages, 1000)]
            assert steps == want  # every page, in order, in steps, all before the close
            assert at_close == 0
        assert_view_equals_memory(t.pid, r.layer)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("sum").startswith("sum ")


