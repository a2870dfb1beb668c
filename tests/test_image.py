"""The layer format: round trips, chains, merge, integrity and hostile input. Pure format code:
layers are built from synthetic pages, no process is involved."""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import given, seed, settings
from hypothesis import strategies as hs

from ckpt.errors import ChainError, CkptError, CorruptLayer, LayerError, NotMapped, VersionError
from ckpt.image import (
    STATE_DATA,
    STATE_NAMES,
    STATE_ZERO,
    ZERO_PAGE_DIGEST,
    FdRecord,
    FileId,
    Inventory,
    Layer,
    LayerMeta,
    LayerWriter,
    MergedView,
    MmRecord,
    PageIndex,
    ParentRef,
    SigactionRecord,
    ThreadRecord,
    VmaRecord,
    find_layers,
    merge,
    next_layer_name,
    open_layer,
    page_digests,
    parent_ref,
)
from ckpt.image import chain as chain_mod
from ckpt.image import reader as reader_mod
from ckpt.image import writer as writer_mod
from ckpt.image.format import ADDR_LIMIT, FOOTER_SIZE, FORMAT_VERSION, HEADER_SIZE, PendingSignal, TaskRecord
from ckpt.image.framing import Footer, Header, encode_meta, meta_digest
from tests.util import HYPOTHESIS_SEED

P = 4096
BASE = 0x7F00_0000_0000


# -- building layers ------------------------------------------------------------------------------
def page(seed: int) -> bytes:
    """A deterministic, somewhat compressible page, different for every seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 8, P, dtype=np.uint8).tobytes()


def pg(i: int, base: int = BASE) -> int:
    return base + i * P


def u64(xs: Iterable[int]) -> np.ndarray:
    return np.array(sorted(xs), dtype=np.uint64)


def anon(first: int, npages: int, status: str = "dumped", base: int = BASE) -> VmaRecord:
    return VmaRecord(pg(first, base), pg(first + npages, base), "rw-p", 0, "00:00", 0, "", status)


def records() -> dict[str, Any]:
    return {
        "threads": [
            ThreadRecord(
                4242,
                {
                    "rip": 0x401000,
                    "rsp": BASE + 0x1000,
                    "fs_base": 0x7F12,
                    "gs_base": 0,
                    "orig_rax": 2**64 - 1,
                },
                bytes(range(256)) * 4,
                1 << 13,
                "t",
            ),
            ThreadRecord(4243, {"rip": 0x401010}, b"\x01" * 512, 0, "S"),
        ],
        "sigactions": [
            SigactionRecord(2, 0x401200, 0x04000000, 0x401300, 1 << 14),
            SigactionRecord(15, 1, 0, 0, 0),
        ],
        "fds": [
            FdRecord(0, "tty", "/dev/pts/0", 0o2, 0, 25, 1, 2, 0o20620, 0, 0),
            FdRecord(3, "file", "/tmp/x y", 0o2100002, 12345, 30, 2049, 77, 0o100644, 99, -5),
        ],
        "mm": MmRecord(
            start_code=0x400000,
            end_code=0x401000,
            start_brk=0x600000,
            brk=0x621000,
            start_stack=BASE,
            auxv=b"\x06\0\0\0\0\0\0\0\0\x10\0\0\0\0\0\0",
            cmdline=b"prog\0arg\0",
            environ=b"A=1\0",
            cwd="/tmp",
            root="/",
            exe="/usr/bin/prog",
            exe_file=FileId(1, 2, 3, 4),
        ),
        "task": TaskRecord(
            uid=(1000, 1001, 1002, 1001),
            gid=(100, 100, 100, 100),
            groups=[4, 24, 2**32 - 2],
            umask=0o027,
            personality=0x0040000,
            dumpable=False,
            rlimits={"nofile": (123, 4096), "stack": (8 << 20, 2**64 - 1), "cpu": (2**64 - 1, 2**64 - 1)},
            children=[4250, 4251],
            pending=[PendingSignal(4243, 10), PendingSignal(4242, 34, bytes(range(128)))],
        ),
    }


def build(
    directory: Path,
    name: str,
    *,
    vmas: list[VmaRecord],
    data: dict[int, bytes] | None = None,
    zero: Iterable[int] = (),
    absent: Iterable[int] = (),
    fresh: Iterable[tuple[int, int]] = (),
    unchanged: Iterable[int] = (),
    parent: Path | None = None,
    chunk_pages: int = 4,
    digests: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
    tracker_state: dict[Any, Any] | None = None,
) -> Path:
    data = data or {}
    with LayerWriter(directory, name, chunk_pages=chunk_pages) as w:
        addrs = sorted(data)
        if addrs:
            buf = b"".join(data[a] for a in addrs)
            w.add_pages(u64(addrs), buf, page_digests(buf) if digests is None else digests)
        ref = None
        if parent is not None:
            with Layer.open(parent) as par:
                ref = parent_ref(par, directory)
        inv = Inventory(
            pid=4242,
            start_time=777,
            boot_id="b00t",
            comm="prog",
            exe="/usr/bin/prog",
            kernel="6.8.0",
            created=1700000000.5,
            ckpt_version="0.1.0",
            tracker="soft-dirty",
            tracker_state=tracker_state if tracker_state is not None else {"armed": True, 7: [1, 2]},
            incremental=parent is not None,
            parent=ref,
            stats={"pages_total": 3, "freeze_ms": 1.25},
        )
        meta = LayerMeta(
            inventory=inv,
            vmas=vmas,
            pages=PageIndex(zero=u64(zero), absent=u64(absent), fresh=list(fresh), unchanged=u64(unchanged)),
            **(extra or {}),
        )
        return w.finish(meta)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def footer_of(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()[-FOOTER_SIZE:]
    off, length = struct.unpack_from("<QQ", raw, 8)
    return off, length


def meta_dict(path: Path) -> dict[str, Any]:
    off, length = footer_of(path)
    comp = path.read_bytes()[off : off + length]
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(comp), raw=False, strict_map_key=False)


def reassemble(path: Path, d: dict[str, Any] | bytes, frames: list[bytes] | None = None) -> None:
    """Rewrite `path` with metadata `d` (a map, or raw compressed bytes) and, if given, new chunk
    frames; every checksum is made right, so only validation can catch what `d` says."""
    raw = path.read_bytes()
    off, _ = footer_of(path)
    body = raw[HEADER_SIZE:off]
    if frames is not None:
        assert isinstance(d, dict)
        body = b"".join(frames)
        pos = HEADER_SIZE
        for c, fr in zip(d["pages"]["chunks"], frames, strict=True):
            c.update(offset=pos, clen=len(fr), xxh3=xxhash.xxh3_64_intdigest(fr))
            pos += len(fr)
    comp = d if isinstance(d, bytes) else encode_meta(d, 1)
    meta_offset = HEADER_SIZE + len(body)
    path.write_bytes(
        raw[:HEADER_SIZE] + body + comp + Footer(meta_offset, len(comp), meta_digest(comp)).pack()
    )


def frames_of(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    return [raw[c["offset"] : c["offset"] + c["clen"]] for c in meta_dict(path)["pages"]["chunks"]]


@pytest.fixture
def simple(tmp_path: Path) -> tuple[Path, dict[int, bytes]]:
    """One full layer: 10 data pages over 3 chunks, zero pages, a skipped [vsyscall]."""
    data = {pg(i): page(i) for i in range(10)}
    vsys = VmaRecord(0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, "--xp", 0, "00:00", 0, "[vsyscall]", "skipped")
    path = build(
        tmp_path / "d", "layer-0001.ckpt", vmas=[anon(0, 16), vsys], data=data, zero=[pg(12), pg(13)]
    )
    return path, data


# -- round trip -----------------------------------------------------------------------------------
def test_round_trip_every_page_and_record(tmp_path: Path) -> None:
    d = tmp_path / "dump"
    datafile = tmp_path / "lib.so"
    datafile.write_bytes(bytes(range(256)) * 64)
    fvma = VmaRecord(
        pg(0, 0x5555_0000_0000),
        pg(4, 0x5555_0000_0000),
        "r--p",
        0,
        "08:01",
        99,
        str(datafile),
        "dumped",
        FileId.of(os.stat(datafile)),
    )
    vmas = [fvma, anon(0, 64), anon(100, 2, "unreadable")]
    data = {pg(i): page(i) for i in range(0, 40, 2)}
    data[pg(1, 0x5555_0000_0000)] = page(999)
    addrs = sorted(data)
    with LayerWriter(d, "layer-0001.ckpt", chunk_pages=3) as w:
        # Three calls: bytes with digests, a writable buffer without, a read-only memoryview.
        a = u64(addrs)
        b0 = b"".join(data[x] for x in addrs[:5])
        w.add_pages(a[:5], b0, page_digests(b0))
        mutable = bytearray(b"".join(data[x] for x in addrs[5:12]))
        w.add_pages(a[5:12], mutable)
        mutable[:] = bytes(len(mutable))  # the writer copied it: reuse must not leak into the layer
        rest = np.frombuffer(b"".join(data[x] for x in addrs[12:]), dtype=np.uint8)
        w.add_pages(a[12:], rest.data)
        recs = records()
        inv = Inventory(pid=4242, start_time=1, boot_id="x", tracker="hash", tracker_state={"k": b"\0\1"})
        meta = LayerMeta(
            inventory=inv,
            vmas=vmas,
            pages=PageIndex(zero=u64([pg(50), pg(51)]), absent=u64([pg(60)])),
            **recs,
        )
        path = w.finish(meta)
    assert path == d / "layer-0001.ckpt"
    assert w.bytes_written == path.stat().st_size
    with Layer.open(path) as layer:
        assert (
            layer.digest == w.digest == xxhash.xxh3_128_hexdigest(path.read_bytes()[footer_of(path)[0] : -48])
        )
        assert layer.meta.inventory == inv
        assert layer.meta.vmas == vmas
        for k in ("threads", "sigactions", "fds", "mm", "task"):
            assert getattr(layer.meta, k) == recs[k], k
        assert layer.task is layer.meta.task
        assert layer.meta.pages == meta.pages  # the writer filled data, digests and chunks in `meta`
        assert list(layer.pages.data) == addrs
        assert [c.npages for c in layer.pages.chunks] == [3] * 7
        for addr in addrs:
            assert layer.read_page(addr) == data[addr]
        seen = {}
        for ca, cb in layer.iter_chunks():
            for j, addr in enumerate(ca):
                seen[int(addr)] = cb[j * P : (j + 1) * P]
        assert seen == data
        layer.verify()
        with pytest.raises(LayerError, match="stores no data for page"):
            layer.read_page(pg(1))
        # close() releases the file; a read reopens it.
        layer.close()
        assert layer.read_page(addrs[3]) == data[addrs[3]]


def test_layer_and_dir_modes(tmp_path: Path) -> None:
    old = os.umask(0)  # modes must not depend on the caller's umask
    try:
        path = build(tmp_path / "a" / "b", "layer-0001.ckpt", vmas=[anon(0, 2)], data={pg(0): page(0)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["layer-0001.ckpt"]


def test_empty_layer(tmp_path: Path) -> None:
    path = build(tmp_path, "layer-0001.ckpt", vmas=[anon(0, 2)])
    with Layer.open(path) as layer:
        assert len(layer.pages.data) == 0 and layer.pages.chunks == []
        layer.verify()
    view = open_layer(path)
    assert view.read(pg(0), 2 * P) == bytes(2 * P)


# -- the writer's failure paths -------------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["O_TMPFILE", "named-temp"])
def tmpfile_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The writer with O_TMPFILE, and with the named O_EXCL temp file other filesystems get."""
    monkeypatch.setattr(writer_mod, "USE_TMPFILE", request.param)
    return bool(request.param)


