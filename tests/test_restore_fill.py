"""The restore's page fill (issue 9 part 3): chunks read into reused buffers, UFFDIO_COPY into
fresh anonymous mappings, process_vm_writev where runs are short; each restored exactly.

Restores run in the test process here, so that the fill's own figures (which path wrote what)
can be looked at, and the memory is compared with the image page for page just before the process
would run (`before_run`: all pages are in, nothing has run yet)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from ckpt.errors import CorruptLayer, RestoreError
from ckpt.image import STATE_DATA, Layer, open_layer
from ckpt.image.reader import ChunkBuffers
from ckpt.restore import memory, restore_process, restorer
from tests.test_image import anon, build, frames_of, meta_dict, page, pg, reassemble, zeros_frame
from tests.util import Target, run_ckpt


@pytest.fixture
def fills(monkeypatch: pytest.MonkeyPatch) -> list[memory.FillStats]:
    """The FillStats of every restore the test runs."""
    seen: list[memory.FillStats] = []
    real = restorer.fill_pages

    def spy(*a: object) -> memory.FillStats:
        s = real(*a)  # type: ignore[arg-type]
        seen.append(s)
        return s

    monkeypatch.setattr(restorer, "fill_pages", spy)
    return seen


@pytest.fixture
def restore_checked(subreaper: list[int]) -> Iterator[Callable[[Path], int]]:
    """restore(layer): restore it in this process, compare every dumped mapping with the image
    before the process runs, let it go; its pid (killed at the end)."""

    def _restore(layer: Path) -> int:
        seen: list[int] = []

        def check(pid: int) -> None:
            seen.append(pid)
            _assert_anon_memory_is_the_image(pid, layer)
            _no_userfaultfd_left(pid)

        with open_layer(layer) as view:
            rp = restore_process(view, before_run=check)
        subreaper.append(rp.pid)
        assert seen == [rp.pid]
        return rp.pid

    yield _restore


def _assert_anon_memory_is_the_image(pid: int, layer: Path) -> None:
    """Every dumped anonymous mapping holds the image's bytes, except the threads' rseq areas: the
    kernel writes the CPU number there each time the helper returns to user space (its injected
    syscalls), so they hold the restoring CPU's, not the dumping one's."""
    with open_layer(layer) as view:
        rseq = [th.rseq for th in view.top.threads if th.rseq is not None]
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            for v in view.top.vmas:
                if not (v.dumped and v.anonymous) or v.perms[0] != "r":
                    continue
                have = bytearray(os.pread(fd, v.end - v.start, v.start))
                want = bytearray(view.read(v.start, v.end - v.start))
                for a, n, _ in rseq:
                    lo, hi = max(a, v.start), min(a + n, v.end)
                    if lo < hi:
                        have[lo - v.start : hi - v.start] = want[lo - v.start : hi - v.start]
                if have != want:
                    bad = next(
                        i for i in range(0, len(want), 4096) if have[i : i + 4096] != want[i : i + 4096]
                    )
                    raise AssertionError(f"{layer}: page {v.start + bad:#x} differs from the image")
        finally:
            os.close(fd)


def _no_userfaultfd_left(pid: int) -> None:
    """The fill's userfaultfd is gone from the process, and no mapping is still registered."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            assert "userfaultfd" not in os.readlink(f"/proc/{pid}/fd/{fd}"), fd
    for ln in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if ln.startswith("VmFlags:"):
            assert not {"um", "uw", "ui"} & set(ln.split()[1:]), ln


def rounds(spawn: Callable[..., Target], *args: str) -> Target:
    return spawn("rounds", *args, stderr=subprocess.DEVNULL)


def dump(pid: int, d: Path, *extra: str) -> None:
    run_ckpt("dump", "--pid", str(pid), "-D", str(d), *extra, check=True)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_mixed_raw_and_compressed_chunks_restore_exactly(
    tmp_path: Path,
    spawn: Callable[..., Target],
    fills: list[memory.FillStats],
    restore_checked: Callable[[Path], int],
) -> None:
    """Random pages are stored raw, text compressed, zeros not at all: one layer holding all three
    comes back byte for byte, its big mapping through UFFDIO_COPY."""
    t = rounds(spawn, "2048")
    assert t.cmd("mix") == "ok"
    d = tmp_path / "d"
    dump(t.pid, d)
    layer = d / "layer-0001.ckpt"
    chunks = Layer.open(layer).pages.chunks
    assert any(c.raw for c in chunks) and any(not c.raw for c in chunks)
    t.close()
    pid = restore_checked(layer)
    assert fills[-1].uffd and fills[-1].uffd_copies > 0
    _kill(pid)


