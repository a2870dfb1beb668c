"""A restore's layers read into the page cache while the `ckpt restore` command is still importing.

A dump writes its layer with O_DIRECT (image/sink.py), so a restore right after it finds none of it
in the page cache: each fill thread's read of a chunk waits for the disk, and the page cache's
pages are allocated in that read (a 256 MiB process's layer is ~69 MB). The command first spends
~0.25 s importing on one CPU; a thread started before the imports reads the layers meanwhile, on
the other CPU, and the fill's reads then copy from the cache. posix_fadvise(WILLNEED) and
readahead(2) would not do it: the kernel caps them at the device's readahead window (~128 KiB
here), whatever the length asked.

Only regular files named as layers are read (never a FIFO or a device a path might name), newest
first, at most MAX_BYTES in all; the bytes are thrown away (the restore reads and checks the layer
itself). Errors are ignored: they are the restore's to report. Stdlib only: this module is imported
before the restore's modules.

Each file's metadata goes first (where its footer says it is), then its chunks from the start: the
restore's first read is the metadata, at the end of the file, which otherwise queued at the disk
behind the read-ahead of the chunks (the check of a 1 GiB restore: ~0.1 s later).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
import threading

from ckpt.threadpool import start as start_thread

MAX_BYTES = 1 << 30  # what one restore reads ahead at most, over all its layers
STEP = 1 << 20  # bytes a read (where sendfile is refused): the stop flag is looked at between reads
# Bytes a sendfile: few calls, since each return waits for the GIL, which the importing main thread
# holds (up to the 5 ms switch interval each time: 1 MiB steps made 69 MB take >0.3 s).
SEND_STEP = 16 << 20
_LAYER = re.compile(r"layer-(\d{4,})\.ckpt\Z")
# The layer's footer (image/format.py, image/framing.py; a test keeps them equal): magic, metadata
# offset and length, digest, checksum. Only a hint here: the restore checks the real one.
_FOOTER = struct.Struct("<8sQQ16s8s")
_FOOTER_MAGIC = b"CKPTFOOT"


class Readahead:
    """Reads `paths` (in that order) into the page cache on a thread of its own until done or
    stopped."""

    def __init__(self, paths: list[str]) -> None:
        self._stop = threading.Event()
        self.bytes_read = 0
        self._null = -1  # /dev/null, opened by the thread
        # Daemon: a command that fails before stop() exits without waiting for it.
        self._thread = threading.Thread(target=self._run, args=(paths,), name="ckpt-readahead", daemon=True)
        start_thread(self._thread)

    def _run(self, paths: list[str]) -> None:
        buf = bytearray(STEP)
        try:
            # sendfile() to /dev/null fills the cache without copying a byte out of it: ~4 ms of CPU
            # per 69 MB against ~17-22 ms for reads into a buffer (and another ~12 ms for the
            # fill's own reads either way).
            self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            self._null = -1
        try:
            self._run_paths(paths, buf)
        finally:
            if self._null >= 0:
                os.close(self._null)

    def _run_paths(self, paths: list[str], buf: bytearray) -> None:
        for p in paths:
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    size = st.st_size
                    meta = _meta_offset(fd, size)
                    self._read(fd, buf, meta, size)
                    self._read(fd, buf, 0, meta)
                finally:
                    os.close(fd)
            if self._stop.is_set() or self.bytes_read >= MAX_BYTES:
                return

    def _read(self, fd: int, buf: bytearray, start: int, end: int) -> None:
        off = start
        while off < end and not self._stop.is_set() and self.bytes_read < MAX_BYTES:
            left = min(end - off, MAX_BYTES - self.bytes_read)
            n = -1
            if self._null >= 0:
                try:
                    n = os.sendfile(self._null, fd, off, min(SEND_STEP, left))
                except OSError:
                    self._null_off()  # (a filesystem without it): reads from here on
            if n < 0:
                want = min(len(buf), left)
                n = os.preadv(fd, [memoryview(buf)[:want]], off)
            if not n:
                break
            off += n
            self.bytes_read += n

    def _null_off(self) -> None:
        os.close(self._null)
        self._null = -1

    def stop(self) -> None:
        """Stop reading (after the read in progress) and wait for the thread to end."""
        self._stop.set()
        self._thread.join()

    @classmethod
    def for_image(cls, path: str) -> Readahead | None:
        """A reader for what `ckpt restore PATH` reads: the layer file itself, or a dump directory's
        layers, newest first (most pages come from the newest); None if there is nothing to read."""
        try:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                found = [(int(m.group(1)), e.path) for e in os.scandir(path) if (m := _LAYER.match(e.name))]
                paths = [p for _, p in sorted(found, reverse=True)]
            elif stat.S_ISREG(st.st_mode):
                paths = [path]
            else:
                return None
        except (OSError, ValueError):
            return None
        return cls(paths) if paths else None


def _meta_offset(fd: int, size: int) -> int:
    """Where the metadata of the layer open at `fd` begins, by its footer; `size` (nothing first)
    if the footer does not look like one."""
    if size < _FOOTER.size:
        return size
    raw = os.pread(fd, _FOOTER.size, size - _FOOTER.size)
    if len(raw) != _FOOTER.size:
        return size
    magic, offset, length, _, _ = _FOOTER.unpack(raw)
    if magic != _FOOTER_MAGIC or offset + length + _FOOTER.size != size:
        return size
    return offset