def test_abort_and_exception_leave_no_temp(tmp_path: Path, tmpfile_mode: bool) -> None:
    w = LayerWriter(tmp_path, "layer-0001.ckpt", chunk_pages=2)
    w.add_pages(u64([pg(0), pg(1), pg(2)]), page(0) + page(1) + page(2))
    named = [p.name for p in tmp_path.iterdir()]
    # O_TMPFILE: the file being written has no name at all until it is published.
    assert (not named) if tmpfile_mode else named[0].startswith(".layer-0001.ckpt.tmp.")
    w.abort()
    w.abort()  # idempotent
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        w.add_pages(u64([pg(5)]), page(5))

    with pytest.raises(KeyError), LayerWriter(tmp_path, "layer-0001.ckpt") as w2:
        w2.add_pages(u64([pg(0)]), page(0))
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []

    with LayerWriter(tmp_path, "layer-0001.ckpt") as w3:  # left without finish(): nothing published
        w3.add_pages(u64([pg(0)]), page(0))
    assert list(tmp_path.iterdir()) == []


def test_writer_compresses_on_a_bounded_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import ckpt.image.writer as writer_mod

    names: set[str] = set()
    real = writer_mod._compress_chunk
    # The first two chunks meet here: the first worker waits until the pool gives the second chunk
    # to the other one (it cannot take it itself), so both workers are seen, whatever the load.
    meet = threading.Barrier(2)
    first: list[bool] = []

    def spy(*a: Any) -> Any:
        names.add(threading.current_thread().name)
        if len(first) < 2:
            first.append(True)
            meet.wait(60)
        return real(*a)

    monkeypatch.setattr(writer_mod, "_compress_chunk", spy)
    data = {pg(i): page(i % 7) for i in range(64)}
    with LayerWriter(tmp_path, "l.ckpt", chunk_pages=2, threads=2) as w:
        for a in sorted(data):
            w.add_pages(u64([a]), data[a])
            assert len(w._inflight) <= writer_mod.INFLIGHT_PER_THREAD * 2  # bounded per thread
        path = w.finish(LayerMeta(Inventory(pid=1), vmas=[anon(0, 64)]))
    assert len(names) == 2 and all(n.startswith("ckpt-zstd") for n in names)
    with Layer.open(path) as layer:
        assert all(layer.read_page(a) == data[a] for a in data)


def test_add_pages_checks_its_input(tmp_path: Path) -> None:
    with LayerWriter(tmp_path, "l.ckpt") as w:
        with pytest.raises(ValueError, match="ascend"):
            w.add_pages(u64([pg(1), pg(0)])[::-1], page(0) + page(1))
        with pytest.raises(ValueError, match="bytes of data"):
            w.add_pages(u64([pg(0)]), b"x")
        with pytest.raises(ValueError, match="aligned"):
            w.add_pages(np.array([BASE + 1], dtype=np.uint64), page(0))
        w.add_pages(u64([pg(4)]), page(4))
        with pytest.raises(ValueError, match="does not come after"):
            w.add_pages(u64([pg(4)]), page(4))
        with pytest.raises(ValueError, match="above user space"):
            w.add_pages(np.array([ADDR_LIMIT], dtype=np.uint64), page(0))
    assert list(tmp_path.iterdir()) == []


def test_invalid_meta_is_refused_before_publishing(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match="refusing to write an invalid layer"),
        LayerWriter(tmp_path, "l.ckpt") as w,
    ):
        w.add_pages(u64([pg(0)]), page(0))
        w.finish(LayerMeta(Inventory(pid=1), vmas=[anon(8, 1)]))  # the data page lies in no mapping
    assert list(tmp_path.iterdir()) == []


