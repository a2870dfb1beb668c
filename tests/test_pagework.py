"""ckpt/image/pagework: the dump's gather, page digests and chunk checksums in C without the GIL.

The C path and the pure-Python one (python-xxhash, numpy's take) must give the same values and
therefore the same layers, byte for byte: a layer must not depend on whether the library was built.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from ckpt.dump import dump
from ckpt.image import Layer, pagework
from ckpt.image.format import Inventory, LayerMeta, VmaRecord
from ckpt.image.pagescan import zero_rows
from ckpt.image.writer import LayerWriter
from tests.util import Target

P = 4096
BASE = 0x10000000


@pytest.fixture
def native() -> Iterator[None]:
    """The library loaded afresh; the test fails where setup.sh could have built it and did not."""
    pagework.reset(True)
    if pagework.lib() is None:
        if shutil.which("gcc") and Path("/usr/include/xxhash.h").exists():
            pytest.fail("ckpt/image/_pagework.so is not built or not usable: run scripts/setup.sh")
        pytest.skip("no gcc or xxhash.h: the pure-Python path only")
    yield
    pagework.reset(True)


def _pages(n: int, seed: int) -> np.ndarray:
    """n pages in runs: zero, random (incompressible: raw chunks), text-like."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, P), np.uint8)
    kind = np.repeat(rng.integers(0, 3, n), rng.integers(1, 40, n))[:n]
    for i in range(n):
        if kind[i] == 1:
            out[i] = rng.integers(0, 256, P, dtype=np.uint8)
        elif kind[i] == 2:
            out[i] = np.frombuffer((b"page %08d " % i) * (P // 14) + b"\0" * (P % 14), np.uint8)
    return out


def _py_digests(pages: np.ndarray) -> list[int]:
    return [xxhash.xxh3_64_intdigest(p.tobytes()) for p in pages]


@pytest.mark.parametrize("n", [1, 2, 255, 256, 300])
def test_gather_and_digests_are_python_xxhash(native: None, n: int) -> None:
    so = pagework.lib()
    assert so is not None
    pages = _pages(2 * n + 3, n)
    rng = np.random.default_rng(n)
    rows = np.sort(rng.choice(len(pages), n, replace=False))
    out = np.full((n + 5, P), 0xAB, np.uint8)
    dg, whole = pagework.gather_digest(so, pages, rows, out)
    assert np.array_equal(out[:n], pages[rows])
    assert (out[n:] == 0xAB).all()  # nothing written past the rows
    assert dg.tolist() == _py_digests(pages[rows])
    assert whole == xxhash.xxh3_64_intdigest(pages[rows].tobytes())
    dg2, whole2 = pagework.digest_pages(so, pages[3 : 3 + n])
    assert dg2.tolist() == _py_digests(pages[3 : 3 + n])
    assert whole2 == xxhash.xxh3_64_intdigest(pages[3 : 3 + n].tobytes())


def test_zero_pages_is_zero_rows(native: None) -> None:
    """Every page position of a lone non-zero byte (words of the first, middle, last 32 bytes and
    all between are looked at differently) is seen; the answer is pagescan.zero_rows's."""
    so = pagework.lib()
    assert so is not None
    pages = np.zeros((P + 3, P), np.uint8)
    for i in range(P):
        pages[i, i] = 1 + i % 255
    pages[P + 1] = _pages(1, 5)[0] | 1
    got = pagework.zero_pages(so, pages)
    assert got.tolist() == [False] * P + [True, False, True]
    assert np.array_equal(got, zero_rows(pages))
    mix = _pages(500, 9)
    assert np.array_equal(pagework.zero_pages(so, mix), zero_rows(mix))


def test_xxh3_of_any_length(native: None) -> None:
    so = pagework.lib()
    assert so is not None
    rng = np.random.default_rng(7)
    for size in (0, 1, 16, 17, 128, 129, 240, 241, 4096, (1 << 20) + 3):
        b = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert so.ckpt_xxh3(b, len(b)) == xxhash.xxh3_64_intdigest(b)  # (the loader's probe)


def test_rows_are_bounded_before_the_c_code_sees_them(native: None) -> None:
    so = pagework.lib()
    assert so is not None
    pages = np.zeros((4, P), np.uint8)
    out = np.zeros((4, P), np.uint8)
    for rows in ([0, 4], [-1, 2]):
        with pytest.raises(ValueError):
            pagework.gather_digest(so, pages, np.array(rows), out)
    with pytest.raises(ValueError):
        pagework.gather_digest(so, pages, np.array([0, 1]), out[:1])  # more rows than room
    with pytest.raises(ValueError):
        pagework.digest_pages(so, pages[:, :100])  # not whole pages
    with pytest.raises(ValueError):
        pagework.digest_pages(so, pages[::2])  # not contiguous


def _write_layer(d: Path, pages: np.ndarray) -> Path:
    """A layer by every way the writer takes pages: add_pages, batches (zero detection, gathers and
    adjacent runs), add_rows."""
    n = len(pages)
    zero = ~pages.any(axis=1)
    with LayerWriter(d, "l.ckpt", chunk_pages=64, threads=2) as w:
        keep = [i for i in range(40) if not zero[i]]
        w.add_pages(np.array([BASE + i * P for i in keep], np.uint64), pages[keep].tobytes())
        pos = 40
        for size in (1, 37, 500, 5, 900):
            w.add_batch(np.array([BASE + i * P for i in range(pos, pos + size)], np.uint64),
                        pages[pos : pos + size], lambda z, k: None)  # fmt: skip
            pos += size
        rows = np.flatnonzero(~zero[pos:])
        w.add_rows(np.array([BASE + (pos + int(r)) * P for r in rows], np.uint64), pages[pos:], rows)
        vma = VmaRecord(start=BASE, end=BASE + n * P, perms="rw-p", offset=0, dev="00:00", inode=0, path="")
        return w.finish(LayerMeta(Inventory(pid=1), vmas=[vma]))


def test_a_layer_is_the_same_bytes_either_way(native: None, tmp_path: Path) -> None:
    pages = _pages(1800, 3)
    a = _write_layer(tmp_path / "c", pages)
    pagework.reset(False)
    assert pagework.lib() is None
    b = _write_layer(tmp_path / "py", pages)
    assert a.read_bytes() == b.read_bytes()
    with Layer.open(a) as layer:
        assert any(c.raw for c in layer.pages.chunks) and not all(c.raw for c in layer.pages.chunks)
        layer.verify()


def _chunks(path: Path) -> list[tuple[list[int], list[bytes], tuple[int, int, bool, int | None], bytes]]:
    """Each chunk of a layer: its page addresses, its pages' bytes, its record (offset aside), its
    stored bytes."""
    out = []
    with Layer.open(path) as layer, open(path, "rb") as f:
        layer.verify()
        pos = 0
        for c in layer.pages.chunks:
            addrs = [int(x) for x in layer.pages.data[pos : pos + c.npages]]
            f.seek(c.offset)
            out.append(
                (addrs, [layer.read_page(a) for a in addrs], (c.clen, c.xxh3, c.raw, c.pxxh3), f.read(c.clen))
            )
            pos += c.npages
    return out


def test_a_real_dump_stores_the_same_chunks_either_way(
    native: None, spawn: Callable[..., Target], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big dump (numpy's batches: the threshold is lowered) of one idle process, with the library
    and without: each chunk of the same pages with the same bytes in both (the first dump's injected
    code may leave a stack page changed) is stored the same, record and bytes."""
    monkeypatch.setenv("CKPT_PAGESET_SMALL_MAX", "64")
    t = spawn("rounds", "2048")
    assert t.cmd("mix") == "ok"
    dump(t.pid, tmp_path / "c", track="none")
    pagework.reset(False)
    dump(t.pid, tmp_path / "py", track="none")
    a = _chunks(next((tmp_path / "c").glob("layer-*.ckpt")))
    b = _chunks(next((tmp_path / "py").glob("layer-*.ckpt")))
    # Paired by their pages, not their place: a page the first dump's injected code made present
    # would shift the chunks after it.
    by_pages = {tuple(y[0]): y for y in b}
    same = [(x, by_pages[tuple(x[0])]) for x in a if tuple(x[0]) in by_pages]
    same = [(x, y) for x, y in same if x[1] == y[1]]
    # (the mix leaves 1536 of the region's 2048 pages non-zero; a chunk it shares with a page that
    # changed between the dumps is not compared)
    assert sum(len(x[0]) for x, _ in same) >= 1024
    for x, y in same:
        assert x[2:] == y[2:]
