"""A served full dump's copy buffer, kept allocated by `ckpt service` from one dump to the next.

A full dump copies the target's pages, while it is frozen, into a buffer faulted in before the
freeze (ckpt/prefault.py). In-process that fault-in runs beside the command's imports; through the
service there are no imports left to hide it behind, and it was the dump's "buffer" phase: ~100-150
ms of the 256 MiB dump's wall here (2 x ~80 ms of CPU allocating and zeroing 65536 pages), plus
~20-30 ms to free them again at the end.

So the service keeps the pages: a memfd (shared memory, never mapped by the service itself, so its
forks copy no page table for it). The child of a full `dump` that finds it free is lent its
descriptor; the dump maps the first pages it needs, shared, and makes their page table entries with
MADV_POPULATE_READ (prefault.EarlyBuffer with `fd`): where the pages exist, each fault only maps 16
of them, writable, ~0.5 us a page (30-40 ms of one CPU per 256 MiB against ~150-250 ms for fresh
anonymous pages); where the file was smaller, the dump grows it and the first fault of each new page
allocates it, at ~2x an anonymous page's cost, once. Unmapping it at the end frees nothing.

* One dump at a time: the buffer is lent to one child, and is the service's again when that child
  has exited. A dump that finds it lent (or a service started with `--warm-buffer 0`) takes an
  ordinary anonymous buffer, as in-process.
* Size: the largest that a dump needed, up to `cap` bytes (`ckpt service --warm-buffer MIB`, 1024 by
  default): a dump that needs more takes an anonymous buffer, as in-process.
* Freed (the file truncated to nothing) after `idle` seconds without a full dump (`ckpt service
  --warm-idle SECONDS`, 300 by default), and with the service. It is shared memory: counted in the
  service's cgroup (Shmem in /proc/meminfo), and reclaimed only by swapping, but for its pages no
  dump wrote (made by the populate's read faults: clean zeros), which the kernel may drop as it
  drops clean file pages (reclaim, MADV_PAGEOUT, a DAMON pageout scheme): the next dump that needs
  them allocates them again.
* Old data: the buffer holds the previous dump's pages. A dump only ever stores the rows it copied
  into (memory.read_pages: failed pages take no row), so none of them can reach a layer; they stay in
  the service's memory, for the service's own user only, until the next dump overwrites them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass

from ckpt.prefault import PAGE_SIZE, EarlyBuffer, guess_pages

DEFAULT_CAP = 1 << 30
DEFAULT_IDLE = 300.0

# In the service's child that was lent the buffer: its descriptor and the service's cap.
_lent: list[int] = []


@dataclass
class WarmStore:
    """The service's side: the memfd, and which child has it."""

    cap: int = DEFAULT_CAP  # bytes; 0: never lent
    idle: float = DEFAULT_IDLE  # seconds without a full dump before its pages are freed
    fd: int = -1
    owner: int = 0  # the pid of the child it is lent to
    last: float = 0.0  # time.monotonic() when it was last given back

    def lend(self) -> int:
        """The descriptor for a full dump's child about to be forked, or -1 (lent, or turned off)."""
        if self.cap <= 0 or self.owner:
            return -1
        if self.fd < 0:
            try:
                self.fd = os.memfd_create("ckpt-warm", os.MFD_CLOEXEC)
            except OSError:  # (no descriptor left: the dump takes an anonymous buffer)
                return -1
        return self.fd

    def lent(self, pid: int) -> None:
        self.owner = pid

    def allocated(self) -> int:
        """Bytes of the buffer's pages that exist (allocated by the dumps that used it)."""
        return os.fstat(self.fd).st_blocks * 512 if self.fd >= 0 else 0

    def returned(self, pid: int) -> None:
        if pid == self.owner:
            self.owner = 0
            self.last = time.monotonic()

    def timeout(self) -> float | None:
        """How long the service's loop may wait for a request before step() has work."""
        if self.fd < 0 or self.owner or not self.allocated():
            return None
        return max(0.0, self.last + self.idle - time.monotonic())

    def step(self) -> dict[str, object] | None:
        """Free the pages of a buffer idle for `idle` seconds; what to log when it did."""
        if self.fd < 0 or self.owner or not self.allocated() or time.monotonic() < self.last + self.idle:
            return None
        os.ftruncate(self.fd, 0)
        return {"warm_buffer": 0, "why": f"no full dump for {self.idle:g} s"}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def in_child(store: WarmStore, mine: bool, above: int) -> None:
    """In a child of the service, before it moves the client's descriptors into place: the
    buffer's descriptor closed, or (`mine`: lent to this child) moved to `above` or higher (the
    client's descriptors take numbers below that, on their way too) and kept for for_pid(); where
    the descriptor limit leaves no number there, closed, and the dump takes an anonymous buffer."""
    if store.fd < 0:
        return
    if mine:
        # (no number left above the client's, under the descriptor limit: the dump goes without)
        with contextlib.suppress(OSError):
            _lent[:] = [fcntl.fcntl(store.fd, fcntl.F_DUPFD_CLOEXEC, above), store.cap]
    os.close(store.fd)


def for_pid(pid: int, max_bytes: int) -> EarlyBuffer | None:
    """The lent buffer, mapped for a full dump of `pid`, its page table entries being made (and,
    where it was smaller, its new pages allocated); None where there is none here (in-process, not
    lent, no guess of the size, or more than the service's cap: the dump takes an anonymous buffer)."""
    if not _lent:
        return None
    fd, cap = _lent
    del _lent[:]
    try:
        npages = guess_pages(pid, max_bytes)
        if npages is None or npages * PAGE_SIZE > cap:
            return None
        if os.fstat(fd).st_size < npages * PAGE_SIZE:
            # Grown, never shrunk here: a hole's page is allocated by its first fault (the populate),
            # ~2x an anonymous page's cost, once; the next dumps find it.
            os.ftruncate(fd, npages * PAGE_SIZE)
        return EarlyBuffer(npages, fd=fd)
    except (OSError, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
