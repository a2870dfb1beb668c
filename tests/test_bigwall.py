"""The big path's wall (issue 9 part 3, branch wall9): what a big dump does before its freeze so
that the freeze does not do it, run in a fresh Python as a user's `ckpt dump` is."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.util import Target

ROOT = Path(__file__).resolve().parent.parent

# Which laps of the dump (phases_ms, in order) saw numpy imported.
_LAPS = (
    "import json, sys\n"
    "from ckpt.dump import dump\n"
    "seen = {}\n"
    "def lap(name):\n"
    "    seen.setdefault(name, 'numpy' in sys.modules)\n"
    "dump(int(sys.argv[1]), sys.argv[2], track='none', on_lap=lap)\n"
    "print(json.dumps(seen))\n"
)


def _laps(pid: int, d: Path, small_max: str | None) -> dict[str, bool]:
    env = {k: v for k, v in os.environ.items() if k != "CKPT_PAGESET_SMALL_MAX"}
    if small_max is not None:
        env["CKPT_PAGESET_SMALL_MAX"] = small_max
    p = subprocess.run(
        [sys.executable, "-c", _LAPS, str(pid), str(d)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    seen: dict[str, bool] = json.loads(p.stdout)
    return seen


def test_big_dump_imports_numpy_before_its_freeze(spawn: Callable[..., Target], tmp_path: Path) -> None:
    """A process above the small-set threshold: numpy (its page arrays) is imported by the time the
    freeze begins, not on first use inside it; below the threshold it is never imported."""
    t = spawn("rounds", "256", stderr=subprocess.DEVNULL)
    assert t.cmd("mix") == "ok"
    big = _laps(t.pid, tmp_path / "big", "64")  # the 1 MiB target is "big" with a threshold of 64
    assert big["frozen: seize"] is True
    assert big["buffer"] is True  # (imported with the estimate, before the copy buffer is taken)
    small = _laps(t.pid, tmp_path / "small", None)
    assert "frozen: seize" in small and not any(small.values())


def _cached(path: Path) -> bool:
    """Whether every page of `path` is in the page cache, by mincore(2) over a mapping of it (a read
    would not do: one that misses starts a read-ahead of its own)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    # Private and writable only so that ctypes can take its address: nothing is written.
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        c = ctypes.c_char.from_buffer(m)
        try:
            assert libc.mincore(ctypes.addressof(c), size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            del c
    finally:
        m.close()
    return all(b & 1 for b in vec.raw[:pages])


def _uncached(path: Path) -> bool:
    """Drop `path` from the page cache (written and synced: clean pages); whether it left."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return not _cached(path)


def test_readahead_reads_a_dump_directory_newest_first(tmp_path: Path) -> None:
    """`ckpt restore DIR`'s read-ahead: the directory's layers, regular files only (a FIFO named as
    a layer is not opened for reading, which would block), newest first, into the page cache."""
    from ckpt.readahead import Readahead

    d = tmp_path / "d"
    d.mkdir()
    sizes = {"layer-0001.ckpt": 3 << 20, "layer-0002.ckpt": (1 << 20) + 123, "notes.txt": 5000}
    for name, n in sizes.items():
        (d / name).write_bytes(os.urandom(n))
    os.mkfifo(d / "layer-0003.ckpt")
    if not all(_uncached(d / n) for n in sizes):
        return  # (a filesystem that keeps every page in memory: nothing to read ahead)
    ra = Readahead.for_image(str(d))
    assert ra is not None
    ra._thread.join(60)
    assert not ra._thread.is_alive()
    assert ra.bytes_read == sizes["layer-0001.ckpt"] + sizes["layer-0002.ckpt"]
    assert _cached(d / "layer-0001.ckpt") and _cached(d / "layer-0002.ckpt")
    assert not _cached(d / "notes.txt")
    ra.stop()
    # One layer file; and a path that is no image at all: nothing started.
    assert _uncached(d / "layer-0002.ckpt")
    one = Readahead.for_image(str(d / "layer-0002.ckpt"))
    assert one is not None
    one.stop()  # (stopped at once or not: either way the thread has ended)
    assert not one._thread.is_alive()
    assert Readahead.for_image(str(tmp_path / "missing")) is None
    assert Readahead.for_image(str(d / "layer-0003.ckpt")) is None


def test_readahead_stops_at_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckpt.readahead as readahead

    monkeypatch.setattr(readahead, "MAX_BYTES", 2 * readahead.STEP + 123)
    p = tmp_path / "layer-0001.ckpt"
    p.write_bytes(os.urandom(5 * readahead.STEP))  # (below SEND_STEP: the budget cuts a sendfile too)
    ra = readahead.Readahead.for_image(str(p))
    assert ra is not None
    ra._thread.join(60)
    assert ra.bytes_read == 2 * readahead.STEP + 123
    ra.stop()


def test_readahead_reads_the_metadata_first(spawn: Callable[..., Target], tmp_path: Path) -> None:
    """The read-ahead finds a real layer's metadata where the reader does (its copy of the footer's
    layout stays the format's), and reads it before the chunks; a file without a footer from 0."""
    import ckpt.readahead as readahead
    from ckpt.dump import dump
    from ckpt.image.format import FOOTER_MAGIC, FOOTER_SIZE
    from ckpt.image.reader import _load

    assert readahead._FOOTER.size == FOOTER_SIZE and readahead._FOOTER_MAGIC == FOOTER_MAGIC
    t = spawn("rounds", "256", stderr=subprocess.DEVNULL)
    assert t.cmd("mix") == "ok"
    layer = Path(dump(t.pid, tmp_path / "d", track="none").layer)
    size = layer.stat().st_size
    fd = os.open(layer, os.O_RDONLY)
    try:
        _, footer, _ = _load(fd, size, layer)
        assert 0 < readahead._meta_offset(fd, size) == footer.meta_offset < size
    finally:
        os.close(fd)
    other = tmp_path / "layer-0009.ckpt"
    other.write_bytes(os.urandom(100_000))
    fd = os.open(other, os.O_RDONLY)
    try:
        assert readahead._meta_offset(fd, 100_000) == 100_000  # no footer: no metadata first
    finally:
        os.close(fd)
    # The order: the metadata's bytes, then the rest (reads recorded as they are asked for).
    for how in ("sendfile", "preadv"):
        seen, read = _readahead_offsets(layer, how == "sendfile")
        assert seen[0] == footer.meta_offset and sorted(seen[1:])[0] == 0, how
        assert read == size and _cached(layer), how


def _readahead_offsets(layer: Path, sendfile_works: bool) -> tuple[list[int], int]:
    """The offsets the read-ahead of a cold `layer` asked for, in order, and its byte count; with
    `sendfile_works` False, sendfile fails as on a filesystem without it (the reads take over)."""
    import ckpt.readahead as readahead

    seen: list[int] = []
    real_sendfile, real_preadv = os.sendfile, os.preadv

    def sendfile(out: int, fd: int, off: int, n: int) -> int:
        if not sendfile_works:
            raise OSError(22, "not here")
        seen.append(off)
        return real_sendfile(out, fd, off, n)

    def preadv(fd: int, bufs: list[memoryview], off: int) -> int:
        seen.append(off)
        return real_preadv(fd, bufs, off)

    assert _uncached(layer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readahead.os, "sendfile", sendfile)
        mp.setattr(readahead.os, "preadv", preadv)
        ra = readahead.Readahead.for_image(str(layer))
        assert ra is not None
        ra._thread.join(60)
    ra.stop()
    return seen, ra.bytes_read
