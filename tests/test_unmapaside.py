"""ckpt/unmapaside: a big dump's copy buffer is unmapped on a thread of its own beside the metadata
and the publish, and that thread is joined before the dump returns, whichever way it ends."""

from __future__ import annotations

import ctypes
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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def _resident(addr: int, npages: int) -> int:
    vec = ctypes.create_string_buffer(npages)
    assert _libc.mincore(addr, npages * PAGE, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw)


@pytest.mark.parametrize("released", [True, False])
def test_the_pages_go_back_as_their_batches_are_written(
    spawn: Callable[..., Target], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, released: bool
) -> None:
    """A full dump whose buffer is unmapped afterwards gives each batch's pages back once the batch is
    written (PageBuffer.release): when the unmap starts, none of the pages it copied is still resident,
    only the buffer's unused slack. Below ASIDE_MIN (unmapped in place) every page is still there.
    Either way the layer equals the memory."""
    if released:
        monkeypatch.setattr(unmapaside, "ASIDE_MIN", 0)
    seen: list[tuple[int, int]] = []  # (resident pages, pages of the buffers) when the unmap begins

    def spy(pages: Any, locks: Any) -> threading.Thread | None:
        own = [b for b in pages.buffers if not b.borrowed]
        seen.append((sum(_resident(b.addr, b.npages) for b in own), sum(b.npages for b in own)))
        return unmapaside.close_aside(pages, locks)

    monkeypatch.setattr(dump_mod, "close_aside", spy)
    t = spawn("rounds", "9000")  # above the small-set bound: the numpy path, 3 batches of 4096 pages
    assert t.cmd("mix") == "ok"
    r = dump(t.pid, tmp_path / "d", track="none", leave_stopped=True)
    try:
        copied = r.bytes_raw // PAGE
        assert copied >= 9000 and len(seen) == 1
        resident, npages = seen[0]
        if released:
            assert resident <= npages - copied  # every copied page given back
        else:
            assert resident == npages  # faulted in before the freeze, all still there
        assert_view_equals_memory(t.pid, r.layer)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("sum").startswith("sum ")
