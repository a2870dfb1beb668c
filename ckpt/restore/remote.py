"""Syscalls run inside the seized helper, and its memory, for the steps of a restore.

Unlike ckpt.ptrace.Frozen (which must leave its target exactly as it found it), a restore owns its
helper and changes everything in it, including the mappings that held the `syscall` instruction
used so far. So the site moves: first the stub's own `syscall`, then a page of ours (the "gadget"
page, placed in a hole of both layouts) that outlives every other mapping of the helper, until the
very last syscall unmaps it. Single-stepping a `syscall` stops at the syscall's exit, before the
next instruction is fetched, so even the syscall that unmaps its own page reports back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from typing import TYPE_CHECKING

from ckpt.errors import RestoreError
from ckpt.ptrace import raw, sigchld
from ckpt.ptrace.regs import MASK64, ptrace_registers_t, signed64

if TYPE_CHECKING:
    import numpy as np

SYSCALL_INSN = b"\x0f\x05"
PAGE_SIZE = 4096
IOV_MAX = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong,
]  # fmt: skip
STEP_TIMEOUT = 30.0  # one injected syscall; munmap of a huge range or a slow disk read can take a while
MAX_STOPS = 64


def buffer_address(buf: bytes | bytearray | memoryview) -> int:
    """Where `buf`'s bytes are in our memory (for a syscall to read them); `buf` must stay alive."""
    mv = memoryview(buf)
    if not mv.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(mv))
    obj = mv.obj
    if isinstance(obj, bytes) and mv.nbytes == len(obj):
        # c_char_p of a bytes object points at the object's own bytes (no copy).
        return ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0
    import numpy as np

    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data)


