"""The target's memory through /proc/PID/mem, one fd for the whole freeze.

/proc/PID/mem writes go through FOLL_FORCE, so a tracer may also write read-only text pages (how a
``syscall`` instruction is patched in when the vdso has none).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from ckpt.errors import TargetError, TargetExited
from ckpt.proc import list_threads, read_stat

IOV_MAX = 1024
_libc = ctypes.CDLL(None, use_errno=True)
for _name in ("process_vm_readv", "process_vm_writev"):
    _fn = getattr(_libc, _name)
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong,
    ]  # fmt: skip


def process_alive(pid: int, tid: int | None = None) -> bool:
    """The thread (or, without tid, any thread of the process) exists and has not exited."""
    try:
        if tid is not None:
            return not read_stat(pid, tid).is_zombie
        if not read_stat(pid).is_zombie:  # (one read: it was read twice, ~20 us each in a freeze)
            return True
        # A zombie leader whose other threads still run (it called pthread_exit).
        return any(not read_stat(pid, t).is_zombie for t in list_threads(pid) if t != pid)
    except TargetExited:
        return False


def mm_gone(pid: int) -> bool:
    """No thread of the process still has its memory: it is exiting (SIGKILL tears the mm down well
    before any thread shows as a zombie). /proc/PID/status lists Vm* lines only while a task has an mm."""
    try:
        for tid in list_threads(pid):
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    if any(ln.startswith("VmSize:") for ln in f):
                        return False
            except OSError:
                continue
    except TargetExited:
        pass
    return True


class ProcMem:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                raise TargetExited(f"process {self.pid} exited during the dump") from None
        return self._fd

    def _fail(self, e: OSError, what: str, addr: int, size: int) -> TargetError:
        if e.errno == errno.ESRCH or not process_alive(self.pid) or mm_gone(self.pid):
            return TargetExited(f"process {self.pid} exited during the dump")
        return TargetError(f"cannot {what} {size} bytes at {addr:#x} in process {self.pid}: {e.strerror}")

    def read(self, addr: int, size: int) -> bytes:
        fd = self._open()
        out = bytearray()
        while len(out) < size:
            try:
                chunk = os.pread(fd, size - len(out), addr + len(out))
            except OSError as e:
                raise self._fail(e, "read", addr, size) from None
            if not chunk:
                # The mm is gone (the process is exiting) or the range ends at an unmapped page.
                raise self._fail(OSError(errno.EIO, "short read"), "read", addr, size)
            out += chunk
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        fd = self._open()
        done = 0
        while done < len(data):
            try:
                n = os.pwrite(fd, data[done:], addr + done)
            except OSError as e:
                raise self._fail(e, "write", addr, len(data)) from None
            if n <= 0:
                raise self._fail(OSError(errno.EIO, "short write"), "write", addr, len(data))
            done += n

    def read_many(self, areas: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (address, size), in one process_vm_readv per IOV_MAX areas: a batch
        reads the stack area of every thread it runs in (one pread each was ~5 us a thread). The
        areas must be readable without FOLL_FORCE (a thread's stack); a call that comes up short
        is redone area by area through /proc/PID/mem, which reports the error."""
        out: list[bytes] = []
        for i in range(0, len(areas), IOV_MAX):
            part = areas[i : i + IOV_MAX]
            total = sum(n for _, n in part)
            buf = ctypes.create_string_buffer(total)
            local, remote = _iovecs(ctypes.addressof(buf), part)
            if _libc.process_vm_readv(self.pid, local, len(part), remote, len(part), 0) != total:
                out += [self.read(a, n) for a, n in part]
                continue
            raw, off = buf.raw, 0
            for _, n in part:
                out.append(raw[off : off + n])
                off += n
        return out

    def write_many(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Each (address, bytes) written, in one process_vm_writev per IOV_MAX writes (read_many's
        counterpart: the areas must be writable without FOLL_FORCE)."""
        for i in range(0, len(writes), IOV_MAX):
            part = writes[i : i + IOV_MAX]
            data = b"".join(d for _, d in part)
            if not data:
                continue
            buf = ctypes.create_string_buffer(data, len(data))
            local, remote = _iovecs(ctypes.addressof(buf), [(a, len(d)) for a, d in part])
            if _libc.process_vm_writev(self.pid, local, len(part), remote, len(part), 0) != len(data):
                for a, d in part:
                    self.write(a, d)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _iovecs(base: int, areas: Sequence[tuple[int, int]]) -> tuple[ctypes.Array[ctypes.c_uint64], ...]:
    """(local, remote) iovec arrays: the areas laid end to end from ``base``, and where they are."""
    local = (ctypes.c_uint64 * (2 * len(areas)))()
    remote = (ctypes.c_uint64 * (2 * len(areas)))()
    off = 0
    for j, (addr, n) in enumerate(areas):
        local[2 * j], local[2 * j + 1] = base + off, n
        remote[2 * j], remote[2 * j + 1] = addr, n
        off += n
    return local, remote
