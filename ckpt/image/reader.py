"""Layer: one layer file, opened and checked; its pages read chunk by chunk, verified."""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import stat
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import xxhash

from ckpt.errors import ChainError, CorruptLayer, LayerError
from ckpt.image.format import (
    FOOTER_SIZE,
    PAGE_SIZE,
    AnonFdRecord,
    FdRecord,
    Inventory,
    LayerMeta,
    MetaError,
    MmRecord,
    PageIndex,
    PipeRecord,
    PropsRecord,
    SigactionRecord,
    TaskRecord,
    ThreadRecord,
    VmaRecord,
    page_digests,
)
from ckpt.image.framing import MAX_HEADER_SIZE, Footer, Header, declared_size, decode_meta, meta_digest
from ckpt.image.objects import check_contents
from ckpt.image.recmemo import RecordMemo
from ckpt.image.tree import TreeRecord
from ckpt.image.validate import is_numpy
from ckpt.lightstd import zstandard  # (without its import of platform)
from ckpt.threadpool import Task, ThreadPool

if TYPE_CHECKING:
    import numpy as np

_local = threading.local()
# Enough decompressed chunks (1 MiB each by default) for reads that wander back and forth a little.
CACHE_CHUNKS = 8
# Chunks decompressed ahead by iter_chunks; bounds its memory to a few chunks.
PREFETCH = 4

_Ident = tuple[int, int, int, int]


