"""LayerWriter: pages in, one layer file out, published atomically.

Pages are packed into chunks of `chunk_pages` and compressed on a thread pool (zstandard releases the
GIL, so the threads really run in parallel); frames are written in order as they complete, with at
most INFLIGHT_PER_THREAD x threads chunks in flight so memory stays bounded however big the dump.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    import numpy as np
else:
    from ckpt.lazynp import np
import xxhash

from ckpt import ranges
from ckpt.errors import CkptError
from ckpt.image import pagework
from ckpt.image.format import (
    ADDR_LIMIT,
    DEFAULT_CHUNK_PAGES,
    HEADER_SIZE,
    MAX_CHUNK_PAGES,
    PAGE_SIZE,
    ChunkRecord,
    LayerMeta,
    MetaError,
    page_digests,
)
from ckpt.image.framing import Footer, Header, encode_meta, meta_digest
from ckpt.image.pagescan import digest_array, zero_flags, zero_rows
from ckpt.image.sink import FileSink
from ckpt.lightstd import zstandard  # (without its import of platform)
from ckpt.ranges import Pages
from ckpt.threadpool import Task, ThreadPool

_local = threading.local()
# zstd's fast levels: -1 compresses these machines' mixed pages ~1.5x faster than level 1 for nearly
# the same ratio (docs/benchmarks.md); the level is not recorded, any level reads the same.
DEFAULT_LEVEL = -1
# False: write through a named O_EXCL temp file, as on filesystems without O_TMPFILE (tests both).
USE_TMPFILE = True
LEVEL_MIN = -(1 << 17)  # ZSTD_minCLevel()
LEVEL_MAX = zstandard.MAX_COMPRESSION_LEVEL  # 22
META_LEVEL = 1  # the metadata (addresses, digests) is small: one fixed level, whatever the pages use


def check_level(level: int) -> int:
    """`level` if zstd has it, else ValueError saying the range."""
    if not LEVEL_MIN <= level <= LEVEL_MAX:
        raise ValueError(
            f"zstd level {level} is out of range ({LEVEL_MIN} .. {LEVEL_MAX}; negative is faster)"
        )
    return level


# Called with each piece of the layer as it is written, and (page addresses, raw) for a chunk.
Tee = Callable[[memoryview, "tuple[np.ndarray, bool] | None"], None]
INFLIGHT_PER_THREAD = 4  # chunks (1 MiB each by default) queued per compression thread: keeps them fed
BATCHES_PER_THREAD = 2  # add_batch: batches queued per thread (each holds its frames until written)
_OnBatch = Callable[["Pages", int], None]  # (addresses of the zero pages, pages stored)
_T = TypeVar("_T")


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # A ZstdCompressor is not thread-safe; one per worker thread, reused across chunks.
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("cctx", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


@dataclass
class _Chunk:
    """One chunk as it goes to the file: the stored bytes and what the index says of them."""

    buf: np.ndarray | None  # the pages, (npages, PAGE_SIZE) uint8: a recycled buffer of the writer
    # (None in a batch's chunk: its pages stay in the caller's buffer)
    stored: bytes | None  # the zstd frame; None: the pages are stored raw (they did not shrink)
    xxh3: int  # of the stored bytes
    pxxh3: int  # of the pages (the uncompressed bytes)
    digests: np.ndarray | array[int]  # each page's xxh3_64 (an array('Q') for a small batch)


def _compress_chunk(buf: np.ndarray, digests: np.ndarray | None, level: int | None) -> _Chunk:
    """One chunk's frame, checksums and page digests, on a pool thread.

    `buf` holds the chunk's pages back to back, so zstd compresses it in one call (no streaming
    window to copy into) and the GIL is released for all of it; the per-page digests, short C calls
    that hold the GIL, are computed here only when the caller did not have them. Pages that do not
    shrink (random data, already compressed data) are stored raw: a reader then copies them
    instead of running zstd over them."""
    mv = buf.data.cast("B")
    so = pagework.lib()
    if digests is None and so is not None and buf.flags.c_contiguous:
        dg, pxxh3 = pagework.digest_pages(so, buf)
        return _framed(mv, dg, level, buf, pxxh3)
    return _framed(mv, page_digests(mv) if digests is None else digests, level, buf)


def _framed(
    mv: memoryview,
    dg: np.ndarray | array[int],
    level: int | None,
    buf: np.ndarray | None,
    pxxh3: int | None = None,
) -> _Chunk:
    """The chunk of pages `mv` (digests `dg`, their xxh3 `pxxh3` if known): its frame, or raw where
    `level` is None or they do not shrink."""
    if pxxh3 is None:
        pxxh3 = xxhash.xxh3_64_intdigest(mv)
    frame = None if level is None else _compressor(level).compress(mv)  # None: stored raw without trying
    if frame is None or len(frame) >= len(mv):
        return _Chunk(buf, None, pxxh3, pxxh3, dg)
    # python-xxhash, holding the GIL for the ~20 us it takes: a C call that let go of it here was
    # measured to wait ~250 us on average to take it back from the other threads.
    return _Chunk(buf, frame, xxhash.xxh3_64_intdigest(frame), pxxh3, dg)


@dataclass
class _Batch:
    """What a pool thread made of a batch of a full dump's copy buffer (add_batch)."""

    pages: np.ndarray | memoryview  # the batch's pages, (n, PAGE_SIZE) uint8 (small: their bytes): the
    # caller's, unchanged until drained
    chunks: list[tuple[_Chunk, Pages, Any]]  # each chunk, its addresses, its rows of `pages`
    zero: Pages  # addresses of the all-zero pages, not stored