def test_chain_whose_later_layers_override_pages(
    tmp_path: Path,
    spawn: Callable[..., Target],
    fills: list[memory.FillStats],
    restore_checked: Callable[[Path], int],
) -> None:
    """Each round rewrites every 7th page: the top layers hold scattered single pages over a first
    layer's runs. Every page comes from its newest layer, whichever way it is written (mappings
    of short runs go by process_vm_writev), and the merged layer restores the same."""
    t = rounds(spawn, "2048")
    assert t.cmd("mix") == "ok"
    d = tmp_path / "chain"
    dump(t.pid, d)
    for i in range(3):
        t.cmd("round")
        dump(t.pid, d, "--incremental", *(["--kill"] if i == 2 else []))
    top = d / "layer-0004.ckpt"
    with open_layer(top) as v:
        pt = v.page_table()
        data = pt.layer[pt.state == STATE_DATA]
        assert {0, 1, 2, 3} <= set(data.tolist())  # every layer gives pages
    _kill(restore_checked(top))
    merged = tmp_path / "merged.ckpt"
    run_ckpt("merge", str(top), "-o", str(merged), check=True)
    _kill(restore_checked(merged))
    assert len(fills) == 2
    assert fills[0].pages == fills[1].pages
    chain, one = fills
    # The chain's region is mostly single pages: left to process_vm_writev (1024 runs a call). The
    # merged layer's is long runs, broken only by the zero pages: UFFDIO_COPY, one call a run.
    assert chain.uffd_copies < chain.runs // 2, chain
    assert one.uffd and one.runs // 2 < one.uffd_copies <= one.runs, one


def _damage(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "compressed"])
def test_corrupt_chunk_is_refused(
    tmp_path: Path, spawn: Callable[..., Target], subreaper: list[int], raw: bool
) -> None:
    """A flipped byte in a raw or a compressed chunk: read_chunk_into refuses it as read_chunk does,
    and a restore stops with one line naming the layer, leaving no process behind."""
    t = rounds(spawn, "2048")
    assert t.cmd("mix") == "ok"
    d = tmp_path / "d"
    dump(t.pid, d, "--kill")
    t.proc.wait(30)
    layer = d / "layer-0001.ckpt"
    lay = Layer.open(layer)
    bufs = ChunkBuffers()
    for ci in range(len(lay.pages.chunks)):  # intact: the same bytes as read_chunk
        assert bytes(lay.read_chunk_into(ci, bufs)) == lay.read_chunk(ci)
    ci = next(i for i, c in enumerate(lay.pages.chunks) if c.raw == raw)
    c = lay.pages.chunks[ci]
    lay.close()
    _damage(layer, c.offset + c.clen // 2)
    with Layer.open(layer) as lay2, pytest.raises(CorruptLayer, match=f"chunk {ci} .*corrupt"):
        lay2.read_chunk_into(ci, ChunkBuffers())
    with open_layer(layer) as view, pytest.raises(RestoreError, match="corrupt"):
        restore_process(view)
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1 and "corrupt" in r.stderr and layer.name in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_truncated_chunk_is_refused(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = rounds(spawn, "512")
    assert t.cmd("mix") == "ok"
    d = tmp_path / "d"
    dump(t.pid, d)
    layer = d / "layer-0001.ckpt"
    with Layer.open(layer) as lay:
        c = lay.pages.chunks[-1]
        # Cut the file inside the last chunk; the layer was opened before, so its metadata is known.
        os.truncate(layer, c.offset + c.clen // 2)
        with pytest.raises(CorruptLayer, match="truncated"):
            lay.read_chunk_into(len(lay.pages.chunks) - 1, ChunkBuffers())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda fr: zstandard.ZstdCompressor().compress(bytes(2 * 4096)), "declares 8192 bytes"),
        (lambda fr: zeros_frame(1 << 30), "declares 1073741824 bytes"),
        (lambda fr: b"\0" * 100, "not a zstd frame"),
        (lambda fr: fr + b"\x01\x02\x03", "zstd"),
        (lambda fr: fr + zstandard.ZstdCompressor().compress(b"more"), "or more, expected"),
        (lambda fr: fr[:-7], "decompressed to"),
    ],
    ids=["short", "bomb", "garbage", "trailing garbage", "second frame", "cut frame"],
)
def test_hostile_frames_are_refused_by_read_chunk_into(
    tmp_path: Path, make: Callable[[bytes], bytes], message: str
) -> None:
    """Frames whose stored checksum is right but which lie about their size, or carry more than
    one frame: refused as read_chunk refuses them, before anything is written anywhere."""
    data = {pg(i): page(i) for i in range(10)}
    path = build(tmp_path / "d", "layer-0001.ckpt", vmas=[anon(0, 16)], data=data)
    frames = frames_of(path)
    d = meta_dict(path)
    assert not d["pages"]["chunks"][1].get("raw")
    frames[1] = make(frames[1])
    reassemble(path, d, frames)
    with Layer.open(path) as layer:
        bufs = ChunkBuffers()
        assert bytes(layer.read_chunk_into(0, bufs)) == layer.read_chunk(0)
        with pytest.raises(CorruptLayer, match=rf"chunk 1 .*corrupt .*{message}"):
            layer.read_chunk_into(1, bufs)
        with pytest.raises(CorruptLayer, match=r"chunk 1 .*corrupt"):
            layer.read_chunk(1)
        assert bytes(layer.read_chunk_into(2, bufs)) == layer.read_chunk(2)  # the buffers still serve