def test_enospc(tmp_path: Path) -> None:
    """A real full filesystem (a 64 KiB tmpfs), not a mocked write: the writer's error names the
    layer and the cause, and leaves nothing behind."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        with (
            pytest.raises(CkptError, match=r"cannot write layer .*layer-0001.ckpt: No space left on device"),
            LayerWriter(small, "layer-0001.ckpt", chunk_pages=1, threads=1) as w,
        ):
            for i in range(64):  # random pages do not compress: 256 KiB into 64 KiB
                w.add_pages(u64([pg(i)]), os.urandom(4096))
            w.finish(LayerMeta(Inventory(pid=1), vmas=[anon(0, 64)]))
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_unwritable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CkptError, match="dump directory"):
        LayerWriter(tmp_path / "file" / "d", "layer-0001.ckpt")
    with pytest.raises(CkptError, match="not a directory"):
        LayerWriter(tmp_path / "file", "layer-0001.ckpt")


def test_no_clobber_unless_replace(simple: tuple[Path, dict[int, bytes]]) -> None:
    path, _ = simple
    with pytest.raises(CkptError, match="already exists"):
        build(path.parent, path.name, vmas=[anon(0, 1)])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    with LayerWriter(path.parent, path.name, replace=True) as w:
        w.finish(LayerMeta(Inventory(pid=9), vmas=[anon(0, 1)]))
    assert Layer.open(path).inventory.pid == 9


# -- chains ---------------------------------------------------------------------------------------
FBASE = 0x5555_5555_0000


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Any]:
    """Four layers over an anonymous mapping A (pages 0..15), a private file mapping F (4 pages)
    and, from layer 3, a new mapping B; with the bytes each page should read as at the top."""
    d = tmp_path / "dump"
    f = tmp_path / "mapped.bin"
    f.write_bytes(b"".join(page(1000 + i) for i in range(4)))
    fid = FileId.of(os.stat(f))
    F = VmaRecord(FBASE, FBASE + 4 * P, "rw-p", 0, "08:01", fid.ino, str(f), "dumped", fid)
    A = anon(0, 16)
    # layer 1 (full): A0..A9 data, A10 A11 zero, A12.. absent; F1 data (written), F0 F2 F3 from the file
    l1 = build(
        d,
        "layer-0001.ckpt",
        vmas=[F, A],
        data={**{pg(i): page(i) for i in range(10)}, FBASE + P: page(501)},
        zero=[pg(10), pg(11)],
    )
    # layer 2: A2 rewritten, A12 newly touched, A3 now zero, A4 dropped (MADV_DONTNEED), A5 unchanged
    l2 = build(
        d,
        "layer-0002.ckpt",
        vmas=[F, A],
        data={pg(2): page(102), pg(12): page(112)},
        zero=[pg(3)],
        absent=[pg(4)],
        unchanged=[pg(5)],
        parent=l1,
    )
    # layer 3: A8..A15 replaced by a new mapping (fresh: nothing below shows through); B new
    A_lo, A_hi = anon(0, 8), VmaRecord(pg(8), pg(16), "rw-p", 0, "00:00", 0, "", "dumped")
    B = anon(32, 4)
    l3 = build(
        d,
        "layer-0003.ckpt",
        vmas=[F, A_lo, A_hi, B],
        data={pg(9): page(209), pg(33): page(233)},
        fresh=[(pg(8), pg(16)), (pg(32), pg(36))],
        parent=l2,
    )
    # layer 4 (top): A0 rewritten; A14, A15 unmapped; F2 written
    l4 = build(
        d,
        "layer-0004.ckpt",
        vmas=[F, A_lo, anon(8, 6), B, anon(40, 1, "skipped")],
        data={pg(0): page(300), FBASE + 2 * P: page(502)},
        parent=l3,
    )
    expect: dict[int, tuple[str, int, bytes]] = {}  # addr -> (state, layer number, bytes)
    expect[pg(0)] = ("data", 4, page(300))
    expect[pg(1)] = ("data", 1, page(1))
    expect[pg(2)] = ("data", 2, page(102))
    expect[pg(3)] = ("zero", 2, bytes(P))
    expect[pg(4)] = ("absent", 2, bytes(P))
    for i in (5, 6, 7):
        expect[pg(i)] = ("data", 1, page(i))
    expect[pg(8)] = ("absent", 3, bytes(P))  # layer 1's A8 must not show through the fresh range
    expect[pg(9)] = ("data", 3, page(209))
    for i in (10, 11, 12, 13):
        expect[pg(i)] = ("absent", 3, bytes(P))
    expect[pg(32)] = ("absent", 3, bytes(P))
    expect[pg(33)] = ("data", 3, page(233))
    expect[pg(34)] = ("absent", 3, bytes(P))
    expect[pg(35)] = ("absent", 3, bytes(P))
    expect[FBASE] = ("absent", 1, page(1000))
    expect[FBASE + P] = ("data", 1, page(501))
    expect[FBASE + 2 * P] = ("data", 4, page(502))
    expect[FBASE + 3 * P] = ("absent", 1, page(1003))
    return {"dir": d, "layers": [l1, l2, l3, l4], "expect": expect, "file": f}


def test_chain_resolves(chain: dict[str, Any]) -> None:
    view = open_layer(chain["layers"][-1])
    names = [p.name for p in chain["layers"]][::-1]
    assert [x.path.name for x in view.layers] == names
    for addr, (state, num, content) in chain["expect"].items():
        st, layer = view.page_state(addr + 123)  # any address in the page
        assert (st, layer.path.name if layer else None) == (state, f"layer-{num:04d}.ckpt"), hex(addr)
        assert view.read(addr, P) == content, hex(addr)
    # A read across pages and mappings (A_lo ends at page 8, anon(8, 6) starts there).
    want = b"".join(chain["expect"][pg(i)][2] for i in range(6, 11))
    assert view.read(pg(6) + 100, 4 * P + 5) == want[100 : 100 + 4 * P + 5]


def test_chain_not_mapped(chain: dict[str, Any]) -> None:
    view = open_layer(chain["layers"][-1])
    with pytest.raises(NotMapped, match=f"address {pg(14):#x} is not mapped in .*layer-0004.ckpt"):
        view.page_state(pg(14))
    # The message names the first unmapped byte of a read that starts mapped.
    with pytest.raises(NotMapped, match=f"address {pg(14):#x} is not mapped"):
        view.read(pg(13), 2 * P)
    with pytest.raises(NotMapped, match="skipped"):
        view.read(pg(40), 1)
    with pytest.raises(NotMapped, match="0x10 is not mapped"):
        view.read(0x10, 1)


def test_absent_file_page_refuses_a_changed_file(chain: dict[str, Any]) -> None:
    view = open_layer(chain["layers"][-1])
    assert view.read(FBASE, P) == page(1000)
    f: Path = chain["file"]
    f.write_bytes(f.read_bytes()[:-1] + b"!")  # same size, new mtime
    os.utime(f, ns=(1, 1))
    with pytest.raises(LayerError, match=r"not captured .* has changed since the dump"):
        view.read(FBASE, P)
    assert view.read(FBASE + P, P) == page(501)  # pages the layers hold do not need the file
    f.unlink()
    with pytest.raises(LayerError, match="cannot be read now"):
        view.read(FBASE + 3 * P, 1)


def page_table_by_page_state(view: MergedView) -> list[tuple[int, str, int]]:
    out = []
    for v in view.top.vmas:
        if v.dumped:
            for a in range(v.start, v.end, P):
                st, layer = view.page_state(a)
                out.append((a, st, view.layers.index(layer)))  # type: ignore[arg-type]
    return out


def check_page_table(view: MergedView) -> None:
    """The table lists exactly the pages some layer names; every page it leaves out is absent."""
    pt = view.page_table()
    slow = page_table_by_page_state(view)
    named = {
        int(a)
        for layer in view.layers
        for arr in (layer.pages.data, layer.pages.zero, layer.pages.absent)
        for a in arr
    }
    listed = [(int(a), STATE_NAMES[s], int(k)) for a, s, k in zip(pt.addr, pt.state, pt.layer, strict=True)]
    assert listed == [row for row in slow if row[0] in named]
    for a, st, k in slow:
        if a not in named:
            assert st == "absent" and view.absent_layer(a) == k, hex(a)
    assert pt.total == len(slow)
    assert pt.counts()["absent"] == sum(1 for row in slow if row[1] == "absent")
    for j in range(len(pt)):
        a, s, k = int(pt.addr[j]), int(pt.state[j]), int(pt.layer[j])
        if s == STATE_DATA:
            layer = view.layers[k]
            assert int(pt.digest[j]) == xxhash.xxh3_64_intdigest(layer.read_page(a))
            assert int(layer.pages.data[pt.index[j]]) == a
        elif s == STATE_ZERO or view.vma_at(a).anonymous:
            assert int(pt.digest[j]) == ZERO_PAGE_DIGEST
        else:
            assert int(pt.digest[j]) == 0


def test_page_table_matches_page_state(chain: dict[str, Any]) -> None:
    view = open_layer(chain["layers"][-1])
    check_page_table(view)
    assert view.page_table().counts() == {"absent": 11, "zero": 1, "data": 10}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_page_table_random_chains(tmp_path: Path, seed: int) -> None:
    """Random chains of 5 layers with moving mappings and every kind of entry."""
    rng = np.random.default_rng(seed)
    prev: Path | None = None
    for k in range(5):
        # Mappings are slices of 0..200 that differ per layer.
        cuts = np.sort(rng.choice(np.arange(1, 200), 12, replace=False))
        bounds = [0, *cuts.tolist(), 200]
        vmas = [anon(lo, hi - lo) for lo, hi in zip(bounds[::2], bounds[1::2], strict=False) if hi > lo]
        inside = [i for v in vmas for i in range((v.start - BASE) // P, (v.end - BASE) // P)]
        pick = [int(x) for x in rng.permutation(inside)]
        nd, nz, na = len(pick) // 3, len(pick) // 8, len(pick) // 8
        data = {pg(i): page(1000 * k + i) for i in pick[:nd]}
        zero = [pg(i) for i in pick[nd : nd + nz]]
        absent = [pg(i) for i in pick[nd + nz : nd + nz + na]] if prev else []
        fresh = [(vmas[0].start, vmas[0].end)] if prev and k % 2 else []
        prev = build(
            tmp_path,
            f"layer-{k + 1:04d}.ckpt",
            vmas=vmas,
            data=data,
            zero=zero,
            absent=absent,
            fresh=fresh,
            parent=prev,
            chunk_pages=16,
        )
    assert prev is not None
    view = open_layer(prev)
    assert len(view.layers) == 5
    check_page_table(view)


def test_page_table_is_fast(tmp_path: Path) -> None:
    """1 GiB mapping (262144 pages) under 10 layers: resolved in well under a second."""
    n = 262144
    rng = np.random.default_rng(7)
    vma = anon(0, n)
    prev: Path | None = None
    for k in range(10):
        pick = rng.choice(n, 4000, replace=False)
        data = {pg(int(i)): page(int(i)) for i in pick[:200]}
        zero = [pg(int(i)) for i in pick[200:2200]]
        absent = [pg(int(i)) for i in pick[2200:]] if prev else []
        prev = build(
            tmp_path,
            f"layer-{k + 1:04d}.ckpt",
            vmas=[vma],
            data=data,
            zero=zero,
            absent=absent,
            parent=prev,
            chunk_pages=64,
        )
    assert prev is not None
    view = open_layer(prev)
    pt = view.page_table()  # its speed is bench/bench_diff.py's business
    assert pt.total == n and len(pt) < n  # only the pages some layer names are rows
    sample = rng.choice(len(pt), 300, replace=False)
    for j in sample:
        st, layer = view.page_state(int(pt.addr[j]))
        assert (st, view.layers.index(layer)) == (STATE_NAMES[pt.state[j]], pt.layer[j])  # type: ignore[arg-type]


# -- merge ----------------------------------------------------------------------------------------
def test_merge_equals_chain(chain: dict[str, Any]) -> None:
    view = open_layer(chain["layers"][-1])
    out = merge(view, chain["dir"] / "merged.ckpt")
    merged = open_layer(out)
    assert len(merged.layers) == 1
    inv = merged.top.inventory
    assert inv.parent is None and inv.incremental is False
    assert inv.tracker_state == view.top.inventory.tracker_state
    assert inv.pid == 4242 and inv.created == view.top.inventory.created
    assert inv.stats["pages_dumped"] == 10 and inv.stats["pages_zero"] == 1 and inv.stats["pages_total"] == 22
    assert inv.stats["layers_merged"] == 4
    assert merged.top.vmas == view.top.vmas
    a, b = view.page_table(), merged.page_table()
    assert np.array_equal(a.addr, b.addr) and np.array_equal(a.state, b.state)
    assert np.array_equal(a.digest, b.digest)
    for v in view.top.vmas:
        if v.dumped:
            assert merged.read(v.start, v.end - v.start) == view.read(v.start, v.end - v.start)
    merged.verify()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


# -- integrity ------------------------------------------------------------------------------------
def test_missing_and_not_a_layer(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match=f"no layer at {tmp_path / 'nope.ckpt'}"):
        Layer.open(tmp_path / "nope.ckpt")
    with pytest.raises(LayerError, match="is a directory"):
        Layer.open(tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CorruptLayer, match="the file is empty"):
        Layer.open(tmp_path / "empty")
    (tmp_path / "text").write_bytes(b"hello, world, this is not a layer" * 10)
    with pytest.raises(CorruptLayer, match="not a ckpt layer"):
        Layer.open(tmp_path / "text")


def corrupt_cases(path: Path) -> list[tuple[str, int]]:
    size = path.stat().st_size
    meta_offset, meta_len = footer_of(path)
    chunks = meta_dict(path)["pages"]["chunks"]
    return [
        ("magic", 0),
        ("header", 9),
        ("header", 13),
        ("header", 20),
        ("header", 30),
        ("header", 40),
        ("header", 60),
        ("chunk0", chunks[0]["offset"]),
        ("chunk1", chunks[1]["offset"] + chunks[1]["clen"] // 2),
        ("chunk2", chunks[2]["offset"] + chunks[2]["clen"] - 1),
        ("metadata", meta_offset),
        ("metadata", meta_offset + meta_len // 2),
        ("metadata", size - 49),
        ("footer", size - 48),
        ("footer", size - 40),
        ("footer", size - 30),
        ("footer", size - 12),
        ("footer", size - 1),
    ]


@pytest.mark.parametrize("i", range(18))
def test_flipped_byte_names_the_part(simple: tuple[Path, dict[int, bytes]], i: int) -> None:
    path, data = simple
    part, off = corrupt_cases(path)[i]
    flip(path, off)
    if part.startswith("chunk"):
        ci = int(part[5:])
        layer = Layer.open(path)  # the chunks are not read on open
        addr = int(layer.chunk_addrs(ci)[0])
        where = f"chunk {ci} at offset {layer.pages.chunks[ci].offset}"
        with pytest.raises(CorruptLayer, match=f"layer {path}: {where} is corrupt"):
            layer.read_page(addr)
        with pytest.raises(CorruptLayer, match=where):
            layer.verify()
        with pytest.raises(CorruptLayer, match=where):
            list(layer.iter_chunks())
        with pytest.raises(CorruptLayer, match=where):
            open_layer(path).read(addr, 1)
        assert layer.read_page(pg(0) if ci else pg(9)) in data.values()  # other chunks still read
        return
    expect = {
        "magic": "not a ckpt layer",
        "header": "header is corrupt",
        "metadata": "metadata is corrupt",
        "footer": "footer is",
    }[part]
    with pytest.raises(CorruptLayer, match=expect) as e:
        Layer.open(path)
    assert str(path) in str(e.value)


def test_every_byte_is_covered(tmp_path: Path) -> None:
    """Flip bytes all over a small layer: each is caught, on open or by verify."""
    path = build(
        tmp_path, "l.ckpt", vmas=[anon(0, 8)], data={pg(i): bytes([i]) * P for i in range(6)}, chunk_pages=2
    )
    good = path.read_bytes()
    for off in range(0, len(good), max(1, len(good) // 400)):
        path.write_bytes(good)
        flip(path, off)
        with pytest.raises(CorruptLayer):
            Layer.open(path).verify()


def test_verify_sees_changes_after_open(simple: tuple[Path, dict[int, bytes]]) -> None:
    path, _ = simple
    layer = Layer.open(path)
    layer.verify()
    flip(path, footer_of(path)[0] + 3)
    with pytest.raises(CorruptLayer, match="metadata is corrupt"):
        layer.verify()


def test_page_digest_mismatch(tmp_path: Path) -> None:
    data = {pg(i): page(i) for i in range(6)}
    dg = page_digests(b"".join(data[a] for a in sorted(data)))
    dg[4] ^= 1  # a writer that recorded a wrong digest for page 4
    path = build(tmp_path, "l.ckpt", vmas=[anon(0, 8)], data=data, digests=dg)
    layer = Layer.open(path)
    assert layer.read_page(pg(3)) == data[pg(3)]
    with pytest.raises(CorruptLayer, match=f"page {pg(4):#x} digest mismatch"):
        layer.read_page(pg(4))
    with pytest.raises(CorruptLayer, match=f"page {pg(4):#x} digest mismatch"):
        layer.verify()
    # The chunk's own checksum of its pages (format 2) vouches for the bytes, not for the digests:
    # read_chunk checks them unless told not to (a restore, which does not use them, says so).
    ci = int(layer.chunk_of(4))
    want = b"".join(data[int(a)] for a in layer.chunk_addrs(ci))
    layer.close()
    assert layer.read_chunk(ci, check_digests=False) == want
    with pytest.raises(CorruptLayer, match=f"page {pg(4):#x} digest mismatch"):
        layer.read_chunk(ci)
    assert layer.read_chunk(ci, check_digests=False) == want


def test_unknown_version(simple: tuple[Path, dict[int, bytes]]) -> None:
    path, _ = simple
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 8, FORMAT_VERSION + 1)
    struct.pack_into("<Q", raw, 56, xxhash.xxh3_64_intdigest(bytes(raw[:56])))
    path.write_bytes(bytes(raw))
    with pytest.raises(
        VersionError,
        match=f"layer {path} has format version {FORMAT_VERSION + 1}; this ckpt reads version 1 or 2 or 3",
    ):
        Layer.open(path)
    # A newer version may have a bigger header: only the stable prefix and the checksum are read.
    big = bytearray(raw[:16] + bytes(112))
    struct.pack_into("<II", big, 8, 9, 128)
    struct.pack_into("<Q", big, 120, xxhash.xxh3_64_intdigest(bytes(big[:120])))
    path.write_bytes(bytes(big) + bytes(500))
    with pytest.raises(VersionError, match="format version 9; this ckpt reads version 1 or 2 or 3"):
        Layer.open(path)


def test_header_round_trip() -> None:
    h = Header(chunk_pages=99)
    assert len(h.pack()) == HEADER_SIZE
    assert Header.unpack(h.pack(), Path("x")) == h


@pytest.mark.parametrize("cut", [1, 10, 63, 64, 100, -49, -48, -47, -1])
def test_truncated(simple: tuple[Path, dict[int, bytes]], cut: int) -> None:
    path, _ = simple
    raw = path.read_bytes()
    path.write_bytes(raw[:cut])
    with pytest.raises(CorruptLayer, match=str(path)):
        Layer.open(path)


def test_truncated_after_open(simple: tuple[Path, dict[int, bytes]]) -> None:
    path, _ = simple
    layer = Layer.open(path)
    with open(path, "r+b") as f:
        f.truncate(HEADER_SIZE + 10)
    with pytest.raises(CorruptLayer, match=r"chunk 0 at offset 64 is (truncated|corrupt)"):
        layer.read_page(pg(0))
    with pytest.raises(CorruptLayer, match="changed size"):
        layer.verify()


def test_parent_missing_or_replaced(chain: dict[str, Any]) -> None:
    l1, l2, _, l4 = chain["layers"]
    keep = l2.read_bytes()
    l2.unlink()
    with pytest.raises(ChainError, match=f"parent layer {l2} of .*layer-0003.ckpt is missing"):
        open_layer(l4)
    # Another layer under the same name: well-formed, but not the one layer 3 recorded.
    build(l2.parent, l2.name, vmas=[anon(0, 16)], data={pg(0): page(77)}, parent=l1)
    with pytest.raises(
        ChainError, match=f"parent layer {l2} no longer matches what .*layer-0003.ckpt recorded"
    ):
        open_layer(l4)
    l2.write_bytes(keep)
    assert len(open_layer(l4).layers) == 4
    flip(l2, footer_of(l2)[0] + 1)  # a damaged parent is named as such
    with pytest.raises(CorruptLayer, match=f"layer {l2}: metadata is corrupt"):
        open_layer(l4)


def test_chain_moves_as_a_whole(chain: dict[str, Any], tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    chain["dir"].rename(moved)
    view = open_layer(moved / "layer-0004.ckpt")
    assert view.read(pg(2), P) == page(102)


def test_chain_guards(chain: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    l1, _, l3, l4 = chain["layers"]
    monkeypatch.setattr(chain_mod, "MAX_CHAIN", 3)
    with pytest.raises(ChainError, match="longer than 3 layers"):
        open_layer(l4)
    monkeypatch.undo()
    # A chain that loops back (here by making layer 1 name layer 3 as its parent).
    real = Layer.parent

    def looping(self: Layer, memo: Any = None) -> Layer | None:
        return Layer.open(l3) if self.path == l1 else real(self, memo)

    real_inv = Layer.inventory.fget  # type: ignore[attr-defined]

    def inventory(self: Layer) -> Inventory:
        inv = real_inv(self)
        return dataclasses.replace(inv, parent=ParentRef("x", "0" * 32)) if self.path == l1 else inv

    monkeypatch.setattr(Layer, "parent", looping)
    monkeypatch.setattr(Layer, "inventory", property(inventory))
    with pytest.raises(ChainError, match="loops"):
        MergedView(Layer.open(l4))


def test_long_chain_releases_fds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain_mod, "KEEP_OPEN", 2)
    prev = None
    for k in range(5):
        prev = build(
            tmp_path, f"layer-{k + 1:04d}.ckpt", vmas=[anon(0, 8)], data={pg(k): page(k)}, parent=prev
        )
    assert prev is not None
    view = open_layer(prev)
    assert [layer._fd >= 0 for layer in view.layers] == [True, True, False, False, False]
    assert view.read(pg(0), P) == page(0)  # from the bottom layer, reopened on demand


# -- hostile metadata -----------------------------------------------------------------------------
def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def f(d: dict[str, Any]) -> None:
        obj: Any = d
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    return f


def _addr_bytes(addrs: list[int]) -> bytes:
    return np.array(addrs, dtype="<u8").tobytes()


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "huge npages": (_set(["pages", "chunks", 0, "npages"], 1 << 40), r"chunks\[0\].npages"),
    "unsorted addrs": (
        _set(["pages", "data"], _addr_bytes([pg(i) for i in (1, 0, 2, 3, 4, 5, 6, 7, 8, 9)])),
        "not sorted strictly ascending",
    ),
    "duplicate addrs": (
        _set(["pages", "data"], _addr_bytes([pg(i) for i in (0, 0, 2, 3, 4, 5, 6, 7, 8, 9)])),
        "not sorted strictly ascending",
    ),
    "chunk past EOF": (_set(["pages", "chunks", 2, "offset"], 1 << 40), r"chunks\[2\]: offset"),
    "chunks short of the area": (_set(["pages", "chunks", 2, "clen"], 1), "chunk area ends at"),
    "misaligned": (_set(["pages", "zero"], _addr_bytes([BASE + 5])), "not page-aligned"),
    "kernel address": (_set(["pages", "zero"], _addr_bytes([0xFFFF_8000_0000_0000])), "is not below"),
    "odd array": (_set(["pages", "zero"], b"\0" * 12), "not a whole number of u64"),
    "zero and data": (_set(["pages", "zero"], _addr_bytes([pg(3)])), "in both 'data' and 'zero'"),
    "zero and absent": (_set(["pages", "absent"], _addr_bytes([pg(12)])), "in both 'zero' and 'absent'"),
    "digests short": (_set(["pages", "digests"], b"\0" * 8), "1 digests for 10 data pages"),
    "page outside mappings": (_set(["pages", "absent"], _addr_bytes([pg(100)])), "not inside a mapping"),
    "pid a string": (_set(["inventory", "pid"], "4242"), r"inventory.pid: expected an integer"),
    "pid a bool": (_set(["inventory", "pid"], True), r"inventory.pid: expected an integer"),
    "negative size": (_set(["mm", "start_brk"], -1), r"mm.start_brk: -1 is outside"),
    "bad perms": (_set(["vmas", 0, "perms"], "rwzp"), r"vmas\[0\].perms"),
    "overlapping vmas": (_set(["vmas", 1, "start"], BASE + 4 * P), r"vmas\[1\]: 0x.* overlaps"),
    "dumped vma in kernel space": (_set(["vmas", 1, "status"], "dumped"), "above user space"),
    "bad status": (_set(["vmas", 0, "status"], "maybe"), "is not one of"),
    "bad parent digest": (_set(["inventory", "parent"], {"path": "x", "digest": "zz"}), "32 lowercase hex"),
    "incremental without parent": (_set(["inventory", "incremental"], True), "must name its parent"),
    "unknown version": (_set(["inventory", "version"], 9), "this ckpt reads version 1 or 2 or 3 or 4 or 5"),
    "version mismatch": (_set(["inventory", "version"], 1),
                         f"version 1 but the header says {FORMAT_VERSION}$"),
    "missing field": (lambda d: d["mm"].pop("brk"), "mm: missing field 'brk'"),
    "fresh reversed": (_set(["pages", "fresh"], [[pg(4), pg(2)]]), r"fresh\[0\]"),
    "fresh overlapping": (
        _set(["pages", "fresh"], [[pg(0), pg(4)], [pg(2), pg(6)]]),
        "not sorted and disjoint",
    ),
    "page size": (_set(["pages", "page_size"], 65536), "4096-byte pages"),
    "chunk_pages vs header": (_set(["pages", "chunk_pages"], 5), "chunk_pages differs"),
    "duplicate tid": (
        _set(["threads"], [{"tid": 1, "regs": {}, "xsave": b"", "sigmask": 0, "state": "S"}] * 2),
        "thread id appears twice",
    ),
    "xsave huge": (
        _set(["threads"], [{"tid": 1, "regs": {}, "xsave": bytes(2 << 20), "sigmask": 0, "state": "S"}]),
        "more than the",
    ),
    "regs not a map": (
        _set(["threads"], [{"tid": 1, "regs": [], "xsave": b"", "sigmask": 0, "state": "S"}]),
        "expected a map",
    ),
    "signal 65": (
        _set(["sigactions"], [{"sig": 65, "handler": 0, "flags": 0, "restorer": 0, "mask": 0}]),
        r"sigactions\[0\].sig",
    ),
    "not a map": (lambda d: d.clear(), "missing field"),
    "no task": (lambda d: d.pop("task"), "metadata: missing field 'task'"),
    "task field missing": (lambda d: d["task"].pop("umask"), "task: missing field 'umask'"),
    "three uids": (_set(["task", "uid"], [1, 2, 3]), r"task.uid: 3 ids; expected real, effective"),
    "uid -1": (_set(["task", "gid"], [0, 0, 0, 2**32 - 1]), r"task.gid\[3\]: 4294967295 is outside"),
    "umask": (_set(["task", "umask"], 0o1000), r"task.umask: 512 is outside"),
    "too many groups": (_set(["task", "groups"], [1] * 65537), r"task.groups: 65537 entries, more than"),
    "unknown rlimit": (_set(["task", "rlimits"], {"files": [1, 2]}), r"task.rlimits: 'files' is not one of"),
    "soft above hard": (
        _set(["task", "rlimits"], {"nofile": [10, 5]}),
        r"task.rlimits.nofile: soft limit 10 is above the hard limit 5",
    ),
    "rlimit not a pair": (_set(["task", "rlimits"], {"nofile": [10]}), r"task.rlimits.nofile: expected"),
    "child twice": (_set(["task", "children"], [7, 7]), r"task.children: a pid appears twice"),
    "child pid 0": (_set(["task", "children"], [0]), r"task.children\[0\]: 0 is outside"),
    "signal of no thread": (
        _set(["task", "pending"], [{"tid": 7, "sig": 10, "info": None}]),
        r"task.pending\[0\].tid: 7 is not one of the layer's threads",
    ),
    "short siginfo": (
        _set(["task", "pending"], [{"tid": 7, "sig": 10, "info": b"\0" * 5}]),
        r"task.pending\[0\].info: 5 bytes; a siginfo_t is 128",
    ),
    "pending flood": (
        _set(["task", "pending"], [{"tid": 7, "sig": 10, "info": None}] * 65537),
        r"task.pending: 65537 entries, more than",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_metadata_is_rejected(simple: tuple[Path, dict[int, bytes]], case: str) -> None:
    path, _ = simple
    mutate, message = HOSTILE[case]
    d = meta_dict(path)
    mutate(d)
    reassemble(path, d)
    with pytest.raises(CorruptLayer, match=message) as e:
        Layer.open(path)
    assert f"layer {path}: metadata is invalid" in str(e.value)


@pytest.mark.parametrize(
    "comp, message",
    [
        (zstandard.ZstdCompressor().compress(b"\xc1"), "msgpack"),
        (zstandard.ZstdCompressor().compress(msgpack.packb([1, 2])), "not a map"),
        (b"not zstd at all", "not a zstd frame"),
        (zstandard.ZstdCompressor(write_content_size=False).compress(msgpack.packb({})), "does not declare"),
        (zstandard.ZstdCompressor().compress(bytes(65 << 20)), "more than the .* allowed"),
        (zstandard.ZstdCompressor().compress(msgpack.packb({}) + b"\x01"), "msgpack"),
    ],
    ids=["msgpack", "list", "zstd", "no size", "bomb", "trailing"],
)
def test_hostile_metadata_encoding(simple: tuple[Path, dict[int, bytes]], comp: bytes, message: str) -> None:
    path, _ = simple
    reassemble(path, comp)
    with pytest.raises(CorruptLayer, match=f"metadata is corrupt .*{message}"):
        Layer.open(path)


def test_deeply_nested_msgpack_is_refused(simple: tuple[Path, dict[int, bytes]]) -> None:
    path, _ = simple
    reassemble(path, zstandard.ZstdCompressor().compress(b"\x91" * 200000 + b"\xc0"))
    with pytest.raises(CorruptLayer, match="metadata is corrupt"):
        Layer.open(path)


def zeros_frame(n: int) -> bytes:
    """A small frame that decompresses to `n` zero bytes, made without holding them in memory."""
    c = zstandard.ZstdCompressor().compressobj(size=n)
    mib = bytes(1 << 20)
    out = [c.compress(mib) for _ in range(n >> 20)]
    return b"".join(out) + c.flush()


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: zstandard.ZstdCompressor().compress(bytes(2 * P)),
            "frame declares 8192 bytes, expected 16384",
        ),
        (lambda: zeros_frame(1 << 30), "declares 1073741824 bytes"),
        (
            lambda: zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4 * P)),
            "does not declare",
        ),
        (lambda: b"\0" * 100, "not a zstd frame"),
    ],
    ids=["short", "bomb", "no size", "garbage"],
)
def test_hostile_chunk_frames(
    simple: tuple[Path, dict[int, bytes]], make: Callable[[], bytes], message: str
) -> None:
    """Frames with right checksums that lie about their size are refused before decompressing."""
    path, _ = simple
    frames = frames_of(path)
    frames[1] = make()
    reassemble(path, meta_dict(path), frames)
    layer = Layer.open(path)
    assert layer.read_page(pg(0)) == page(0)
    with pytest.raises(
        CorruptLayer, match=f"chunk 1 at offset {layer.pages.chunks[1].offset} is corrupt .*{message}"
    ):
        layer.read_page(pg(4))
    with pytest.raises(CorruptLayer, match="chunk 1"):
        layer.verify()


def test_check_chunks_reads_checksums_only(
    simple: tuple[Path, dict[int, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layer.check_chunks checks the frames' xxh3 without decompressing: a frame that would expand
    to 1 GiB but carries the right checksum passes it (read_chunk refuses it), a flipped byte does not."""
    path, _ = simple
    frames = frames_of(path)
    frames[1] = zeros_frame(1 << 30)
    reassemble(path, meta_dict(path), frames)

    def no_decompressor() -> zstandard.ZstdDecompressor:
        raise AssertionError("check_chunks asked for a decompressor")

    with Layer.open(path) as layer:
        # Every decompression goes through reader._dctx: none asked is none done. (Was a wall-clock
        # bound of 0.5 s, which a loaded machine can miss without any decompression.)
        with monkeypatch.context() as m:
            m.setattr(reader_mod, "_dctx", no_decompressor)
            layer.check_chunks(np.arange(len(layer.pages.chunks)))
        with pytest.raises(CorruptLayer, match=r"chunk 1 .* declares 1073741824 bytes"):
            layer.read_chunk(1)
        with pytest.raises(IndexError, match="has no chunk 3"):
            layer.check_chunks([0, 3])
        off = layer.pages.chunks[2].offset
    flip(path, off + 3)
    with Layer.open(path) as layer:  # the metadata holds the checksums: it is still whole
        layer.check_chunks([0, 1])
        layer.close()  # a closed layer reopens its file
        with pytest.raises(CorruptLayer, match=rf"chunk 2 at offset {off} is corrupt \(checksum mismatch\)"):
            layer.check_chunks([2])
        layer.check_chunks([])