def _compress_batch(addrs: np.ndarray, pages: np.ndarray, chunk_pages: int, level: int | None) -> _Batch:
    """Zero detection, then chunks of the other pages: gathered into this thread's own buffer (one
    1 MiB buffer that stays in cache, never a fresh one), compressed, digested. Everything a full
    dump does per page runs here, on the pool, so the thread feeding the writer only hands out
    batches and writes frames."""
    so = pagework.lib() if pages.flags.c_contiguous else None
    z = zero_rows(pages) if so is None else pagework.zero_pages(so, pages)
    keep = np.flatnonzero(~z)
    gather: np.ndarray | None = _local.__dict__.get("gather")
    if gather is None or len(gather) < chunk_pages:
        gather = _local.gather = np.empty((chunk_pages, PAGE_SIZE), np.uint8)
    out = []
    for lo in range(0, len(keep), chunk_pages):
        rows = keep[lo : lo + chunk_pages]
        if so is not None and not _adjacent(rows):
            # Gather, page digests and the chunk's checksum in one call that lets go of the GIL.
            dg, pxxh3 = pagework.gather_digest(so, pages, rows, gather)
            buf = gather[: len(rows)]
            ch = _framed(buf.data.cast("B"), dg, level, buf, pxxh3)
        else:
            buf = _rows_of(pages, rows, lambda n: gather[:n])  # a slice where no zero page lies among them
            ch = _compress_chunk(buf, None, level)
        # The thread's buffer is reused for the next chunk: a raw chunk is written from the
        # caller's pages (its rows) when it is drained, a compressed one from its frame.
        out.append((_Chunk(None, ch.stored, ch.xxh3, ch.pxxh3, ch.digests), addrs[rows], rows))
    return _Batch(pages, out, addrs[z])


