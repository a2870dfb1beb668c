"""The layer file's sink (two staging buffers, each full block written by a thread of its own) and
the dump's copy-buffer bound (--max-buffer): bytes land exactly, errors of the background write
reach the caller, and a dump bounded below its size still equals the memory."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ckpt.image.sink import FileSink
from tests.util import Target, assert_view_equals_memory, run_ckpt

Spawn = Callable[..., Target]
MiB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount tmpfs filesystems of a given size under tmp_path; unmounted afterwards."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        m = tmp_path / f"tmpfs{len(mounts)}"
        m.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(m)], check=True)
        mounts.append(m)
        return m

    yield mount
    for m in mounts:
        subprocess.run(["umount", str(m)], check=True)


def _pieces(seed: int, total: int) -> list[bytes]:
    """Random bytes cut at random sizes, from 1 byte to 3 MiB: writes that straddle block ends."""
    rng = np.random.default_rng(seed)
    out, n = [], 0
    while n < total:
        k = int(rng.integers(1, 3 * MiB))
        out.append(rng.integers(0, 256, k, dtype=np.uint8).tobytes())
        n += k
    return out


def _write_all(path: Path, pieces: list[bytes]) -> bool:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        s = FileSink(fd)
        direct = s.direct
        for p in pieces:
            s.write(p)
        s.flush()
        assert s.size == sum(map(len, pieces))
        s.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    return direct


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_sink_writes_every_byte_in_order(tmp_path: Path, tmpfs: Callable[[str], Path], where: str) -> None:
    """~40 MiB in pieces of every size: five blocks through both staging buffers (O_DIRECT where the
    filesystem takes it), the partial last block through the ordinary fd; the file is exactly the
    bytes written, in order."""
    d = tmp_path if where == "disk" else tmpfs("64m")
    pieces = _pieces(1, 40 * MiB)
    path = d / "out"
    _write_all(path, pieces)
    assert path.read_bytes() == b"".join(pieces)


def test_sink_syncs_as_it_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CKPT_SINK_SYNC bytes written O_DIRECT, a thread of its own fdatasyncs the file (at most
    one at a time), each done before close() returns; the bytes are the same; 0 turns it off."""
    import threading

    calls: list[tuple[int, str]] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append((fd, threading.current_thread().name))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    pieces = _pieces(4, 40 * MiB)
    for every, least in ((16 * MiB, 1), (0, 0)):
        monkeypatch.setenv("CKPT_SINK_SYNC", str(every))
        calls.clear()
        path = tmp_path / f"out{every}"
        if not _write_all(path, pieces):
            pytest.skip("this filesystem refuses O_DIRECT: no block goes through the thread")
        assert not [t for t in threading.enumerate() if t.name == "ckpt-sync"]  # joined by close()
        assert least <= len(calls) <= 40 // 16 and {n for _, n in calls} <= {"ckpt-sync"}
        assert path.read_bytes() == b"".join(pieces)