def test_records_from_dict_report_where() -> None:
    from ckpt.image import MetaError

    with pytest.raises(MetaError, match=r"vmas\[3\]: start 0x2000 is not below end 0x1000"):
        VmaRecord.from_dict({**anon(0, 1).to_dict(), "start": 0x2000, "end": 0x1000}, "vmas[3]")
    rec = anon(0, 1)
    assert VmaRecord.from_dict(rec.to_dict(), "v") == rec


# -- names ----------------------------------------------------------------------------------------
def test_find_layers_and_next_name(tmp_path: Path) -> None:
    d = tmp_path / "dump"
    assert find_layers(d) == []
    assert next_layer_name(d) == "layer-0001.ckpt"
    d.mkdir()
    for n in (
        "layer-0002.ckpt",
        "layer-0010.ckpt",
        "layer-0001.ckpt",
        "layer-12345.ckpt",
        ".layer-0003.ckpt.tmp.9",
        "layer-7.ckpt",
        "notes.txt",
        "merged.ckpt",
    ):
        (d / n).write_bytes(b"")
    assert [p.name for p in find_layers(d)] == [
        "layer-0001.ckpt",
        "layer-0002.ckpt",
        "layer-0010.ckpt",
        "layer-12345.ckpt",
    ]
    assert next_layer_name(d) == "layer-12346.ckpt"


