"""A full dump's copy buffer, faulted in while the `ckpt dump` command is still importing.

Faulting in the buffer that takes the pages copied while the target is frozen costs 1-9 us a page
on these VMs (~80 ms per 256 MiB; more the first time the guest touches the memory), and must
happen before the freeze. Importing ckpt and numpy costs ~0.15 s of one CPU, holding the GIL;
MADV_POPULATE_WRITE, through ctypes, runs without it. Started first, the faults run on the other
CPU meanwhile (two threads: both CPUs once the imports are done). Stdlib only: this module is
imported before numpy.

MADV_POPULATE_WRITE goes 1 MiB at a time, not over each half at once: one call holds the mmap lock
of ckpt's process for as long as it runs (~50-100 ms per 128 MiB half here), and every mmap, munmap
or brk of the imports meanwhile (numpy's and zstandard's shared objects, Python's arenas) waited
for it, as did the second thread's own start (its stack): the imports stood still while one CPU
faulted pages and the other idled. In steps, an mmap waits ~0.2-0.5 ms on average (11 ms at worst
at a load of 10); the faults cost the same CPU (reading a byte of /dev/zero into each page instead
took the lock per fault and ~30% more CPU; memset, which faults under the per-VMA lock, ~50% more).

The size is a guess from /proc/PID/statm (resident: every present page of the process); the dump
makes its own estimate later and adds a buffer for any shortfall, before the freeze as ever.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading

from ckpt.threadpool import start as start_thread

PAGE_SIZE = 4096
MADV_POPULATE_READ = 22  # Linux >= 5.14
MADV_POPULATE_WRITE = 23
SPLIT = 64 << 20  # above this, two threads share the faults

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
STEP = 1 << 20  # bytes faulted in by one madvise: the longest the imports wait for the mmap lock


class EarlyBuffer:
    """An anonymous mapping of `npages` pages being faulted in by background threads.

    With `fd` (a `ckpt service`'s warm buffer, ckpt/warmbuf.py: a memfd whose pages the service
    allocated once): a shared mapping of its first `npages` pages, whose page table entries are
    made by MADV_POPULATE_READ. The pages exist already, so each fault only maps them, 16 at a time
    (the kernel's fault-around), writable (a shared mapping needs no copy on write): ~30-40 ms of
    one CPU per 256 MiB here against ~150-250 ms to allocate and zero anonymous pages."""

    def __init__(self, npages: int, fd: int = -1) -> None:
        self.npages = npages
        size = npages * PAGE_SIZE
        if fd >= 0:
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        else:
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.advice = MADV_POPULATE_READ if fd >= 0 else MADV_POPULATE_WRITE
        self.private = fd < 0  # an anonymous mapping of its own (the dump may give its pages back)
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
            start_thread(t)

    def _populate(self, i: int, lo: int, hi: int) -> None:
        self._ok[i] = populate(self.addr + lo, hi - lo, self.advice)

    def take(self) -> tuple[mmap.mmap, bool]:
        """The mapping, once faulted in; and whether MADV_POPULATE_WRITE did it (False on a kernel
        without it: the caller touches the pages itself)."""
        for t in self._threads:
            t.join()
        return self.map, all(self._ok)

    @classmethod
    def for_pid(cls, pid: int, max_bytes: int) -> EarlyBuffer | None:
        """A buffer for a full dump of `pid`, or None when its size cannot be guessed (the dump
        then sizes its own, and reports any error about the process itself)."""
        npages = guess_pages(pid, max_bytes)
        if npages is None:
            return None
        try:
            return cls(npages)
        except (OSError, ValueError):
            return None


def guess_pages(pid: int, max_bytes: int) -> int | None:
    """The copy buffer's pages for a full dump of `pid`, guessed from its Rss; None: no guess."""
    rss = _rss_bytes(pid)
    if rss is None:
        return None
    # The dump's own margin (dump.py): 1/16 over the present pages, plus a chunk.
    return min(rss // PAGE_SIZE * 17 // 16 + 256, max(max_bytes // PAGE_SIZE, 256))


def populate(addr: int, nbytes: int, advice: int = MADV_POPULATE_WRITE) -> bool:
    """MADV_POPULATE_WRITE (or `advice`) over [addr, addr + nbytes), STEP bytes a call; False if
    the kernel refused (Linux < 5.14: the caller touches the pages itself).

    Each call holds ckpt's mmap lock for ~0.3-0.5 ms here; one call over a 128 MiB half held it
    ~50-100 ms. ctypes drops the GIL around each call."""
    for off in range(0, nbytes, STEP):
        if _libc.madvise(addr + off, min(STEP, nbytes - off), advice) != 0:
            return False
    return True


def _rss_bytes(pid: int) -> int | None:
    """The process's resident bytes: /proc/PID/statm's second field, the kernel's RSS counters
    (anonymous + file + shmem pages; the same sum smaps_rollup's Rss walks the page tables for).
    smaps_rollup took 13-19 ms of CPU and 32-66 ms of wall for a 256 MiB target here (it walks every
    page table entry, and holds the target's mmap lock meanwhile), on the dump's path before the
    copy buffer could start; statm reads counters: 0.1-0.3 ms. The counters are per-CPU sums that
    may lag by a few pages: a guess, which the dump's margin and its own estimate cover."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE
    return None