def _dctx() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _pread(fd: int, offset: int, n: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        b = os.pread(fd, min(n, 1 << 30), offset)
        if not b:
            break
        parts.append(b)
        offset += len(b)
        n -= len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _check_declared(frame: bytes | memoryview, want: int, where: str) -> None:
    """The frame's declared content size, checked before decompressing: never trust a frame
    header for an allocation; the size must be exactly the chunk's pages."""
    declared = declared_size(frame, where)
    if declared != want:
        raise CorruptLayer(f"{where} is corrupt (frame declares {declared} bytes, expected {want})")


def _check_frame(frame: bytes | memoryview, got: int, want: int, xxh3: int, where: str) -> None:
    """A chunk's stored bytes as read: `got` of the `want` it has, which must be all, and their
    checksum."""
    if got != want:
        raise CorruptLayer(f"{where} is truncated")
    if xxhash.xxh3_64_intdigest(frame) != xxh3:
        raise CorruptLayer(f"{where} is corrupt (checksum mismatch)")


def _ident(st: os.stat_result) -> _Ident:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


class NotRegular(OSError):
    """The path names something other than a regular file; strerror says what it is."""


def open_regular(path: str | bytes | Path, *, nofollow: bool = False) -> tuple[int, os.stat_result]:
    """Open a file named by a layer (or a user) for reading, only if it is a regular file.

    O_NONBLOCK: opening a FIFO for reading would wait for a writer forever, and a tty or device
    open can block or have side effects; O_NOCTTY: never acquire a controlling terminal. Then
    fstat the descriptor (not the name, which may have changed) and refuse anything but a
    regular file: /dev/urandom or a FIFO has no bytes that belong in a checkpoint. Raises
    OSError (NotRegular for the wrong kind of file)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = next((w for test, w in _KINDS if test(st.st_mode)), "not a regular file")
            raise NotRegular(errno.EINVAL, f"it is {what}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_file(p: Path) -> tuple[int, os.stat_result]:
    try:
        return open_regular(p)
    except FileNotFoundError:
        raise LayerError(f"no layer at {p}") from None
    except PermissionError:
        raise LayerError(f"cannot read layer {p}: permission denied") from None
    except NotRegular as e:
        raise LayerError(
            f"{p} is not a layer file: {e.strerror} (layers are named like layer-0001.ckpt)"
        ) from None
    except OSError as e:
        raise LayerError(f"cannot open layer {p}: {e.strerror}") from None
    except ValueError:  # a NUL in the name
        raise LayerError(f"cannot open layer {p!r}: the name contains a NUL character") from None


def _load(fd: int, size: int, p: Path, memo: RecordMemo | None = None) -> tuple[Header, Footer, LayerMeta]:
    """Read and check header, footer and metadata; the chunks are left for later. `memo`: records
    checked in a layer opened before with it, and the same again here, are not checked again."""
    header = Header.unpack(_pread(fd, 0, min(size, MAX_HEADER_SIZE)), p)
    if size < header.header_size + FOOTER_SIZE:
        raise CorruptLayer(f"layer {p} is truncated ({size} bytes): the footer is missing")
    footer = Footer.unpack(_pread(fd, size - FOOTER_SIZE, FOOTER_SIZE), size, header.header_size, p)
    comp = _pread(fd, footer.meta_offset, footer.meta_length)
    if len(comp) != footer.meta_length:
        raise CorruptLayer(f"layer {p}: metadata is truncated")
    if meta_digest(comp) != footer.meta_digest:
        raise CorruptLayer(f"layer {p}: metadata is corrupt (checksum mismatch)")
    d = decode_meta(comp, p)
    try:
        meta = LayerMeta.from_dict(d, chunk_area=(header.header_size, footer.meta_offset), memo=memo)
    except MetaError as e:
        raise CorruptLayer(f"layer {p}: metadata is invalid: {e}") from None
    if meta.inventory.version != header.version:
        raise CorruptLayer(
            f"layer {p}: metadata is invalid: "
            f"version {meta.inventory.version} but the header says {header.version}"
        )
    if meta.pages.chunk_pages != header.chunk_pages:
        raise CorruptLayer(f"layer {p}: metadata is invalid: chunk_pages differs from the header's")
    return header, footer, meta


class ChunkBuffers:
    """Buffers for Layer.read_chunk_into, reused from chunk to chunk (one set per thread). They
    grow to the largest chunk read, a few MiB at most for chunks of the default 256 pages."""

    def __init__(self) -> None:
        self._frame = bytearray()
        self._pages = bytearray()
        self.spare = bytearray(1)

    def frame(self, n: int) -> memoryview:
        if len(self._frame) < n:
            self._frame = bytearray(n)
        return memoryview(self._frame)[:n]

    def pages(self, n: int) -> memoryview:
        if len(self._pages) < n:
            self._pages = bytearray(n)
        return memoryview(self._pages)[:n]


PREFETCH_MAX = 1 << 30  # bytes of a layer's chunks Layer.prefetch asks the kernel to read ahead


class Layer:
    """One opened layer. Thread-safe for reading.

    The file stays open; close() releases it (and the chunk cache), and a later read reopens it,
    refusing if the file was replaced or changed meanwhile.
    """

    def __init__(
        self, path: Path, fd: int, ident: _Ident, header: Header, footer: Footer, meta: LayerMeta
    ) -> None:
        self.path = path
        self.header = header
        self.footer = footer
        self.meta = meta
        self.digest = footer.digest
        self.size = ident[2]
        self._fd = fd
        self._ident = ident
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, tuple[bytes, bool]] = OrderedDict()  # chunk -> (data, pages verified)
        self._first = meta.pages.chunk_first()

    @classmethod
    def open(cls, path: str | Path, *, memo: RecordMemo | None = None) -> Layer:
        p = Path(path)
        fd, st = _open_file(p)
        try:
            header, footer, meta = _load(fd, st.st_size, p, memo)
        except BaseException:
            os.close(fd)
            raise
        return cls(p, fd, _ident(st), header, footer, meta)

    def __del__(self) -> None:
        # A Layer dropped without close() must not leak its descriptor (long chains, verify loops).
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            # At interpreter exit `os` may already be torn down.
            with contextlib.suppress(Exception):
                os.close(fd)

    def __repr__(self) -> str:
        return f"Layer({str(self.path)!r}, digest={self.digest})"

    def __enter__(self) -> Layer:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the records ----------------------------------------------------------------------------
    @property
    def inventory(self) -> Inventory:
        return self.meta.inventory

    @property
    def vmas(self) -> list[VmaRecord]:
        return self.meta.vmas

    @property
    def threads(self) -> list[ThreadRecord]:
        return self.meta.threads

    @property
    def sigactions(self) -> list[SigactionRecord]:
        return self.meta.sigactions

    @property
    def fds(self) -> list[FdRecord]:
        return self.meta.fds

    @property
    def mm(self) -> MmRecord:
        return self.meta.mm

    @property
    def task(self) -> TaskRecord:
        return self.meta.task

    @property
    def props(self) -> PropsRecord | None:
        return self.meta.props

    @property
    def tree(self) -> TreeRecord | None:
        return self.meta.tree

    @property
    def pages(self) -> PageIndex:
        return self.meta.pages

    @property
    def pipes(self) -> list[PipeRecord]:
        return self.meta.pipes

    @property
    def anonfds(self) -> list[AnonFdRecord]:
        return self.meta.anonfds

    # -- the file -------------------------------------------------------------------------------
    def _file(self) -> int:
        with self._lock:
            if self._fd < 0:
                fd, st = _open_file(self.path)
                if _ident(st) != self._ident:
                    os.close(fd)
                    raise LayerError(f"layer {self.path} was replaced or changed since it was opened")
                self._fd = fd
            return self._fd

    def close(self) -> None:
        """Release the file descriptor and cached chunks (reads reopen the file if needed)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._cache.clear()

    # -- pages ----------------------------------------------------------------------------------
    def data_index(self, addr: int) -> int:
        """Index of `addr` among this layer's data pages, or -1."""
        data = self.pages.data
        if is_numpy(data):
            import numpy as np

            i = int(np.searchsorted(data, np.uint64(addr)))
        else:
            i = bisect.bisect_left(data, addr)
        return i if i < len(data) and int(data[i]) == addr else -1

    def chunk_of(self, index: Any) -> Any:
        """Chunk holding data page `index`: an int for an int, a numpy array for a numpy array, a
        list for any other sequence of ints."""
        if isinstance(index, int) or not hasattr(index, "__len__"):
            return bisect.bisect_right(self._first, int(index)) - 1
        if is_numpy(index):
            import numpy as np

            return np.searchsorted(self._first, index, side="right") - 1
        first = self._first
        return [bisect.bisect_right(first, i) - 1 for i in index]

    @property
    def chunk_starts(self) -> Any:
        """Index of each chunk's first data page, then the number of data pages (int64: a numpy
        array for a layer of numpy columns, else an array('q'))."""
        return self._first

    def chunk_addrs(self, ci: int) -> Any:
        return self.pages.data[int(self._first[ci]) : int(self._first[ci + 1])]

    def _read_frame(self, ci: int, fd: int | None = None) -> bytes:
        """Chunk `ci`'s compressed frame, its length and xxh3_64 checked."""
        c = self.pages.chunks[ci]
        where = f"layer {self.path}: chunk {ci} at offset {c.offset}"
        frame = _pread(self._file() if fd is None else fd, c.offset, c.clen)
        _check_frame(frame, len(frame), c.clen, c.xxh3, where)
        return frame

    def prefetch(self) -> None:
        """Ask the kernel to start reading the chunk area into the page cache, without waiting: a
        layer written with O_DIRECT is not cached, and a restore that then reads it chunk by chunk
        would wait on the disk for each one instead of decompressing meanwhile. At most the first
        PREFETCH_MAX bytes: the kernel submits the reads before it returns, and a layer larger than
        the page cache would only evict its own beginning."""
        with contextlib.suppress(OSError, AttributeError):
            size = min(self.footer.meta_offset, PREFETCH_MAX)
            os.posix_fadvise(self._file(), 0, size, os.POSIX_FADV_WILLNEED)

    def check_chunks(self, indices: Iterable[int] | np.ndarray) -> None:
        """The checksums of the given chunks' stored bytes, read from the file, without
        decompressing: a cheap look at whether the bytes a reader will need are still intact
        (read_chunk checks them again, and the decompressed pages, when it reads them)."""
        n = len(self.pages.chunks)
        fd = self._file()
        for i in indices:
            ci = int(i)
            if not 0 <= ci < n:
                raise IndexError(f"layer {self.path} has no chunk {ci}")
            self._read_frame(ci, fd)

    def _load_chunk(self, ci: int) -> bytes:
        """Read one chunk, check its checksum (and declared size), decompress it unless it is raw."""
        c = self.pages.chunks[ci]
        where = f"layer {self.path}: chunk {ci} at offset {c.offset}"
        frame = self._read_frame(ci)
        want = c.npages * PAGE_SIZE
        if c.raw:  # the format requires clen == want and pxxh3 == xxh3: already checked
            return frame
        _check_declared(frame, want, where)
        try:
            # allow_extra_data=False: bytes after the frame are damage (FORMAT.md), not slack.
            data = _dctx().decompress(frame, max_output_size=want, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise CorruptLayer(f"{where} is corrupt (zstd: {e})") from None
        if len(data) != want:
            raise CorruptLayer(f"{where} is corrupt (decompressed to {len(data)} bytes, expected {want})")
        if c.pxxh3 is not None and xxhash.xxh3_64_intdigest(data) != c.pxxh3:
            raise CorruptLayer(f"{where} is corrupt (its pages' checksum does not match once decompressed)")
        return data

    def read_chunk_into(self, ci: int, bufs: ChunkBuffers) -> memoryview:
        """Chunk `ci`'s pages, checked as _load_chunk checks them, in `bufs` (reused buffers: fresh
        ones would cost a page fault per 4 KiB, more than reading and decompressing them), not
        cached; valid until `bufs` is used again. For a caller that writes the pages and then
        forgets them (a restore), and checks no page digest (the chunk's pages checksum covers
        them; a version 1 layer has only the digests: read_chunk for it).

        One difference: an empty or skippable zstd frame after the chunk's frame goes unnoticed
        (stream decompression stops there); it changes no byte of the pages, which are checked."""
        c = self.pages.chunks[ci]
        if c.pxxh3 is None:
            return memoryview(self.read_chunk(ci))
        where = f"layer {self.path}: chunk {ci} at offset {c.offset}"
        want = c.npages * PAGE_SIZE
        fbuf = bufs.frame(c.clen)
        got = os.preadv(self._file(), [fbuf], c.offset) if len(fbuf) else 0
        while 0 < got < c.clen:  # a short read of a regular file: only at its end, or a signal
            n = os.preadv(self._file(), [fbuf[got:]], c.offset + got)
            if not n:
                break
            got += n
        _check_frame(fbuf, got, c.clen, c.xxh3, where)
        if c.raw:  # clen == want and pxxh3 == xxh3 (the format's rule): already checked
            return fbuf
        _check_declared(fbuf, want, where)
        out = bufs.pages(want)
        try:
            r = _dctx().stream_reader(fbuf, read_size=len(fbuf), read_across_frames=True)
            n = 0
            while n < want:
                k = r.readinto(out[n:])
                if not k:
                    break
                n += k
            # Anything after the frame that decodes to bytes (a frame more, or garbage, which
            # raises) is damage.
            extra = r.readinto(bufs.spare) if n == want else 0
        except zstandard.ZstdError as e:
            raise CorruptLayer(f"{where} is corrupt (zstd: {e})") from None
        if n != want or extra:
            raise CorruptLayer(
                f"{where} is corrupt (decompressed to {n + extra} bytes or more, expected {want})"
            )
        if xxhash.xxh3_64_intdigest(out) != c.pxxh3:
            raise CorruptLayer(f"{where} is corrupt (its pages' checksum does not match once decompressed)")
        return out

    def _verify_pages(self, ci: int, data: bytes) -> None:
        lo, hi = int(self._first[ci]), int(self._first[ci + 1])
        want = self.pages.digests[lo:hi]
        if is_numpy(want):
            import numpy as np

            bad = page_digests(data) != want
            first = int(np.argmax(bad)) if bool(bad.any()) else -1
        else:  # a small layer: one xxh3 call a page either way, without numpy's arrays
            mv = memoryview(data)
            h = xxhash.xxh3_64_intdigest
            first = next(
                (j for j, d in enumerate(want) if h(mv[j * PAGE_SIZE : (j + 1) * PAGE_SIZE]) != d), -1
            )
        if first >= 0:
            addr = int(self.pages.data[lo + first])
            raise CorruptLayer(f"layer {self.path}: page 0x{addr:x} digest mismatch (chunk {ci})")

    def _whole_checked(self, ci: int) -> bool:
        """Whether _load_chunk's checks cover every byte of the pages: in version 2 the chunk's own
        checksum of its pages does, so the per-page digests (for diff and incremental dumps) need
        not be recomputed to read it; a version 1 layer has only them."""
        return self.pages.chunks[ci].pxxh3 is not None

    def _cached(self, ci: int) -> tuple[bytes, bool] | None:
        with self._lock:
            ent = self._cache.get(ci)
            if ent is not None:
                self._cache.move_to_end(ci)
            return ent

    def cached_chunk(self, ci: int) -> bytes | None:
        """Chunk `ci`'s pages if an earlier read left them in the cache with every byte checked (as
        read_chunk_into would check them), else None: a restore reads again no chunk it already
        decompressed to check a page first (a vdso page, a page left to its file)."""
        ent = self._cached(ci)
        if ent is None or not (ent[1] or self._whole_checked(ci)):
            return None
        return ent[0]

    def _remember(self, ci: int, data: bytes, verified: bool) -> None:
        with self._lock:
            self._cache[ci] = (data, verified)
            self._cache.move_to_end(ci)
            while len(self._cache) > CACHE_CHUNKS:
                self._cache.popitem(last=False)

    def read_chunk(self, ci: int, *, check_digests: bool = True) -> bytes:
        """Chunk `ci` decompressed and verified (cached): its checksums, and every page digest.

        `check_digests=False` leaves out the per-page digests where the layer has a checksum of the
        chunk's pages (version 2): the bytes are then as checked, one xxh3 call for the chunk
        instead of one per page, but the digests the metadata gives for them are not compared (a
        restore, which writes the bytes and does not otherwise use the digests, reads so)."""
        if not 0 <= ci < len(self.pages.chunks):
            raise IndexError(f"layer {self.path} has no chunk {ci}")
        ent = self._cached(ci)
        if ent is not None and (ent[1] or (not check_digests and self._whole_checked(ci))):
            return ent[0]
        data = ent[0] if ent is not None else self._load_chunk(ci)
        checked = check_digests or not self._whole_checked(ci)
        if checked:
            self._verify_pages(ci, data)
        self._remember(ci, data, checked)
        return data

    def read_page(self, addr: int) -> bytes:
        """This layer's own data page at `addr`, verified; LayerError if the layer does not store it."""
        i = self.data_index(addr)
        if i < 0:
            raise LayerError(f"layer {self.path} stores no data for page 0x{addr:x}")
        ci = int(self.chunk_of(i))
        ent = self._cached(ci)
        if ent is None:
            data = self._load_chunk(ci)
            self._remember(ci, data, False)
        else:
            data = ent[0]
        off = (i - int(self._first[ci])) * PAGE_SIZE
        page = data[off : off + PAGE_SIZE]
        if xxhash.xxh3_64_intdigest(page) != int(self.pages.digests[i]):
            raise CorruptLayer(f"layer {self.path}: page 0x{addr:x} digest mismatch (chunk {ci})")
        return page

    def _load_verified(self, ci: int) -> bytes:
        data = self._load_chunk(ci)
        self._verify_pages(ci, data)
        return data

    def iter_chunks(self) -> Iterator[tuple[Any, bytes]]:
        """(page addresses, decompressed pages) for each chunk in order, every checksum verified.

        Decompresses a few chunks ahead on two threads; bypasses the cache so a full pass does not
        evict what random reads use.
        """
        n = len(self.pages.chunks)
        if not n:
            return
        # ckpt's pool, not concurrent.futures': a Ctrl-C in the waiting main thread (`ckpt verify`
        # of a big layer) cannot leave a Condition's lock held there that a worker then waits for
        # (ckpt/threadpool.py, Latch), and its wait ends at the Ctrl-C even when a worker took it.
        pool = ThreadPool(2, "ckpt-unzstd")
        ahead: deque[Task[bytes]] = deque()
        try:
            nxt = 0
            for ci in range(n):
                while nxt < n and len(ahead) < PREFETCH:
                    ahead.append(pool.submit(self._load_verified, nxt))
                    nxt += 1
                data = ahead.popleft().result()
                yield self.chunk_addrs(ci), data
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def verify(self) -> None:
        """Check every checksum again from the file: header, footer, metadata, chunks, page digests."""
        fd = self._file()
        size = os.fstat(fd).st_size
        if size != self.size:
            raise CorruptLayer(
                f"layer {self.path} changed size since it was opened ({self.size} -> {size} bytes)"
            )
        _, footer, _ = _load(fd, size, self.path)
        if footer.digest != self.digest:
            raise CorruptLayer(f"layer {self.path}: metadata changed since the layer was opened")
        for _ in self.iter_chunks():
            pass
        for o in self.meta.objects:
            try:
                check_contents(o)
            except MetaError as e:
                raise CorruptLayer(f"layer {self.path}: {e}") from None

    # -- the chain ------------------------------------------------------------------------------
    def parent_path(self) -> Path | None:
        ref = self.inventory.parent
        if ref is None:
            return None
        pp = Path(ref.path)
        return pp if pp.is_absolute() else self.path.parent / pp

    def parent(self, memo: RecordMemo | None = None) -> Layer | None:
        """Open the parent this layer names; ChainError if it is missing or no longer the same.
        `memo`: records its metadata repeats from a layer opened before with the same memo (a
        chain's layers mostly do: mappings, signal actions, fds) are not checked again."""
        pp = self.parent_path()
        ref = self.inventory.parent
        if pp is None or ref is None:
            return None
        try:
            par = Layer.open(pp, memo=memo)
        except LayerError as e:
            if type(e) is not LayerError:  # damaged, or a newer version: said as it is
                raise
            if str(e).startswith("no layer at"):
                raise ChainError(f"parent layer {pp} of {self.path} is missing") from None
            raise ChainError(f"parent layer of {self.path}: {e}") from None
        if par.digest != ref.digest:
            par.close()
            raise ChainError(
                f"parent layer {pp} no longer matches what {self.path} recorded "
                f"(digest {par.digest}, recorded {ref.digest})"
            )
        return par
