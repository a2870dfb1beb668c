"""Pages into fresh anonymous memory with UFFDIO_COPY (as CRIU's lazy-pages daemon puts them).

process_vm_writev into never-touched memory faults every page in the target first: the kernel
allocates a page, zeroes it, and only then copies our bytes over it (2 µs a page here, the
largest part of a restore). UFFDIO_COPY allocates the page and copies into it, without the fault
or the zeroing: 256 MiB in 80-90 ms of CPU against 135-165 ms (measured in C, 1 MiB at a time).

The userfaultfd must belong to the process it fills, so the helper creates it (one injected
syscall); ckpt takes a copy with pidfd_getfd and closes the helper's. Every ioctl after that runs
in ckpt on the copy (they act on the mm the userfaultfd was made in), one per run of pages, from
any thread (ctypes lets go of the GIL).

Only private anonymous mappings that are filled through a writable mapping are registered
(MISSING mode), and only while the fill runs: nothing else may touch a registered range meanwhile.
UFFD_USER_MODE_ONLY makes that safe as well as sure: a kernel-mode fault there (process_vm_writev,
/proc/PID/mem) fails at once instead of waiting for a handler that never comes.

A mapping whose pages come in short runs (a chain whose top layers each hold every 7th page) is
left to process_vm_writev, which takes 1024 runs per call where this takes one: the choice is per
mapping, before the fill, from the plan's table.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
from typing import TYPE_CHECKING, Any

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.proc.pipes import pidfd_getfd
from ckpt.ranges import in_spans
from ckpt.restore.remote import Remote

if TYPE_CHECKING:
    import numpy as np

PAGE_SIZE = 4096
UFFDIO_COPY = 0xC028AA03
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
_UFFDIO_COPY_BIT = 1 << 3  # in the ioctls a register answers with: UFFDIO_COPY is allowed there
MIN_RUN_PAGES = 4  # mean pages per run of a mapping at or above which UFFDIO_COPY fills it

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class _Copy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


def _ioctl(fd: int, req: int, arg: ctypes.Array[ctypes.c_uint64] | _Copy) -> int:
    """0, or the errno of a failed ioctl."""
    if _libc.ioctl(fd, req, ctypes.addressof(arg)) < 0:
        return ctypes.get_errno()
    return 0


class UffdFill:
    """A userfaultfd of the helper, with `spans` (sorted [start, end) of whole mappings) registered."""

    def __init__(self, fd: int, spans: list[tuple[int, int]]) -> None:
        self.fd = fd
        self.spans = spans
        self._index()

    def _index(self) -> None:
        """The lookups of `spans`: a list for bisect; numpy arrays (for a chunk's addresses in a
        numpy array) made when first asked for."""
        self._np: tuple[np.ndarray, np.ndarray] | None = None
        self._starts = [s for s, _ in self.spans]

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._np is None:
            import numpy as np

            self._np = (
                np.array([s for s, _ in self.spans], dtype=np.uint64),
                np.array([e for _, e in self.spans], dtype=np.uint64),
            )
        return self._np

    @classmethod
    def open(cls, remote: Remote, spans: list[tuple[int, int]]) -> UffdFill | None:
        """Register `spans` in a new userfaultfd of the helper, or None where the kernel or its
        settings refuse (no userfaultfd, a seccomp filter, no pidfd_getfd): the fill then takes
        process_vm_writev for them, as before."""
        if not spans:
            return None
        tfd = remote.syscall(nr.USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | nr.UFFD_USER_MODE_ONLY)
        if tfd < 0:
            return None
        fd = -1
        try:
            pidfd = os.pidfd_open(remote.pid)
            try:
                fd = pidfd_getfd(pidfd, tfd)
            finally:
                os.close(pidfd)
        except OSError:
            pass
        finally:
            # The process must not find it among its fds, whatever happens next.
            remote.check("closing the restore's userfaultfd", nr.CLOSE, tfd)
        if fd < 0:
            return None
        self = cls(fd, [])
        try:
            api = (ctypes.c_uint64 * 3)(nr.UFFD_API, 0, 0)
            if _ioctl(fd, nr.UFFDIO_API, api):
                self.close()
                return None
            for s, e in spans:
                reg = (ctypes.c_uint64 * 4)(s, e - s, UFFDIO_REGISTER_MODE_MISSING, 0)
                if _ioctl(fd, nr.UFFDIO_REGISTER, reg) or not reg[3] & _UFFDIO_COPY_BIT:
                    self.close()
                    return None
                self.spans.append((s, e))
        except BaseException:
            self.close()
            raise
        self._index()
        return self

    def covers(self, addrs: np.ndarray) -> np.ndarray:
        """Which of the (sorted) page addresses are in a registered span."""
        return in_spans(addrs, *self._arrays())

    def span_index(self, addr: int) -> int:
        """The index of the registered span holding `addr`, or -1."""
        return self.span_holding(addr, addr)

    def span_holding(self, first: int, last: int) -> int:
        """The index of the span that holds both addresses (so all between), or -1."""
        i = bisect.bisect_right(self._starts, first) - 1
        return i if i >= 0 and last < self.spans[i][1] else -1

    def span_of(self, addrs: np.ndarray) -> Any:
        import numpy as np

        return np.searchsorted(self._arrays()[0], addrs, side="right") - 1

    def copy(self, dst: int, src: int, length: int) -> int:
        """UFFDIO_COPY `length` bytes from our address `src` to `dst` in the helper (one span); the
        ioctls it took, for the report (counted by the caller's thread: fills run in several)."""
        c = _Copy(dst, src, length, 0, 0)
        done = 0
        calls = 0
        while True:
            err = _ioctl(self.fd, UFFDIO_COPY, c)
            calls += 1
            if not err:
                return calls
            # EAGAIN: the mm changed under the copy (it did part, said in .copy); go on from there.
            if err == errno.EAGAIN and c.copy > 0:
                done += c.copy
                c.dst, c.src, c.len, c.copy = dst + done, src + done, length - done, 0
                continue
            raise RestoreError(
                f"cannot write {length} bytes at {dst + done:#x} in the restored process "
                f"(UFFDIO_COPY): {os.strerror(err)}"
            )

    def close(self) -> None:
        """Unregister every span (the mappings' flags are as before) and drop the userfaultfd."""
        if self.fd < 0:
            return
        for s, e in self.spans:
            rng = (ctypes.c_uint64 * 2)(s, e - s)
            _ioctl(self.fd, nr.UFFDIO_UNREGISTER, rng)  # closing unregisters too; this says it first
        self.spans = []
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1