class Remote:
    """A seized, stopped helper process we run syscalls in."""

    def __init__(self, pid: int, site: int, shared_sigchld: bool | None = None) -> None:
        self.pid = pid
        self.site = site  # address of a `syscall` instruction in the helper
        self._regs = raw.getregs(pid)  # a valid base (segment selectors, eflags) for every injection
        self._mem = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        self.count = 0  # syscalls run, for the report
        self.scratch = 0  # memory for syscall arguments, once the gadget page is in place
        self.scratch_size = 0
        # Inject with syscall-stops, not single-steps: set once the process's SIGTRAP action is
        # SIG_IGN (a single-step's SIGTRAP is forced, and forcing an ignored signal resets its
        # action to SIG_DFL: the process would come back with SIGTRAP no longer ignored).
        self.no_traps = False
        self._tgid = 0
        # Whether another thread of ours may take the SIGCHLD a wait needs (raw.wait's `shared`),
        # found out once per helper as a freeze does (ptrace/freeze.py): every thread ckpt starts
        # blocks it, so only a thread of a program using the API could, and one listing of
        # /proc/self/task with a status read per thread at each of ~80 waits was ~15% of a small
        # restore's tracer time. (`shared_sigchld`: known already, a restored thread's Remote.)
        if shared_sigchld is None:
            shared_sigchld = bool(sigchld.unblocked_threads())
        self.shared_sigchld = shared_sigchld

    def close(self) -> None:
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1

    # -- memory -----------------------------------------------------------------------------------
    def write(self, addr: int, data: bytes | memoryview) -> None:
        """Write through /proc/PID/mem: FOLL_FORCE, so read-only private pages take it too (COW)."""
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            try:
                n = os.pwrite(self._mem, mv[done:], addr + done)
            except OSError as e:
                raise RestoreError(
                    f"cannot write {len(mv)} bytes at {addr + done:#x} in the restored process: {e.strerror}"
                ) from None
            if n <= 0:
                raise RestoreError(f"short write at {addr + done:#x} in the restored process")
            done += n

    def write_runs(self, buf: bytes | memoryview, runs: np.ndarray | list[tuple[int, int, int]]) -> None:
        """Write page runs of `buf`: rows of (address, first page in buf, pages), in one
        process_vm_writev per IOV_MAX runs. The target ranges must be writable; a call that comes
        up short (a range that is not) is redone through /proc/PID/mem, which reports the error.
        `runs`: an (n, 3) uint64 array, or (a small fill's) a list of tuples."""
        if not len(runs):
            return
        if isinstance(runs, list):
            self._write_run_list(buf, runs)
            return
        import numpy as np

        src = np.frombuffer(buf, dtype=np.uint8)
        base = src.ctypes.data
        for i in range(0, len(runs), IOV_MAX):
            part = runs[i : i + IOV_MAX]
            local = np.empty((len(part), 2), dtype=np.uint64)
            local[:, 0] = np.uint64(base) + part[:, 1] * np.uint64(PAGE_SIZE)
            local[:, 1] = part[:, 2] * np.uint64(PAGE_SIZE)
            remote = local.copy()
            remote[:, 0] = part[:, 0]
            want = int(local[:, 1].sum())
            got = _libc.process_vm_writev(
                self.pid, local.ctypes.data, len(part), remote.ctypes.data, len(part), 0
            )
            if got != want:
                for a, p0, n in part.tolist():
                    self.write(a, memoryview(buf)[p0 * PAGE_SIZE : (p0 + n) * PAGE_SIZE])

    def _write_run_list(self, buf: bytes | memoryview, runs: list[tuple[int, int, int]]) -> None:
        """write_runs for runs in a list: the iovecs built in ctypes arrays, without numpy."""
        base = buffer_address(buf)
        for i in range(0, len(runs), IOV_MAX):
            part = runs[i : i + IOV_MAX]
            local = (ctypes.c_uint64 * (2 * len(part)))()
            remote = (ctypes.c_uint64 * (2 * len(part)))()
            want = 0
            for j, (a, p0, n) in enumerate(part):
                local[2 * j] = base + p0 * PAGE_SIZE
                local[2 * j + 1] = remote[2 * j + 1] = n * PAGE_SIZE
                remote[2 * j] = a
                want += n * PAGE_SIZE
            got = _libc.process_vm_writev(self.pid, local, len(part), remote, len(part), 0)
            if got != want:
                for a, p0, n in part:
                    self.write(a, memoryview(buf)[p0 * PAGE_SIZE : (p0 + n) * PAGE_SIZE])

    def put(self, data: bytes, offset: int = 0) -> int:
        """Copy syscall arguments into the scratch area; their address in the helper."""
        if not self.scratch or offset < 0 or offset + len(data) > self.scratch_size:
            raise RestoreError(
                f"{len(data)} bytes of syscall arguments do not fit the restore's scratch area"
            )
        self.write(self.scratch + offset, data)
        return self.scratch + offset

    def put_str(self, s: str, offset: int = 0) -> int:
        return self.put(os.fsencode(s) + b"\0", offset)

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            try:
                b = os.pread(self._mem, size - len(out), addr + len(out))
            except OSError as e:
                raise RestoreError(
                    f"cannot read {size} bytes at {addr:#x} in the helper: {e.strerror}"
                ) from None
            if not b:
                raise RestoreError(f"short read at {addr + len(out):#x} in the helper")
            out += b
        return bytes(out)

    # -- syscalls ---------------------------------------------------------------------------------
    def syscall(self, nr: int, *args: int) -> int:
        """Run syscall `nr` in the helper; the raw result (negative is -errno)."""
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        r = ptrace_registers_t.from_buffer_copy(self._regs)
        r.rax = nr
        r.orig_rax = MASK64  # -1: no syscall in progress, so nothing is restarted around ours
        r.rip = self.site
        for name, v in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
            setattr(r, name, v & MASK64)
        try:
            raw.setregs(self.pid, r)
            rax = self._step_syscall() if self.no_traps else self._step().rax
        except ProcessLookupError:
            raise RestoreError(f"the restore helper {self.pid} died (killed from outside?)") from None
        self.count += 1
        return signed64(rax)

    def check(self, what: str, nr: int, *args: int) -> int:
        """syscall(), raising RestoreError naming `what` on failure."""
        r = self.syscall(nr, *args)
        if -4095 <= r < 0:
            raise RestoreError(
                f"{what} failed in the restored process: {os.strerror(-r)} ({errno.errorcode.get(-r, -r)})"
            )
        return r

    def _next_stop(self, silent: str) -> raw.WaitResult:
        """The helper's next stop; `silent` (with {pid}) is the error when none comes in time."""
        w = raw.wait(self.pid, STEP_TIMEOUT, shared=self.shared_sigchld)
        if w is None:
            raise RestoreError(silent.format(pid=self.pid))
        if w.exited:
            raise RestoreError(f"the restore helper {self.pid} died during the restore")
        return w

    def _kept_stopping(self) -> RestoreError:
        return RestoreError(
            f"the restore helper {self.pid} kept stopping for other reasons ({MAX_STOPS} stops)"
        )

    def _step(self) -> ptrace_registers_t:
        """Single-step the `syscall` at the site; the registers at its exit. One stop per syscall
        (PTRACE_SYSCALL would take two): the helper is ours, so the SIGTRAP a single-step forces
        changes nothing anyone relies on (ptrace/inject.py says why a dump's target differs)."""
        done = self.site + len(SYSCALL_INSN)
        for _ in range(MAX_STOPS):
            raw.singlestep(self.pid)
            w = self._next_stop("an injected syscall in the restore helper {pid} did not return")
            if w.is_signal_stop and w.sig == signal.SIGTRAP:
                regs = raw.getregs(self.pid)
                if regs.rip == done:
                    return regs
            # Anything else (an interrupt-stop, or a signal such as a terminal's SIGINT to our process
            # group) is not ours: stepping again with signal 0 drops it. The helper is not yet the
            # restored process, so nothing it was meant to receive is lost.
        raise self._kept_stopping()

    def _step_syscall(self) -> int:
        """Run the `syscall` at the site to its exit with PTRACE_SYSCALL (an entry stop, then the
        exit stop): two stops instead of one, but neither is a signal. rax at the exit. A syscall-stop
        is told from a signal by its siginfo (ptrace_notify's si_code is the stop's own SIGTRAP or
        SIGTRAP|0x80, whatever PTRACE_O_TRACESYSGOOD is: creds.py sets the options it needs)."""
        done = self.site + len(SYSCALL_INSN)
        entered = False
        for _ in range(MAX_STOPS):
            raw.resume_syscall(self.pid)
            w = self._next_stop("an injected syscall in the restore helper {pid} did not return")
            if w.stopped and w.event == 0 and w.sig & 0x7F == signal.SIGTRAP:
                code = raw.siginfo_code(raw.getsiginfo(self.pid))
                if code & 0x7F == signal.SIGTRAP:  # a syscall-stop
                    if not entered:
                        entered = True
                        continue
                    regs = raw.getregs(self.pid)
                    if regs.rip == done:
                        self._to_signal_stop()
                        return int(regs.rax)
            # Anything else is not ours (dropped, as in _step): on to the next stop.
        raise self._kept_stopping()

    def _to_signal_stop(self) -> None:
        """From a syscall-exit stop to a signal-delivery-stop, where a single-step leaves the helper:
        only from there does the kernel apply the restart rules to the registers loaded last (a
        thread dumped inside read() would get -ERESTARTSYS as read's result instead). A SIGSTOP sent
        from here is taken before any code of the helper runs, and the next resume drops it."""
        if not self._tgid:
            with open(f"/proc/{self.pid}/status") as f:
                self._tgid = next(int(ln.split()[1]) for ln in f if ln.startswith("Tgid:"))
        raw.tgkill(self._tgid, self.pid, signal.SIGSTOP)
        for _ in range(MAX_STOPS):
            raw.cont(self.pid)
            w = self._next_stop("the restore helper {pid} did not stop")
            if w.is_signal_stop and w.sig == signal.SIGSTOP:
                return
        raise self._kept_stopping()