def test_parent_ref_is_relative(chain: dict[str, Any]) -> None:
    with Layer.open(chain["layers"][1]) as l2:
        ref = l2.inventory.parent
        assert ref is not None and ref.path == "layer-0001.ckpt"
        assert ref.digest == Layer.open(chain["layers"][0]).digest


# -- issue 13: bounded metadata, tracker_state, offsets ---------------------------------------------
def _empty_map_bomb(n: int, arrays: int) -> bytes:
    """`arrays` msgpack arrays of n // arrays empty maps each, under the vmas key: ~n bytes that
    an unbounded decoder turns into n dicts (64 MiB: 4.6 GB)."""
    per = n // arrays
    inner = b"\xdd" + struct.pack(">I", per) + b"\x80" * per
    raw = b"\x81\xa4vmas\xdc" + struct.pack(">H", arrays) + inner * arrays
    return zstandard.ZstdCompressor(write_content_size=True).compress(raw)


@pytest.mark.parametrize("arrays", [1, 32])
def test_metadata_bomb_is_refused_before_it_is_built(
    simple: tuple[Path, dict[int, bytes]], arrays: int
) -> None:
    path, _ = simple
    comp = _empty_map_bomb((64 << 20) - 4096, arrays)
    assert len(comp) < 4096
    reassemble(path, comp)
    with pytest.raises(CorruptLayer, match=r"metadata is (corrupt|invalid)"):
        Layer.open(path)


