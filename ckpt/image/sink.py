"""Appending a layer's bytes to its file, with O_DIRECT for the bulk where the filesystem allows it.

Writing through the page cache ran at ~0.25-0.42 GB/s on these machines (each new page-cache page
costs ~10 us); O_DIRECT with 8 MiB writes at 2.2-2.9 GB/s (../shared/PERF-NOTES.md). A layer is
written once and read rarely, so the cache buys nothing. Whole aligned blocks go out O_DIRECT from
an aligned staging buffer; the last partial block goes through the ordinary fd at the end. Where
O_DIRECT is refused (tmpfs, some network filesystems), everything takes the ordinary path.

Two staging buffers: while one block is being written (by a thread of its own: pwrite releases the
GIL), the caller fills the other. A dump's writer thread, which also feeds the compression threads,
otherwise sat ~50 ms per 256 MiB dump in O_DIRECT pwrite calls while those threads ran out of work.
That thread is started with `_thread.start_new_thread`, and its end is a lock it releases: a
`threading.Thread`'s start() waits until the new thread has run (it needs a CPU and the GIL, which
the compression threads' Python between their calls holds), and a 256 MiB dump's writer thread sat
31-50 ms in its eight block starts (measured: ~1 ms of CPU), feeding neither the compression threads
nor the disk meanwhile. (Where the disk is slower than the compression, ~600 MB/s O_DIRECT on the
virtio disk of docs/benchmarks.md's dumpcpu9 section, the join of the block before then waits
instead: the disk's rate bounds the phase.)
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from _thread import LockType, allocate_lock, start_new_thread
from collections.abc import Callable


def _sync_every() -> int:
    try:
        return int(os.environ.get("CKPT_SINK_SYNC", SYNC_EVERY))
    except ValueError:
        return SYNC_EVERY


# Bytes written O_DIRECT after which a thread of its own fdatasyncs what is written so far (0: never).
# O_DIRECT leaves the data in the disk's volatile cache (a virtio disk's: the host's page cache), and
# the layer's one fsync at the end made the host write all of it out then: 100-200 ms per ~100 MB
# layer here, after the last chunk. Synced as it goes, beside the compression, the last fsync has
# only the tail left (measured: 60-150 ms -> ~16 ms for 80 MiB).
SYNC_EVERY = 32 << 20


def _memmove() -> Callable[[int, int, int], object]:
    """ctypes.memmove (a foreign call: ctypes releases the GIL around it), imported at first use."""
    import ctypes

    return ctypes.memmove


def _address(b: bytes) -> int:
    """The address of a bytes object's own buffer (no copy; valid while `b` lives)."""
    import ctypes

    addr = ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value
    assert addr is not None
    return addr


def _buffer_address(m: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(m))