def _compress_small(
    addrs: array[int],
    pages: memoryview,
    chunk_pages: int,
    level: int | None,
    rows: list[int] | None = None,
    digests: array[int] | None = None,
) -> _Batch:
    """_compress_batch for a small batch (addresses in an array('Q'), pages in a memoryview), without
    numpy: a small dump never imports it (issue 9 part 3). The same chunks, frames and digests.
    With `rows` (add_rows): `addrs` are those rows' pages, to be stored with their `digests`; no
    zero detection."""
    by_rows = rows is not None  # add_rows: `addrs` match `rows`, and no zero pages
    if rows is None:
        z = zero_flags(pages)
        keep = [i for i, zero in enumerate(z) if not zero]
        zero = array("Q", [a for a, zz in zip(addrs, z, strict=True) if zz])
    else:
        keep, zero = rows, array("Q")
    gather: bytearray | None = _local.__dict__.get("gather_small")
    if gather is None or len(gather) < chunk_pages * PAGE_SIZE:
        gather = _local.gather_small = bytearray(chunk_pages * PAGE_SIZE)
    out = []
    for lo in range(0, len(keep), chunk_pages):
        rows = keep[lo : lo + chunk_pages]
        mv = _rows_small(pages, rows, memoryview(gather))
        dg = digest_array(mv) if digests is None else digests[lo : lo + chunk_pages]
        ch = _framed(mv, dg, level, None)
        got = array("Q", [addrs[i] for i in rows]) if not by_rows else addrs[lo : lo + chunk_pages]
        out.append((ch, got, rows))
    return _Batch(pages, out, zero)


def _ignore(zero: Pages, stored: int) -> None:
    """on_done of a batch that holds no zero pages to report (add_rows)."""


def _rows_small(pages: memoryview, rows: list[int], spare: memoryview) -> memoryview:
    """_rows_of for a memoryview of pages: a slice where the rows are adjacent, else copied into
    `spare` (a buffer used again and again)."""
    if rows and rows[-1] - rows[0] == len(rows) - 1:
        return pages[rows[0] * PAGE_SIZE : (rows[-1] + 1) * PAGE_SIZE]
    for k, r in enumerate(rows):
        spare[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] = pages[r * PAGE_SIZE : (r + 1) * PAGE_SIZE]
    return spare[: len(rows) * PAGE_SIZE]


def _adjacent(rows: np.ndarray) -> bool:
    """Whether ascending `rows` are one run of adjacent rows (a slice of the pages, no copy)."""
    return bool(len(rows)) and int(rows[-1]) - int(rows[0]) == len(rows) - 1


def _rows_of(pages: np.ndarray, rows: np.ndarray, spare: Callable[[int], np.ndarray]) -> np.ndarray:
    """pages[rows] (ascending): a slice of `pages` where the rows are adjacent (no copy), else
    gathered into spare(len(rows)), a buffer used again and again (a fresh array each time would
    fault its every page in)."""
    if _adjacent(rows):
        return pages[int(rows[0]) : int(rows[-1]) + 1]
    out = spare(len(rows))
    np.take(pages, rows, axis=0, out=out, mode="clip")
    return out


def _concat(parts: list[Pages]) -> Pages:
    """One column of the index: an array('Q') if every part is one (a small layer), else numpy's."""
    if all(isinstance(p, array) for p in parts):
        out = array("Q")
        for p in parts:
            out.extend(p)
        return out
    return np.concatenate([np.asarray(p, dtype=np.uint64) for p in parts])


def ensure_dir(directory: Path) -> None:
    """Create a dump directory private to its owner (0700), or fail with one sentence."""
    try:
        directory.mkdir(mode=0o700, parents=True)
        # mkdir's mode is filtered by the umask; a dump holds a process's memory, so insist on 0700.
        os.chmod(directory, 0o700)
    except FileExistsError:
        if not directory.is_dir():
            raise CkptError(
                f"cannot use {directory} as a dump directory: it exists and is not a directory"
            ) from None
    except OSError as e:
        raise CkptError(f"cannot create dump directory {directory}: {e.strerror}") from None