@pytest.mark.parametrize(
    "state, message",
    [
        ({b"k": 1}, "expected a string, found bytes"),
        ({"a": [[[[[[[[[[1]]]]]]]]]]}, "nested more than 8 levels"),
        ({"a": [0] * 70000}, "more than 65536 entries"),
        ({"a": float("nan")}, "not a finite number"),
    ],
    ids=["bytes key", "deep", "big", "nan"],
)
def test_tracker_state_is_bounded(simple: tuple[Path, dict[int, bytes]], state: Any, message: str) -> None:
    path, _ = simple
    d = meta_dict(path)
    d["inventory"]["tracker_state"] = state
    reassemble(path, d)
    with pytest.raises(CorruptLayer, match=f"tracker_state.*{message}"):
        Layer.open(path)


def test_file_offset_beyond_i64_is_refused(simple: tuple[Path, dict[int, bytes]]) -> None:
    path, _ = simple
    d = meta_dict(path)
    d["vmas"][0]["offset"] = 1 << 63
    reassemble(path, d)
    with pytest.raises(CorruptLayer, match=r"vmas\[0\].offset"):
        Layer.open(path)


# -- issue 13 item 6: the temp file is written and published through its fd only -----------------
def _secret_pages(n: int, seed: int) -> bytes:
    """Incompressible pages (so the layer passes the sink's 8 MiB O_DIRECT block)."""
    return np.random.default_rng(seed).integers(0, 256, n * P, dtype=np.uint8).tobytes()


def _write_layer(directory: Path, name: str, data: bytes) -> Path:
    n = len(data) // P
    with LayerWriter(directory, name, chunk_pages=256) as w:
        w.add_pages(u64([pg(i) for i in range(n)]), data)
        return w.finish(LayerMeta(Inventory(pid=1), vmas=[anon(0, n)]))


def test_swapped_temp_name_is_neither_written_nor_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write the dump directory replaces our temp name by a symlink to their file
    right after we create it: nothing of ours lands in their file, and the published layer is
    our inode, not their symlink."""
    monkeypatch.setattr(writer_mod, "USE_TMPFILE", False)
    d = tmp_path / "d"
    loot = tmp_path / "loot"
    loot.write_bytes(b"")
    data = _secret_pages(2400, 1)  # ~9.4 MiB
    n = len(data) // P
    with LayerWriter(d, "layer-0001.ckpt", chunk_pages=256) as w:
        (tmp,) = list(d.iterdir())
        tmp.rename(d / "stolen")
        tmp.symlink_to(loot)
        w.add_pages(u64([pg(i) for i in range(n)]), data)
        out = w.finish(LayerMeta(Inventory(pid=1), vmas=[anon(0, n)]))
    assert loot.read_bytes() == b""
    assert not out.is_symlink() and out.is_file()
    assert os.path.samefile(out, d / "stolen")  # what we wrote is what was published
    assert (d / tmp.name).is_symlink()  # the attacker's symlink is left alone, not followed
    with Layer.open(out) as lay:
        lay.verify()
        assert lay.read_page(pg(n - 1)) == data[-P:]


_ATTACKER = r"""
import os, sys
d, loot = sys.argv[1], sys.argv[2]
print("ready", flush=True)
k = 0
while True:
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        continue
    for nm in names:
        if ".tmp." in nm or ".pub." in nm:
            try:
                os.rename(os.path.join(d, nm), os.path.join(d, f"stolen-{k}"))
                os.symlink(loot, os.path.join(d, nm))
                k += 1
            except OSError:
                pass
