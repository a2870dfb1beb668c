"""The target's memory through /proc/PID/mem, one fd for the whole freeze.

/proc/PID/mem writes go through FOLL_FORCE, so a tracer may also write read-only text pages (how a
``syscall`` instruction is patched in when the vdso has none).
"""

from __future__ import annotations

import errno
import os

from ckpt.errors import TargetError, TargetExited
from ckpt.proc import list_threads, read_stat


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

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