def test_sink_leaves_no_thread_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block writes run on threads started by _thread (no wait for them to start), the syncs on
    threading's: after close() none is alive, and threading knows none it did not know before (a
    thread started by _thread that asked threading for current_thread() would be kept for good as a
    _DummyThread: ~2 per dump, for the life of a service or a migration)."""
    import threading

    monkeypatch.setenv("CKPT_SINK_SYNC", str(8 * MiB))
    before = set(threading._active)  # type: ignore[attr-defined]
    pieces = _pieces(5, 40 * MiB)
    path = tmp_path / "out"
    if not _write_all(path, pieces):
        pytest.skip("this filesystem refuses O_DIRECT: no block goes through the thread")
    new = [threading._active[k] for k in set(threading._active) - before]  # type: ignore[attr-defined]
    assert new == []  # (threads of earlier tests may have ended meanwhile: only new ones count)
    assert path.read_bytes() == b"".join(pieces)


def test_sink_small_writes_only(tmp_path: Path) -> None:
    """Less than one block: nothing goes through the block thread; flush writes it all."""
    pieces = _pieces(2, 100_000)[:3]
    path = tmp_path / "out"
    _write_all(path, pieces)
    assert path.read_bytes() == b"".join(pieces)


def test_sink_background_write_error_reaches_the_caller(tmpfs: Callable[[str], Path]) -> None:
    """A block written by the background thread fails (a real ENOSPC of a 12 MiB tmpfs): the error
    comes out of the caller's next write or flush, and closing afterwards neither hangs nor raises."""
    d = tmpfs("12m")
    fd = os.open(d / "out", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    s = FileSink(fd)
    if not s.direct:  # tmpfs takes O_DIRECT since Linux 6.6; before, every write is synchronous
        s.close()
        os.close(fd)
        pytest.skip("this kernel's tmpfs refuses O_DIRECT: no block goes through the thread")
    data = np.random.default_rng(3).integers(0, 256, MiB, dtype=np.uint8).tobytes()
    with pytest.raises(OSError) as ei:
        for _ in range(40):
            s.write(data)
        s.flush()
    assert ei.value.errno == errno.ENOSPC
    s.close()
    os.close(fd)


def test_dump_max_buffer_streams_and_equals_memory(spawn: Spawn, datafile: Path, tmp_path: Path) -> None:
    """--max-buffer below the pages copied: the dump compresses and writes while still frozen,
    reusing the buffer, and the layer still equals the memory page for page."""
    t = spawn("memtarget", "1024", str(datafile))  # 4 MiB region, 3/4 of it present
    r = run_ckpt(
        "dump",
        "--pid",
        str(t.pid),
        "-D",
        str(tmp_path / "d"),
        "--json",
        "--max-buffer",
        "1M",
        "--leave-stopped",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    try:
        assert out["pages_dumped"] + out["pages_zero"] > 256  # more than one buffer's worth
        assert_view_equals_memory(t.pid, out["layer"])
    finally:
        os.kill(t.pid, 18)  # SIGCONT


@pytest.mark.parametrize("bad", ["0", "x", "12Q", "-5"])
def test_dump_max_buffer_bad_value_is_one_line(spawn: Spawn, tmp_path: Path, bad: str) -> None:
    t = spawn("memtarget", "16")
    r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), f"--max-buffer={bad}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: ") and "--max-buffer" in lines[0], r.stderr
    assert not (tmp_path / "d").exists()


def test_sink_large_bytes_go_through_memmove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `bytes` of MEMMOVE_MIN or more (a chunk's frame) is copied into the staging buffer by
    ctypes.memmove (the GIL let go); smaller pieces, memoryviews and numpy data by slices. Mixed, at
    sizes that straddle the 8 MiB blocks and the threshold by one byte, the file is exactly the
    bytes written, and the large pieces took the memmove path."""
    from ckpt.image import sink

    moved: list[int] = []
    real = sink._memmove

    def counting() -> Callable[[int, int, int], object]:
        move = real()

        def call(dst: int, src: int, n: int) -> object:
            moved.append(n)
            return move(dst, src, n)

        return call

    monkeypatch.setattr(sink, "_memmove", counting)
    rng = np.random.default_rng(7)
    lim = FileSink.MEMMOVE_MIN
    sizes = [lim - 1, lim, lim + 1, 3 * MiB + 5, 1, 5 * MiB - 3, 8 * MiB, 2 * MiB + 1, 8 * MiB + 1, 17]
    pieces: list[object] = []
    for i, k in enumerate(sizes * 2):
        b = rng.integers(0, 256, k, dtype=np.uint8).tobytes()
        pieces.append(b if i % 3 else memoryview(bytearray(b)))  # every third a (writable) view
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        s = FileSink(fd)
        if not s.direct:
            s.close()
            pytest.skip("this filesystem refuses O_DIRECT: no staging buffer")
        for p in pieces:
            s.write(p)  # type: ignore[arg-type]
        s.flush()
        s.close()
    finally:
        os.close(fd)
    want = b"".join(bytes(p) for p in pieces)  # type: ignore[call-overload]
    assert path.read_bytes() == want
    big = sum(len(p) for p in pieces if type(p) is bytes and len(p) >= lim)
    assert sum(moved) == big and big > 0  # every large bytes, and nothing else, by memmove


def test_dump_disk_full_in_the_block_writes(spawn: Spawn, tmpfs: Callable[[str], Path]) -> None:
    """ENOSPC in the O_DIRECT block writes that the frames reach by memmove (a 64 MiB process's
    layer into a 6 MiB filesystem): one line, no layer and no temp file left, the target running
    untraced with the same memory."""
    small = tmpfs("6m")
    t = spawn("memtarget", "16384")  # 64 MiB region: 16 MiB random, 16 MiB text, 16 MiB zeros
    before = t.sum()
    p = run_ckpt("dump", "--pid", str(t.pid), "-D", str(small / "d"), "--track", "none")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: ") and "No space left" in lines[0], p.stderr
    d = small / "d"
    assert not d.exists() or not [n for n in os.listdir(d) if ".tmp" in n or n.startswith("layer-")]
    assert t.state() in ("S", "R") and t.tracer() == 0
    assert t.sum() == before