class FileSink:
    BLOCK = 8 << 20
    MEMMOVE_MIN = 64 << 10  # smaller pieces: a slice assignment, holding the GIL (no call to set up)

    def __init__(self, fd: int, direct: bool = True) -> None:
        """`direct` False: everything through the ordinary fd (a file whose chunks are left as
        holes, a migration's staging copy: O_DIRECT would write their zeros out)."""
        self.fd = fd
        self.size = 0  # bytes appended so far
        self._dfd = -1
        self._stages: list[mmap.mmap] = []
        self._addrs: list[int] = []
        try:
            if not direct:
                raise OSError("not asked for")
            # A second open file description of the same inode, for O_DIRECT, reached through the
            # fd's /proc link, never through the file's name: whoever can write the dump
            # directory could have put anything under that name since we created it.
            self._dfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            if not os.path.samestat(os.fstat(self._dfd), os.fstat(fd)):
                raise OSError("the O_DIRECT descriptor is not our file")
            self._stages = [mmap.mmap(-1, self.BLOCK) for _ in range(2)]  # page-aligned, as O_DIRECT requires
            # Their addresses, for _memmove (the ctypes object that exported each is gone at once, so
            # the mmap can still be closed; the address is used only while it is open).
            self._addrs = [_buffer_address(m) for m in self._stages]
        except (OSError, AttributeError):
            self._close_direct()
        self._cur = 0  # the staging buffer being filled
        self._fill = 0
        self._base = 0  # file offset of the staging buffer's first byte
        self._plain = False  # O_DIRECT was refused at the first write: blocks go through self.fd
        self._busy: LockType | None = None  # the block write in flight: held until it is done
        self._error: BaseException | None = None
        self._sync_every = _sync_every() if self._stages else 0
        self._synced = 0  # bytes written O_DIRECT when the last fdatasync started
        self._syncing: threading.Thread | None = None

    @property
    def direct(self) -> bool:
        return self._dfd >= 0 and not self._plain

    def write(self, data: bytes | memoryview) -> None:
        with memoryview(data) as raw, raw.cast("B") as mv:
            start = self.size
            self.size += len(mv)
            if not self._stages:
                self._pwrite_all(self.fd, mv, start)
                return
            stage = self._stages[self._cur]
            # A large `bytes` (a compressed chunk's frame: nearly all of a dump's bytes) is copied by
            # a C call that lets go of the GIL meanwhile; a slice assignment held it for the copy and
            # the staging pages' first faults: ~40-50 ms per 256 MiB dump in which the compression
            # threads waited for the GIL to go on (their Python between zstd calls).
            src = _address(data) if type(data) is bytes and len(mv) >= self.MEMMOVE_MIN else None
            pos = 0
            while pos < len(mv):
                n = min(len(mv) - pos, self.BLOCK - self._fill)
                if src is not None:
                    _memmove()(self._addrs[self._cur] + self._fill, src + pos, n)
                else:
                    stage[self._fill : self._fill + n] = mv[pos : pos + n]
                self._fill += n
                pos += n
                if self._fill == self.BLOCK:
                    self._flush_block()
                    stage = self._stages[self._cur]

    def _flush_block(self) -> None:
        """Hand the full staging buffer to a writing thread and go on with the other one."""
        self._wait()
        block, offset = self._stages[self._cur], self._base
        done = allocate_lock()
        done.acquire()
        self._busy = done
        start_new_thread(self._write_block_then, (block, offset, done))  # (no wait for it to run)
        self._cur ^= 1
        self._base += self.BLOCK
        self._fill = 0

    def _write_block_then(self, block: mmap.mmap, offset: int, done: LockType) -> None:
        try:
            self._write_block(block, offset)
        finally:
            done.release()

    def _write_block(self, block: mmap.mmap, offset: int) -> None:
        try:
            if not self._plain:
                try:
                    self._pwrite_all(self._dfd, block, offset)
                except OSError as e:
                    if e.errno != 22:  # EINVAL: the filesystem accepted O_DIRECT at open but not for I/O
                        raise
                    self._plain = True
            if self._plain:
                self._pwrite_all(self.fd, block, offset)
        except BaseException as e:  # given to the caller at its next write, flush or close
            self._error = e
            return
        end = offset + self.BLOCK
        due = self._sync_every and end - self._synced >= self._sync_every
        if due and (self._syncing is None or not self._syncing.is_alive()):
            self._synced = end
            # (daemon given: left to inherit it, Thread() would ask current_thread(), which in a
            # thread started by _thread makes a _DummyThread that threading keeps for good)
            self._syncing = threading.Thread(target=self._datasync, name="ckpt-sync", daemon=False)
            self._syncing.start()

    def _datasync(self) -> None:
        with contextlib.suppress(OSError):  # (not kept: the layer's own fsync at the end reports it)
            os.fdatasync(self.fd)

    def _join_block(self) -> None:
        """Until the block in flight, if any, is written (its thread gives the lock back)."""
        if self._busy is not None:
            with self._busy:  # (one C call each way: no Ctrl-C between taking it and giving it back)
                pass
            self._busy = None

    def _wait(self) -> None:
        self._join_block()
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def flush(self) -> None:
        """Wait for the block in flight, then write out the partial last block (through the ordinary
        fd: it need not be aligned)."""
        self._wait()
        if self._stages and self._fill:
            self._pwrite_all(self.fd, self._stages[self._cur], self._base, self._fill)
            self._base += self._fill
            self._fill = 0

    def skip(self, n: int) -> None:
        """Leave n bytes out: a hole where the file is written plainly (a migration's source keeps
        only the metadata of the layers it streams), zeros where it goes through O_DIRECT."""
        if not self._stages:
            self.size += n
            return
        zero = bytes(min(n, 1 << 20))
        while n > 0:
            self.write(memoryview(zero)[: min(n, len(zero))])
            n -= min(n, len(zero))

    def close(self) -> None:
        try:
            self._join_block()
            if self._syncing is not None:
                self._syncing.join()
                self._syncing = None
        finally:
            self._close_direct()

    def _close_direct(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        self._addrs = []
        for s in self._stages:
            s.close()
        self._stages = []

    @staticmethod
    def _pwrite_all(
        fd: int, buf: bytes | memoryview | mmap.mmap, offset: int, length: int | None = None
    ) -> None:
        # Every view is released by its `with`, even when pwrite fails: a view left alive in a
        # traceback would keep the staging mmap from being closed.
        with memoryview(buf) as view:
            end = len(view) if length is None else length
            pos = 0
            while pos < end:
                with view[pos:end] as part:
                    pos += os.pwrite(fd, part, offset + pos)