"""


@pytest.mark.parametrize("use_tmpfile", [True, False], ids=["O_TMPFILE", "named-temp"])
def test_temp_swap_race_with_a_real_attacker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_tmpfile: bool
) -> None:
    """An attacker process swaps every temp name it sees for a symlink to its own file, as fast
    as it can, while layers are written: its file stays empty and every layer is ours."""
    import sys

    monkeypatch.setattr(writer_mod, "USE_TMPFILE", use_tmpfile)
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    loot = tmp_path / "loot"
    loot.write_bytes(b"")
    att = subprocess.Popen(
        [sys.executable, "-c", _ATTACKER, str(d), str(loot)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert att.stdout is not None and att.stdout.readline() == "ready\n"
        for i in range(6):
            data = _secret_pages(2100, i)
            out = _write_layer(d, f"layer-{i + 1:04d}.ckpt", data)
            assert not out.is_symlink()
            with Layer.open(out) as lay:
                lay.verify()
                assert lay.read_page(pg(0)) == data[:P]
    finally:
        att.kill()
        att.wait()
    assert loot.read_bytes() == b""


# -- issue 13 item 7: FIFOs and devices are refused, never waited on ------------------------------
def test_show_of_a_fifo_refuses_without_blocking(tmp_path: Path) -> None:
    from tests.util import run_ckpt

    fifo = tmp_path / "layer-0001.ckpt"
    os.mkfifo(fifo)
    # A separate process with a generous timeout: before the fix this blocked forever in open().
    for cmd in (["show"], ["verify"], ["read", "--addr", "0x1000", "--size", "16"]):
        r = run_ckpt(*cmd, str(fifo), timeout=120)
        assert r.returncode == 1, r
        assert r.stderr.count("\n") == 1 and "it is a FIFO, not a regular file" in r.stderr


def test_parent_reference_naming_a_fifo_or_a_dir(chain: dict[str, Any]) -> None:
    _, l2, _, l4 = chain["layers"]
    l2.unlink()
    os.mkfifo(l2)
    with pytest.raises(ChainError, match="it is a FIFO"):
        open_layer(l4)
    l2.unlink()
    l2.mkdir()
    with pytest.raises(ChainError, match="it is a directory"):
        open_layer(l4)
    l2.rmdir()
    l2.symlink_to(l2.name)  # a symlink loop
    with pytest.raises(ChainError, match=r"parent layer of .*layer-0003.ckpt: cannot open layer"):
        open_layer(l4)


@pytest.mark.parametrize("kind", ["fifo", "urandom"])
def test_mapping_naming_a_fifo_or_device_is_not_read(tmp_path: Path, kind: str) -> None:
    """A layer whose file-backed mapping names a FIFO or a device, with that file's identity
    recorded (so the identity check passes): `read` of its absent pages refuses, never blocks
    and never returns the device's bytes."""
    if kind == "fifo":
        target = tmp_path / "fifo"
        os.mkfifo(target)
    else:
        target = Path(f"/dev/{kind}")
    fid = FileId.of(os.stat(target))
    v = VmaRecord(FBASE, FBASE + 4 * P, "r--p", 0, "00:05", fid.ino, str(target), "dumped", fid)
    path = build(tmp_path / "d", "layer-0001.ckpt", vmas=[v])
    with open_layer(path) as view, pytest.raises(LayerError, match="not a regular file"):
        view.read(FBASE, 16)


def test_bytes_after_a_zstd_frame_are_corruption(simple: tuple[Path, dict[int, bytes]]) -> None:
    """FORMAT.md: chunks hold one frame and nothing else; a layer with bytes appended to a frame
    (checksums recomputed) fails verify, and so does metadata with bytes after its frame."""
    path, _ = simple
    d = meta_dict(path)
    frames = frames_of(path)
    frames[1] += b"\0junk"
    reassemble(path, d, frames)
    with Layer.open(path) as lay, pytest.raises(CorruptLayer, match=r"chunk 1 .* is corrupt .*unused data"):
        lay.verify()
    d = meta_dict(path)
    reassemble(path, encode_meta(d, 1) + b"junk")
    with pytest.raises(CorruptLayer, match=r"metadata is corrupt .*unused data"):
        Layer.open(path)


def test_chain_of_two_processes_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    l1 = build(d, "layer-0001.ckpt", vmas=[anon(0, 4)], data={pg(0): page(0)})
    l2 = build(d, "layer-0002.ckpt", vmas=[anon(0, 4)], data={pg(1): page(1)}, parent=l1)
    meta = meta_dict(l1)
    meta["inventory"]["pid"] = 999
    reassemble(l1, meta)
    # l2 still names l1's old digest: re-point it (as a hostile or mistaken writer would).
    m2 = meta_dict(l2)
    with Layer.open(l1) as par:
        m2["inventory"]["parent"]["digest"] = par.digest
    reassemble(l2, m2)
    with pytest.raises(
        ChainError,
        match=r"pid 4242.*names as its parent .*layer-0001.ckpt, a dump of another process \(pid 999",
    ):
        open_layer(l2)