class LayerWriter:
    """Write one layer: add_pages() in ascending address order, then finish(meta).

    Use as a context manager: leaving it by an exception (or without finish) removes the temp file.
    Not thread-safe: one thread drives a writer.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        level: int = DEFAULT_LEVEL,
        threads: int = 2,
        chunk_pages: int = DEFAULT_CHUNK_PAGES,
        replace: bool = False,
        tee: Tee | None = None,
        keep_chunks: bool = True,
        compress: bool = True,
        inline_pages: int = 0,
    ) -> None:
        """`tee` is given every byte of the layer as it is written, with each chunk's page
        addresses and rawness (a live migration streams the layer this way); without
        `keep_chunks` the file gets holes where the chunks are (only its metadata is read again);
        without `compress` every chunk is stored raw (a fast link: zstd would be the bottleneck);
        a chunk or batch of at most `inline_pages` pages is worked on by the calling thread, not the
        pool (a migration's final round: its caller waits for it, real-time, while a pool thread
        would first wait for a CPU behind the machine's other tasks)."""
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise ValueError(f"bad layer name {name!r}")
        if not LEVEL_MIN <= level <= LEVEL_MAX:
            raise CkptError(f"compression level {level} is out of range ({LEVEL_MIN} .. {LEVEL_MAX})")
        if not 1 <= chunk_pages <= MAX_CHUNK_PAGES:
            raise ValueError(f"chunk_pages must be in [1, {MAX_CHUNK_PAGES}], not {chunk_pages}")
        self.directory = Path(directory)
        self.path = self.directory / name
        self.level = check_level(level)
        self.threads = max(1, threads)
        self.chunk_pages = chunk_pages
        self.replace = replace
        self.tee = tee
        self.keep_chunks = keep_chunks
        self.compress = compress
        self.inline_pages = inline_pages
        self.bytes_written = 0
        self.digest: str | None = None  # set by finish()
        self._state = "open"
        self._tmp: Path | None = self.directory / f".{name}.tmp.{os.getpid()}"  # None: O_TMPFILE
        self._last_addr = -1
        # The partial chunk being filled: its pages are copied into one of a few recycled buffers
        # (faulted in once: fresh memory costs 2-4 us a page here), which then go to the pool whole.
        self._free: list[np.ndarray] = []
        self._buf: np.ndarray | None = None
        self._raw: np.ndarray | None = None  # add_batch's raw chunks gathered again (_drain_one)
        self._raw_b: bytearray | None = None  # the same for small batches
        self._pend_addrs: list[np.ndarray] = []
        self._pend_digests: list[np.ndarray | None] = []  # None: computed with the compression
        self._pend_n = 0
        # Chunks (add_pages, add_rows) and batches (add_batch) in flight, in file order; a batch's
        # third member is told its zero pages and how many it stored when it is drained.
        self._inflight: deque[tuple[Task[_Chunk], np.ndarray] | tuple[Task[_Batch], None, _OnBatch]]
        self._inflight = deque()
        self._addrs_out: list[Pages] = []
        self._digests_out: list[Pages] = []
        self._chunks: list[ChunkRecord] = []
        ensure_dir(self.directory)
        if not replace and self.path.exists():
            # Checked again before the rename; failing here saves writing a whole layer first.
            raise CkptError(f"cannot write layer {self.path}: a file of that name already exists")
        self._fd = self._open_tmp()
        self._tmp_stat = os.fstat(self._fd)
        self._sink = FileSink(self._fd, direct=self.keep_chunks)
        self._pool = ThreadPool(self.threads, "ckpt-zstd")
        if tee is not None:
            # A streamed layer's threads start now, before the freeze: a migration's final round
            # would otherwise start them after its thaw, in the downtime (ms each under load).
            for _ in range(self.threads):
                self._pool.submit(int)
        self._write(Header(chunk_pages=chunk_pages).pack())

    def _open_tmp(self) -> int:
        """The layer's file, private to us until published; every byte goes through this fd.

        O_TMPFILE gives an inode with no name at all (nothing to swap); where the filesystem lacks
        it, a name made with O_EXCL (which never follows a symlink). Either way the name is never
        opened again: finish() publishes the inode through the fd (linkat of /proc/self/fd/N)."""
        try:
            if not USE_TMPFILE:
                raise OSError(errno.EOPNOTSUPP, "O_TMPFILE not used")
            fd = os.open(self.directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            self._tmp = None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise CkptError(f"cannot write a layer in {self.directory}: {e.strerror}") from None
            fd = self._open_named_tmp()
        try:
            os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
        except OSError as e:
            os.close(fd)
            raise CkptError(f"cannot write a layer in {self.directory}: {e.strerror}") from None
        return fd

    def _open_named_tmp(self) -> int:
        assert self._tmp is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                return os.open(self._tmp, flags, 0o600)
            except FileExistsError:
                # The name carries our pid, so an existing one is left over from a dead ckpt.
                os.unlink(self._tmp)
                return os.open(self._tmp, flags, 0o600)
        except OSError as e:
            raise CkptError(f"cannot write a layer in {self.directory}: {e.strerror}") from None

    def _publish(self) -> None:
        """Give our inode its final name: a hard link made from the fd, so what appears under the
        name is what we wrote, whatever happened to any name in the directory meanwhile."""
        src = f"/proc/self/fd/{self._fd}"
        ours = os.fstat(self._fd)
        name = self.path.name
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # dst_dir_fd makes Python call linkat(AT_SYMLINK_FOLLOW): the /proc link is followed
            # to our inode (plain link() would try to link the /proc symlink itself).
            if not self.replace:
                try:
                    os.link(src, name, dst_dir_fd=dfd, follow_symlinks=True)  # never replaces a name
                except FileExistsError:
                    raise CkptError(
                        f"cannot write layer {self.path}: a file of that name already exists"
                    ) from None
            else:
                # link() cannot replace; link under a fresh private name, then rename that over.
                side = f".{name}.pub.{os.getpid()}.{os.urandom(8).hex()}"
                os.link(src, side, dst_dir_fd=dfd, follow_symlinks=True)
                os.rename(side, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                try:
                    now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is None or not os.path.samestat(now, ours):
                    raise CkptError(f"layer {self.path} was replaced by someone else while being published")
            if self._tmp is not None:
                self._unlink_tmp(dfd, ours)
                self._tmp = None
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _unlink_tmp(self, dfd: int | None, ours: os.stat_result) -> None:
        """Remove our temp name, only if it is still our file: never what someone else put there."""
        assert self._tmp is not None
        name = self._tmp.name if dfd is not None else self._tmp
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(name, dir_fd=dfd, follow_symlinks=False), ours):
                os.unlink(name, dir_fd=dfd)

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != "finished":
            self.abort()

    # -- writing --------------------------------------------------------------------------------
    def _io_error(self, e: OSError) -> NoReturn:
        self.abort()
        raise CkptError(f"cannot write layer {self.path}: {e.strerror or e}") from None

    def _write(self, b: bytes | memoryview, chunk: tuple[np.ndarray, bool] | None = None) -> None:
        try:
            if chunk is not None and not self.keep_chunks:
                self._sink.skip(memoryview(b).nbytes)
            else:
                self._sink.write(b)
        except OSError as e:
            self._io_error(e)
        self.bytes_written = self._sink.size
        if self.tee is not None:
            self.tee(memoryview(b).cast("B"), chunk)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"layer writer for {self.path} is {self._state}")

    def add_pages(
        self, addrs: np.ndarray, data: bytes | bytearray | memoryview, digests: np.ndarray | None = None
    ) -> None:
        """Queue pages for the layer. Addresses ascend strictly, across calls too.

        `digests` are the pages' xxh3_64, trusted as given (computed here when None). `data` may be
        reused by the caller once this returns: its bytes are copied.
        """
        a, dg = self._check_addrs(addrs, digests)
        mv = memoryview(data).cast("B")
        if len(mv) != len(a) * PAGE_SIZE:
            raise ValueError(f"{len(mv)} bytes of data for {len(a)} pages of {PAGE_SIZE}")
        pages = np.frombuffer(mv, dtype=np.uint8).reshape(len(a), PAGE_SIZE)
        self._queue(a, dg, lambda out, lo, hi: np.copyto(out, pages[lo:hi]))

    def add_rows(
        self, addrs: Pages, pages: np.ndarray | memoryview, rows: Any, digests: Pages | None = None
    ) -> None:
        """add_pages(addrs, pages[rows], digests) without the intermediate copy: `pages` is an
        (n, PAGE_SIZE) uint8 array (a dump's copy buffer), `rows` the pages of it to store, ascending
        in address like `addrs`. The rows are gathered straight into the chunk buffers."""
        if ranges.is_small(addrs):
            self._add_rows_small(addrs, pages, rows, digests)
            return
        a, dg = self._check_addrs(addrs, digests)
        r = np.asarray(rows, dtype=np.intp)
        assert not isinstance(pages, memoryview)
        if pages.ndim != 2 or pages.shape[1] != PAGE_SIZE or pages.dtype != np.uint8:
            raise ValueError("pages must be an (n, PAGE_SIZE) uint8 array")
        if r.shape != a.shape or (len(r) and (int(r.min()) < 0 or int(r.max()) >= len(pages))):
            raise ValueError(f"{r.shape} rows (within {len(pages)}) for {len(a)} pages")
        # mode="clip": the rows are checked above, and "raise" would gather through a temporary.
        self._queue(a, dg, lambda out, lo, hi: np.take(pages, r[lo:hi], axis=0, out=out, mode="clip"))

    def _add_rows_small(self, addrs: Pages, pages: Any, rows: Any, digests: Any) -> None:
        """add_rows of a small set (addresses and digests in array('Q'), `pages` a memoryview, `rows`
        a list): as a batch of its own (its own chunks), on the pool, without numpy."""
        a = self._check_small(addrs)
        mv = memoryview(pages).cast("B")
        r = list(rows)
        dg = array("Q", digests) if digests is not None else None
        if len(r) != len(a) or (dg is not None and len(dg) != len(a)):
            raise ValueError(f"{len(r)} rows, {len(dg or [])} digests for {len(a)} pages")
        if r and (min(r) < 0 or max(r) >= len(mv) // PAGE_SIZE):
            raise ValueError(f"rows out of the {len(mv) // PAGE_SIZE} pages given")
        level = self.level if self.compress else None
        self._batch(a, _ignore, _compress_small, a, mv, self.chunk_pages, level, r, dg)

    def add_batch(self, addrs: Pages, pages: np.ndarray | memoryview, on_done: _OnBatch) -> None:
        """Pages of a full dump's copy buffer, zero pages included: those are not stored but given
        to `on_done(zero_addresses, stored_count)`, called on this thread, in order, once the batch
        is written. Zero detection, gathering, compression and digests run on the pool. `pages`
        ((n, PAGE_SIZE) uint8) must stay unchanged until drain() or finish() returns.

        A small batch (issue 9 part 3): `addrs` an array('Q') and `pages` a memoryview of their
        bytes; worked on without numpy, its zero addresses an array('Q') too."""
        level = self.level if self.compress else None
        if ranges.is_small(addrs):
            a = self._check_small(addrs)
            assert isinstance(pages, memoryview)
            mv = pages.cast("B")
            if len(mv) != len(a) * PAGE_SIZE:
                raise ValueError(f"{len(mv)} bytes of pages for {len(a)} addresses")
            self._batch(a, on_done, _compress_small, a, mv, self.chunk_pages, level)
        else:
            a, _ = self._check_addrs(addrs, None)
            assert not isinstance(pages, memoryview)
            if pages.ndim != 2 or pages.shape != (len(a), PAGE_SIZE) or pages.dtype != np.uint8:
                raise ValueError(f"pages must be a ({len(a)}, {PAGE_SIZE}) uint8 array")
            self._batch(a, on_done, _compress_batch, a, pages, self.chunk_pages, level)

    def _batch(self, a: Pages, on_done: _OnBatch, work: Callable[..., _Batch], *args: Any) -> None:
        """work(*args) on the pool, a batch of addresses `a` with chunks of its own; at most
        BATCHES_PER_THREAD x threads of them queued."""
        if not len(a):
            return
        self._last_addr = int(a[-1])
        self._submit()  # a partial chunk of add_pages/add_rows goes first: the file is in address order
        self._inflight.append((self._run(len(a), work, *args), None, on_done))
        batches = sum(1 for e in self._inflight if e[1] is None)
        while batches > BATCHES_PER_THREAD * self.threads:
            batches -= self._drain_one() is None

    def drain(self) -> None:
        """Write out everything queued (a last partial chunk too): afterwards no pool thread reads
        a buffer the caller gave (add_batch), and every batch's on_done has been called."""
        self._check_open()
        self._submit()
        while self._inflight:
            self._drain_one()

    def _check_small(self, a: Pages) -> Pages:
        """_check_addrs for an array('Q') of addresses (no digests), without numpy."""
        self._check_open()
        if len(a):
            self._check_order(a)
        return a

    def _check_order(self, a: Pages) -> None:
        """The checks of a non-empty page address array of either kind."""
        if ranges.is_small(a):
            unaligned = any(x & (PAGE_SIZE - 1) for x in a)
        else:
            unaligned = bool(np.any(a & np.uint64(PAGE_SIZE - 1)))
        if unaligned:
            raise ValueError("page addresses must be page-aligned")
        if ranges.as_set(a) is not a:
            raise ValueError("page addresses must ascend strictly")
        if int(a[0]) <= self._last_addr:
            raise ValueError(f"page 0x{int(a[0]):x} does not come after 0x{self._last_addr:x} (added before)")
        if int(a[-1]) >= ADDR_LIMIT:
            raise ValueError(f"page 0x{int(a[-1]):x} is above user space")

    def _check_addrs(
        self, addrs: np.ndarray, digests: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        self._check_open()
        a = np.asarray(addrs)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError("addrs must be a 1-D integer array")
        if a.dtype.kind == "i" and a.size and int(a.min()) < 0:
            raise ValueError("addrs must not be negative")
        a = a.astype(np.uint64)
        n = len(a)
        dg: np.ndarray | None = None
        if digests is not None:
            dg = np.asarray(digests).astype(np.uint64)
            if dg.shape != (n,):
                raise ValueError(f"{dg.shape} digests for {n} pages")
        if n:
            self._check_order(a)
        return a, dg

    def _queue(
        self,
        a: np.ndarray,
        dg: np.ndarray | None,
        copy: Callable[[np.ndarray, int, int], object],
    ) -> None:
        """Copy pages [0, len(a)) into chunk buffers with `copy(out, lo, hi)`, submitting full chunks."""
        n = len(a)
        if n:
            self._last_addr = int(a[-1])
        i = 0
        while i < n:
            if self._buf is None:
                if self._free:
                    self._buf = self._free.pop()
                else:
                    self._buf = np.empty((self.chunk_pages, PAGE_SIZE), np.uint8)
            take = min(self.chunk_pages - self._pend_n, n - i)
            copy(self._buf[self._pend_n : self._pend_n + take], i, i + take)
            self._pend_addrs.append(a[i : i + take])
            self._pend_digests.append(None if dg is None else dg[i : i + take])
            self._pend_n += take
            i += take
            if self._pend_n == self.chunk_pages:
                self._submit()

    def _submit(self) -> None:
        if not self._pend_n or self._buf is None:
            return
        addrs = np.concatenate(self._pend_addrs)
        known = [d for d in self._pend_digests if d is not None]
        # Digests the caller gave are used; if any piece lacks them, the pool computes them all.
        dg = np.concatenate(known) if len(known) == len(self._pend_digests) else None
        buf = self._buf[: self._pend_n]
        fut = self._run(self._pend_n, _compress_chunk, buf, dg, self.level if self.compress else None)
        self._buf, self._pend_addrs, self._pend_digests, self._pend_n = None, [], [], 0
        self._inflight.append((fut, addrs))
        while len(self._inflight) > INFLIGHT_PER_THREAD * self.threads:
            self._drain_one()

    def _run(self, pages: int, work: Callable[..., _T], *args: Any) -> Task[_T]:
        """work(*args) on the pool, or here when it is at most inline_pages pages."""
        if pages > self.inline_pages:
            return self._pool.submit(work, *args)
        return Task.done(work, *args)

    def _drain_one(self) -> np.ndarray | None:
        """Write the oldest item in flight; its addresses (None for a batch)."""
        item = self._inflight.popleft()
        if item[1] is None:
            b = item[0].result()
            for ch, addrs, rows in b.chunks:
                # A raw chunk's pages are gathered again from the caller's buffer (still unchanged),
                # into one buffer of ours where needed, written (and teed) before this returns.
                pages: np.ndarray | memoryview | None = None
                if ch.stored is None and isinstance(b.pages, memoryview):
                    pages = _rows_small(b.pages, rows, self._raw_small(len(rows)))
                elif ch.stored is None:
                    assert not isinstance(b.pages, memoryview)
                    pages = _rows_of(b.pages, rows, self._raw_rows)
                self._put(ch, addrs, pages)
            item[2](b.zero, sum(len(x[1]) for x in b.chunks))
            return None
        fut, addrs = item
        ch = fut.result()
        assert ch.buf is not None  # (a chunk of add_pages/add_rows always has its buffer)
        self._put(ch, addrs, ch.buf)
        self._recycle(ch.buf)
        return addrs

    def _raw_small(self, n: int) -> memoryview:
        if self._raw_b is None or len(self._raw_b) < n * PAGE_SIZE:
            self._raw_b = bytearray(max(n, self.chunk_pages) * PAGE_SIZE)
        return memoryview(self._raw_b)

    def _raw_rows(self, n: int) -> np.ndarray:
        if self._raw is None or len(self._raw) < n:
            self._raw = np.empty((max(n, self.chunk_pages), PAGE_SIZE), np.uint8)
        return self._raw[:n]

    def _put(self, ch: _Chunk, addrs: Pages, pages: np.ndarray | memoryview | None) -> None:
        offset = self.bytes_written
        raw = ch.stored is None
        if ch.stored is None:
            assert pages is not None
            self._write(pages if isinstance(pages, memoryview) else pages.data, (addrs, raw))
        else:
            self._write(ch.stored, (addrs, raw))
        self._chunks.append(
            ChunkRecord(offset, self.bytes_written - offset, len(addrs), ch.xxh3, raw, ch.pxxh3)
        )
        self._addrs_out.append(addrs)
        self._digests_out.append(ch.digests)

    def _recycle(self, buf: np.ndarray) -> None:
        whole = buf.base if isinstance(buf.base, np.ndarray) else buf
        if len(self._free) <= INFLIGHT_PER_THREAD * self.threads:
            self._free.append(whole)

    def finish(self, meta: LayerMeta, filled: Callable[[LayerMeta], None] | None = None) -> Path:
        """Fill meta.pages (data, digests, chunks), write metadata and footer, publish; the final path.
        `filled(meta)`: called once the page index is complete, before the metadata is encoded (a
        dump records there the digest of its chain's merged table, ckpt/image/tablecache.py)."""
        self._check_open()
        try:
            self._submit()
            while self._inflight:
                self._drain_one()
            pg = meta.pages
            pg.chunk_pages = self.chunk_pages
            pg.page_size = PAGE_SIZE
            pg.data = _concat(self._addrs_out)
            pg.digests = _concat(self._digests_out)
            pg.chunks = list(self._chunks)
            if filled is not None:
                filled(meta)
            d = meta.to_dict()
            meta_offset = self.bytes_written
            try:
                # The reader's own checks, before publishing: never write a layer it would refuse.
                # (Not for a migration's staging copy: each of its readers, the next round and the
                # destination, opens it as a layer, which runs these checks; in the final round
                # they would lengthen the downtime.)
                if self.keep_chunks:
                    LayerMeta.from_dict(d, chunk_area=(HEADER_SIZE, meta_offset))
            except MetaError as e:
                raise MetaError(f"refusing to write an invalid layer {self.path}: {e}") from None
            comp = encode_meta(d, META_LEVEL)
            digest = meta_digest(comp)
            self._write(comp)
            self._write(Footer(meta_offset, len(comp), digest).pack())
            try:
                self._sink.flush()
                self._sink.close()
                os.fsync(self._fd)
                self._publish()
                os.close(self._fd)
                self._fd = -1
            except OSError as e:
                self._io_error(e)
        except BaseException:
            self.abort()
            raise
        self._state = "finished"
        self.digest = digest.hex()
        self._pool.shutdown(wait=True)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; idempotent, and a no-op once finished."""
        if self._state != "open":
            return
        self._state = "aborted"
        for item in self._inflight:
            item[0].cancel()
        self._inflight.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError, AttributeError):
            self._sink.close()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            self._unlink_tmp(None, self._tmp_stat)
