"""A full dump's copy buffer, faulted in while the `ckpt dump` command is still importing.

Faulting in the buffer that takes the pages copied while the target is frozen costs 1-9 us a page
on these VMs (~80 ms per 256 MiB; more the first time the guest touches the memory), and must
happen before the freeze. Importing ckpt and numpy costs ~0.15 s of one CPU, holding the GIL;
MADV_POPULATE_WRITE, through ctypes, runs without it. Started first, the faults run on the other
CPU meanwhile (two threads: both CPUs once the imports are done). Stdlib only: this module is
imported before numpy.

The pages are faulted in by reading one byte of /dev/zero into each of them (readv, 1024 pages a
call), not by MADV_POPULATE_WRITE over the whole buffer: that holds the mmap lock of ckpt's process
for as long as it runs (~50-150 ms per 128 MiB half here), so every mmap or brk of the imports
meanwhile (numpy's and zstandard's shared objects, Python's arenas) waited for it, which put the
faults back on the command's critical path. A fault taken by readv holds the lock for that one
page. (MADV_POPULATE_WRITE remains the fallback.)

The size is a guess from /proc/PID/smaps_rollup (Rss: every present page of the process); the dump
makes its own estimate later and adds a buffer for any shortfall, before the freeze as ever.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import mmap
import os
import threading

PAGE_SIZE = 4096
MADV_POPULATE_WRITE = 23  # Linux >= 5.14
SPLIT = 64 << 20  # above this, two threads share the faults

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.readv.restype = ctypes.c_ssize_t
IOV_PAGES = 1024  # IOV_MAX: pages faulted in by one readv


class EarlyBuffer:
    """An anonymous mapping of `npages` pages being faulted in by background threads."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        size = npages * PAGE_SIZE
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self._ok = [True, True]
        half = (size // 2) & ~(PAGE_SIZE - 1) if size > SPLIT else size
        parts = [(0, half), (half, size)] if half < size else [(0, size)]
        # Daemon threads: a command that fails before using the buffer exits without waiting.
        self._threads = [
            threading.Thread(target=self._populate, args=(i, lo, hi), name="ckpt-prefault", daemon=True)
            for i, (lo, hi) in enumerate(parts)
        ]
        for t in self._threads:
            t.start()

    def _populate(self, i: int, lo: int, hi: int) -> None:
        done = touch_pages(self.addr + lo, (hi - lo) // PAGE_SIZE)
        lo += done * PAGE_SIZE
        if lo < hi:
            self._ok[i] = _libc.madvise(self.addr + lo, hi - lo, MADV_POPULATE_WRITE) == 0

    def take(self) -> tuple[mmap.mmap, bool]:
        """The mapping, once faulted in; and whether that worked (False where neither /dev/zero nor
        MADV_POPULATE_WRITE could: the caller touches the pages itself)."""
        for t in self._threads:
            t.join()
        return self.map, all(self._ok)

    @classmethod
    def for_pid(cls, pid: int, max_bytes: int) -> EarlyBuffer | None:
        """A buffer for a full dump of `pid`, or None when its size cannot be guessed (the dump
        then sizes its own, and reports any error about the process itself)."""
        rss = _rss_bytes(pid)
        if rss is None:
            return None
        # The dump's own margin (dump.py): 1/16 over the present pages, plus a chunk.
        npages = min(rss // PAGE_SIZE * 17 // 16 + 256, max(max_bytes // PAGE_SIZE, 256))
        try:
            return cls(npages)
        except (OSError, ValueError):
            return None


def touch_pages(addr: int, npages: int) -> int:
    """Fault in `npages` pages of ours from `addr` by reading a zero byte into each; how many were.

    ctypes drops the GIL around each readv; building the next 1024 addresses holds it ~0.1 ms."""
    try:
        fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        iov = array.array("Q", bytes(16 * IOV_PAGES))
        iov[1::2] = array.array("Q", [1]) * IOV_PAGES  # every iovec one byte long
        base = iov.buffer_info()[0]
        done = 0
        while done < npages:
            k = min(IOV_PAGES, npages - done)
            start = addr + done * PAGE_SIZE
            iov[0 : 2 * k : 2] = array.array("Q", range(start, start + k * PAGE_SIZE, PAGE_SIZE))
            r = _libc.readv(fd, base, k)
            if r <= 0:  # an error (or nothing read): the caller falls back for the rest
                break
            done += r  # one byte a page: a short read (a signal) resumes where it stopped
        return done
    finally:
        os.close(fd)


def _rss_bytes(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/smaps_rollup") as f:
        for ln in f:
            if ln.startswith("Rss:"):
                return int(ln.split()[1]) * 1024
    return None