def test_show_of_many_fds_prints_every_one(tmp_path: Path) -> None:
    """Past RICH_ROWS rows show prints plain columns (rich took minutes for 200k fds); every fd
    is there, names printed literally, control characters escaped."""
    import contextlib
    import io

    from ckpt.show import RICH_ROWS, render_show

    n = RICH_ROWS + 500
    fds = [FdRecord(i, "file", f"/data/[bold]f-{i}\x1b[2J.db", 2, i, 27) for i in range(n)]
    path = build(tmp_path / "d", "layer-0001.ckpt", vmas=[anon(0, 4)], extra={"fds": fds})
    out = io.StringIO()
    with open_layer(path) as view, contextlib.redirect_stdout(out):
        render_show(view)
    text = out.getvalue()
    assert f"file descriptors ({n})" in text
    for i in (0, n // 2, n - 1):
        assert f"/data/[bold]f-{i}\\x1b[2J.db" in text
    assert "\x1b" not in text

# -- sparse page tables (issue 13 item 5) ----------------------------------------------------------
def test_diff_of_unlisted_pages(tmp_path: Path) -> None:
    """Pages no layer names are absent on both sides; diff compares them only where the mappings'
    absent pages read differently (anonymous zeros against a file's page), and counts the rest."""
    from ckpt.diff import diff

    f = tmp_path / "mapped.bin"
    f.write_bytes(b"".join(page(2000 + i) for i in range(8)))
    fid = FileId.of(os.stat(f))
    n = 1 << 20  # a 4 GiB anonymous mapping, two pages named
    big = anon(0, n)
    a = build(tmp_path / "a", "layer-0001.ckpt", vmas=[big], data={pg(3): page(3), pg(n - 1): page(4)})
    b = build(tmp_path / "b", "layer-0001.ckpt", vmas=[big], data={pg(3): page(3), pg(n - 1): page(5)})
    va, vb = open_layer(a), open_layer(b)
    assert len(va.page_table()) == 2 and va.page_table().counts()["absent"] == n - 2
    d = diff(va, vb)
    assert [int(x) for x in d.changed] == [pg(n - 1)] and d.pages_compared == n
    assert not len(d.added) and not len(d.removed)
    # The same addresses mapped from a file in C: every page differs from A's zeros (its bytes are
    # read from the file), though no layer names any of them.
    F = VmaRecord(pg(0), pg(8), "rw-p", 0, "08:01", fid.ino, str(f), "dumped", fid)
    c = build(tmp_path / "c", "layer-0001.ckpt", vmas=[F])
    small = build(tmp_path / "s", "layer-0001.ckpt", vmas=[anon(0, 8)], data={pg(3): page(3)})
    d = diff(open_layer(small), open_layer(c))
    assert [int(x) for x in d.changed] == [pg(i) for i in range(8)] and d.pages_compared == 8


def test_diff_of_a_huge_mapping_added(tmp_path: Path) -> None:
    """A 16 TiB reservation added (or removed) between two layers: counted and listed as runs, never
    one entry per page (that would be 32 GiB of addresses)."""
    from ckpt.diff import diff

    small = anon(0, 8)
    lo = 1 << 40  # below the small mapping, and 16 TiB below it
    assert lo + (16 << 40) <= small.start
    huge = VmaRecord(lo, lo + (16 << 40), "rw-p", 0, "00:00", 0, "", "dumped")
    a = build(tmp_path / "a", "layer-0001.ckpt", vmas=[small], data={pg(1): page(1)})
    b = build(tmp_path / "b", "layer-0001.ckpt", vmas=[huge, small], data={pg(1): page(1), lo: page(9)})
    d = diff(open_layer(a), open_layer(b))
    assert len(d.added) == (16 << 40) // P and not len(d.removed) and not len(d.changed)
    js = d.to_dict()
    assert js["added_ranges"] == [[huge.start, huge.end]]
    (row,) = [m for m in d.mappings if m.changes == ["added"]]
    assert len(row.added) == len(d.added)
    back = diff(open_layer(b), open_layer(a))
    assert len(back.removed) == len(d.added) and back.to_dict()["removed_ranges"] == [[huge.start, huge.end]]

# -- format version 2: raw chunks, a checksum of each chunk's pages ------------------------------
def random_page(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(P)


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, dict[int, bytes]]:
    """Chunks of 4 pages: 0 and 2 compressible, 1 random (stored raw), 3 (two pages) random too."""
    data = {pg(i): (random_page(i) if 4 <= i < 8 or i >= 12 else page(i)) for i in range(14)}
    return build(tmp_path / "d", "layer-0001.ckpt", vmas=[anon(0, 16)], data=data), data


def test_raw_chunks_round_trip(mixed: tuple[Path, dict[int, bytes]], tmp_path: Path) -> None:
    path, data = mixed
    with Layer.open(path) as layer:
        assert layer.header.version == FORMAT_VERSION == layer.inventory.version
        assert [c.raw for c in layer.pages.chunks] == [False, True, False, True]
        for c in layer.pages.chunks:
            assert c.pxxh3 is not None
            if c.raw:
                assert c.clen == c.npages * P and c.xxh3 == c.pxxh3
            else:
                assert c.clen < c.npages * P
        for a, b in data.items():
            assert layer.read_page(a) == b
        for ci in range(4):
            want = b"".join(data[int(a)] for a in layer.chunk_addrs(ci))
            assert layer.read_chunk(ci) == want
            assert xxhash.xxh3_64_intdigest(want) == layer.pages.chunks[ci].pxxh3
        got = {
            int(a): bytes(d[i * P : (i + 1) * P]) for a_s, d in layer.iter_chunks() for i, a in enumerate(a_s)
        }
        assert got == data
        layer.verify()
    # The raw chunks' bytes are the pages themselves, in the file.
    raw = path.read_bytes()
    c1 = meta_dict(path)["pages"]["chunks"][1]
    assert raw[c1["offset"] : c1["offset"] + c1["clen"]] == b"".join(data[pg(i)] for i in range(4, 8))
    out = merge(open_layer(path), tmp_path / "merged.ckpt")
    with Layer.open(out) as m:
        assert [c.raw for c in m.pages.chunks] == [False, True, False, True]
        assert all(m.read_page(a) == b for a, b in data.items())


def test_v2_checks_stored_bytes_and_pages(mixed: tuple[Path, dict[int, bytes]]) -> None:
    path, data = mixed
    with Layer.open(path) as layer:
        offs = [c.offset for c in layer.pages.chunks]
    # A flipped byte of a raw chunk, and of a compressed one: the checksum of the stored bytes.
    for ci in (1, 2):
        flip(path, offs[ci] + 5)
        with Layer.open(path) as layer:
            with pytest.raises(
                CorruptLayer, match=rf"chunk {ci} at offset {offs[ci]} is corrupt \(checksum mismatch\)"
            ):
                layer.read_chunk(ci)
            layer.close()
            with pytest.raises(CorruptLayer, match=f"chunk {ci}"):
                layer.check_chunks([ci])
        flip(path, offs[ci] + 5)
    # A frame whose stored checksum is right but which decompresses to other pages of the right
    # size: the checksum of the pages catches it on the one decompression a restore does.
    frames = frames_of(path)
    other = bytearray(b"".join(data[pg(i)] for i in range(8, 12)))
    other[100] ^= 1
    frames[2] = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(other))
    reassemble(path, meta_dict(path), frames)
    with Layer.open(path) as layer:
        layer.check_chunks(range(4))  # the stored bytes are what the index says
        with pytest.raises(CorruptLayer, match=r"chunk 2 .* pages' checksum does not match"):
            layer.read_chunk(2)
        with pytest.raises(CorruptLayer, match="chunk 2"):
            layer.verify()
        assert layer.read_page(pg(0)) == data[pg(0)]


def to_v1(path: Path) -> None:
    """Rewrite a layer without raw chunks as format version 1 (what an older ckpt wrote)."""
    d = meta_dict(path)
    for c in d["pages"]["chunks"]:
        assert not c.pop("raw")
        c.pop("pxxh3")
    d["inventory"]["version"] = 1
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 8, 1)
    struct.pack_into("<Q", raw, 56, xxhash.xxh3_64_intdigest(bytes(raw[:56])))
    path.write_bytes(bytes(raw))
    reassemble(path, d)


def test_version_1_layers_still_read(simple: tuple[Path, dict[int, bytes]]) -> None:
    path, data = simple
    to_v1(path)
    with Layer.open(path) as layer:
        assert layer.header.version == 1
        assert all(c.pxxh3 is None and not c.raw for c in layer.pages.chunks)
        assert all(layer.read_page(a) == b for a, b in data.items())
        layer.verify()
    # Version 1 has only the per-page digests to check decompressed pages against.
    frames = frames_of(path)
    other = bytearray(b"".join(data[pg(i)] for i in range(4, 8)))
    other[P + 7] ^= 1
    frames[1] = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(other))
    reassemble(path, meta_dict(path), frames)
    with Layer.open(path) as layer, pytest.raises(CorruptLayer, match=f"page {pg(5):#x} digest mismatch"):
        layer.read_chunk(1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("pxxh3"), "missing field 'pxxh3'"),
        (lambda c: c.update(raw=1), r"chunks\[0\].raw: expected true or false"),
        (lambda c: c.update(raw=True), r"chunks\[0\].clen: .* for a raw chunk of 4 pages"),
    ],
    ids=["no pxxh3", "raw not bool", "raw of the wrong size"],
)
def test_v2_chunk_records_are_checked(
    simple: tuple[Path, dict[int, bytes]], change: Callable[[dict[str, Any]], Any], message: str
) -> None:
    path, _ = simple
    d = meta_dict(path)
    change(d["pages"]["chunks"][0])
    reassemble(path, d)
    with pytest.raises(CorruptLayer, match=message):
        Layer.open(path)


def test_add_rows_gathers_into_recycled_chunk_buffers(tmp_path: Path) -> None:
    """add_rows takes the pages to store out of a bigger buffer (a dump's copy buffer) with no copy
    of its own; mixed with add_pages in one chunk; the writer's chunk buffers are reused, not
    allocated per chunk; a raw (random) chunk goes out from its buffer before it is reused."""
    import ckpt.image.writer as writer_mod

    n = 200
    big = np.stack([np.frombuffer(random_page(i) if i % 5 == 0 else page(i), np.uint8) for i in range(n)])
    rows = np.array([i for i in range(n) if i % 3], dtype=np.intp)
    want = {pg(int(i)): big[i].tobytes() for i in rows}
    seen: set[int] = set()
    with LayerWriter(tmp_path, "l.ckpt", chunk_pages=4, threads=2) as w:
        w.add_pages(u64([pg(int(rows[0]))]), want[pg(int(rows[0]))])
        for lo in range(1, len(rows), 7):
            r = rows[lo : lo + 7]
            w.add_rows(u64(pg(int(i)) for i in r), big, r)
            if w._buf is not None:
                seen.add(id(w._buf))
        with pytest.raises(ValueError, match="rows"):
            w.add_rows(u64([pg(n + 5)]), big, np.array([n], dtype=np.intp))
        with pytest.raises(ValueError, match="uint8"):
            w.add_rows(u64([pg(n + 5)]), big.view(np.uint64), np.array([0], dtype=np.intp))
        path = w.finish(LayerMeta(Inventory(pid=1), vmas=[anon(0, n + 8)]))
    assert len(seen) <= writer_mod.INFLIGHT_PER_THREAD * 2 + 2
    with Layer.open(path) as layer:
        assert np.array_equal(layer.pages.data, u64(want))
        assert np.array_equal(layer.pages.digests, page_digests(b"".join(want[a] for a in sorted(want))))
        assert all(layer.read_page(a) == b for a, b in want.items())
        layer.verify()


_MSGPACK_DOCS = hs.recursive(
    hs.none() | hs.booleans() | hs.integers(-(2**63), 2**64 - 1) | hs.text(max_size=4)
    | hs.binary(max_size=4),
    lambda inner: hs.lists(inner, max_size=6) | hs.dictionaries(hs.text(max_size=3), inner, max_size=6),
    max_leaves=60,
)


@seed(HYPOTHESIS_SEED)
@settings(max_examples=300, deadline=None, database=None)
@given(doc=_MSGPACK_DOCS)
def test_metadata_budget_never_counts_past_twice_the_bytes(doc: Any) -> None:
    """decode_meta leaves its object budget's hooks out when 2 x the raw size is within the limit:
    that is sound only if the budget's count of any document is at most 2 x its msgpack bytes
    (every object takes a byte at least; the count is each container and each of its elements)."""
    from ckpt.image.framing import _Budget

    raw = msgpack.packb(doc, use_bin_type=True)
    budget = _Budget(1 << 62)
    msgpack.unpackb(raw, raw=False, strict_map_key=False, list_hook=budget.seen, object_hook=budget.seen)
    assert budget.count <= 2 * len(raw)
