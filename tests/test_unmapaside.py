"""ckpt/unmapaside: a big dump's copy buffer is unmapped on a thread of its own beside the metadata
and the publish, and that thread is joined before the dump returns, whichever way it ends."""

from __future__ import annotations

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
from tests.util import Target


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
