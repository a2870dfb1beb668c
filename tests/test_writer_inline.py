"""LayerWriter's `inline_pages` (a migration's final round, ckpt/lastround.py): a chunk or batch that
small is made on the calling thread, not the pool, and the layer is byte for byte the one the pool
writes; bigger ones still go to the pool."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckpt.image import Layer, LayerWriter
from ckpt.image import writer as writer_mod
from tests import test_image
from tests.test_image import BASE, anon, build, page, pg


class _Inline(LayerWriter):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, inline_pages=4, **kw)


@pytest.fixture
def threads_seen(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The threads that made chunks."""
    seen: list[int] = []
    real = writer_mod._compress_chunk

    def spy(*args: Any) -> Any:
        seen.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(writer_mod, "_compress_chunk", spy)
    return seen


def test_inline_chunks_write_the_same_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads_seen: list[int]
) -> None:
    data = {pg(i): page(i) for i in (0, 1, 2, 5, 6, 9)}  # chunks of 4 pages: 4 + 2
    vmas = [anon(0, 16)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = build(tmp_path / "a", "layer-0001.ckpt", vmas=vmas, data=data)
    assert threads_seen and threading.get_ident() not in threads_seen  # the pool's
    threads_seen.clear()
    monkeypatch.setattr(test_image, "LayerWriter", _Inline)
    b = build(tmp_path / "b", "layer-0001.ckpt", vmas=vmas, data=data)
    assert threads_seen == [threading.get_ident()] * 2  # both chunks here
    assert a.read_bytes() == b.read_bytes()
    with Layer.open(b) as lay:
        assert [int(x) for x in lay.pages.data] == sorted(data)
        assert all(lay.read_page(x) == data[x] for x in data)


def test_bigger_than_inline_goes_to_the_pool(tmp_path: Path, threads_seen: list[int]) -> None:
    with LayerWriter(tmp_path, "layer-0001.ckpt", chunk_pages=8, inline_pages=4) as w:
        addrs = np.array([BASE + i * 4096 for i in range(8)], dtype=np.uint64)
        w.add_pages(addrs, b"".join(page(i) for i in range(8)))
        w.drain()
        w.abort()
    assert threads_seen and threading.get_ident() not in threads_seen
