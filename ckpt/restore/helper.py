"""The helper process a restore turns into the checkpointed one (CRIU's "restorer" task).

It is a tiny static program with no libc (stub.S), built here into an ELF image in memory and
run from a memfd, so a restore needs no compiler and leaves no file behind. The stub clone3()s a
child with CLONE_PARENT: the child is our own child (we can wait for it like any child) and, when
asked, gets the dumped pid through clone3's set_tid. The child waits in pause() until we seize it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import struct
from dataclasses import dataclass

from ckpt.errors import RestoreError
from ckpt.ptrace import raw
from ckpt.restore.parent import as_parent

# Where the stub is linked. Any address works: it is unmapped before the dumped mappings are
# created, and the restore's own pages are placed in holes of both layouts.
STUB_BASE = 0x10000000
CODE_OFFSET = 0xC0  # after the ELF header (64 bytes) and two program headers (2 x 56)

# stub.S assembled (gcc -c; objcopy -O binary -j .text): the code, then the data it addresses.
_CODE = bytes.fromhex(
    "b86e0000000f054989c4488d3d6f000000be50000000b8b30100000f054885c07429488905af0000008b3da5"
    "000000488d35a2000000ba08000000b8010000000f0531ffb83c0000000f05b89d000000bf01000000be0900"
    "00000f05b86e0000000f054939c47509b8220000000f05ebf7bf01000000b8e70000000f050f1f00"
)
_ARGS_OFF, _TID_OFF, _RESFD_OFF, _RESULT_OFF, _END = 0x80, 0xD0, 0xD4, 0xD8, 0xE0
PAUSE_SYSCALL = 0x6D  # offset of the child's `syscall` (pause) in the code: the first injection site

# The stub's page (one RWX page at STUB_BASE, its code 0x170 bytes from CODE_OFFSET) as a restore
# uses it while a helper still runs the stub: where injected syscalls are made, and free space for
# their arguments (restore/tree.py's clone3 and sigaction, restore/pidns.py's), a name, and the
# code of a --pidns namespace's init.
SITE = STUB_BASE + CODE_OFFSET + PAUSE_SYSCALL  # the first injection site: the child's pause()
ARGS_AT = STUB_BASE + 0x800  # clone3's arguments
TID_AT = STUB_BASE + 0x880  # clone3's set_tid array
NAME_AT = STUB_BASE + 0xB80  # a name for PR_SET_NAME
SIGACT_AT = STUB_BASE + 0x900  # a struct sigaction
INIT_AT = STUB_BASE + 0xC00  # the init's code (restore/pidinit.S), in its own stub page

CLONE_PARENT = 0x8000
PTRACE_O_EXITKILL = 0x100000  # the helper dies with us if ckpt is killed: never a stray half-built process
START_TIMEOUT = 10.0
# Why a dumped pid was not kept, when another process has it: say what would keep it.
IN_USE = "it is in use; --pidns keeps it (ckpt restore --pidns, ckpt serve --pidns)"


def stub_code(set_tid: int, resfd: int) -> bytes:
    """The stub's code and data with clone3's arguments filled in."""
    tid_addr = STUB_BASE + CODE_OFFSET + _TID_OFF
    # clone3 refuses a set_tid pointer with set_tid_size 0 (and the reverse): both or neither.
    want = (tid_addr, 1) if set_tid else (0, 0)
    # exit_signal must be 0 with CLONE_PARENT: the child takes the stub's own (SIGCHLD, from posix_spawn).
    args = struct.pack("<10Q", CLONE_PARENT, 0, 0, 0, 0, 0, 0, 0, *want)
    return _CODE + args + struct.pack("<iiq", set_tid, resfd, 0)


def stub_elf(set_tid: int, resfd: int) -> bytes:
    """A static ELF64 executable of one RWX segment holding stub_code()."""
    body = stub_code(set_tid, resfd)
    assert len(body) == _END
    size = CODE_OFFSET + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, STUB_BASE + CODE_OFFSET, 64, 0, 0, 64, 56, 2, 64, 0, 0
    )
    load = struct.pack("<IIQQQQQQ", 1, 7, 0, STUB_BASE, STUB_BASE, size, size, 0x1000)
    # PT_GNU_STACK without PF_X: a non-executable stack, which the restored process inherits nothing of.
    gnu_stack = struct.pack("<IIQQQQQQ", 0x6474E551, 6, 0, 0, 0, 0, 0, 16)
    head = ehdr + load + gnu_stack
    return head + bytes(CODE_OFFSET - len(head)) + body


@dataclass
class Helper:
    pid: int
    wanted_pid: int | None  # the pid asked for, if any
    pid_note: str  # why the wanted pid was not given, or ""


def _spawn_stub(mfd: int, wfd: int) -> int:
    """The stub started (posix_spawn: subprocess and its imports, selectors among them, are not worth
    it for one program with no arguments); its pid. The memfd has no O_CLOEXEC; the pipe's end is
    kept across the exec by a dup2 onto itself. The stub's other inherited fds are the helper's to
    close (memory.clear_helper closes all above 2). SIGPIPE and SIGXFSZ back to SIG_DFL, which
    Python ignores (as Popen's restore_signals does)."""
    return os.posix_spawn(
        f"/proc/self/fd/{mfd}",
        [f"/proc/self/fd/{mfd}"],
        {},
        file_actions=[(os.POSIX_SPAWN_DUP2, wfd, wfd)],
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


def _reap_stub(pid: int) -> int:
    """The stub's wait status, once it has exited (it does at once after writing its result); one
    that has not within START_TIMEOUT is killed first."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = -1
    if pidfd >= 0:
        try:
            if not _readable(pidfd):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        # A host program (ckpt used as a library) that ignores SIGCHLD or reaps with waitpid(-1)
        # took it: its status is unknown. (-1: not an exit status; the caller names it so.)
        return -1


def _readable(fd: int) -> bool:
    """`fd` readable within START_TIMEOUT (poll: select() cannot take an fd above 1023, which a
    library host with many files open gives us)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(int(START_TIMEOUT * 1000)))


def _run_stub(set_tid: int) -> int:
    """Run the stub once; clone3's result: the child's pid, or -errno."""
    mfd = os.memfd_create("ckpt-restore-helper", 0)
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(mfd, stub_elf(set_tid, wfd))
        try:
            # From ckpt's long-lived thread: the helper is its child (parent.py).
            stub = as_parent(lambda: _spawn_stub(mfd, wfd))
        except OSError as e:
            raise RestoreError(f"cannot start the restore helper: {e.strerror}") from None
        os.close(wfd)
        wfd = -1
        try:
            data = os.read(rfd, 8) if _readable(rfd) else b""
        finally:
            status = _reap_stub(stub)
        if len(data) != 8:
            how = "unknown" if status == -1 else str(os.waitstatus_to_exitcode(status))
            raise RestoreError(f"the restore helper did not start (exit status {how})")
        return int(struct.unpack("<q", data)[0])
    finally:
        for fd in (mfd, rfd, wfd):
            if fd >= 0:
                os.close(fd)


def _seize(pid: int) -> None:
    try:
        raw.seize(pid, PTRACE_O_EXITKILL)
        raw.interrupt(pid)
    except OSError as e:
        kill_helper(pid)
        raise RestoreError(f"cannot take the restore helper {pid} under ptrace: {e.strerror}") from None
    w = raw.wait(pid, START_TIMEOUT)
    if w is None or not w.stopped:
        kill_helper(pid)
        raise RestoreError(f"the restore helper {pid} did not stop under ptrace")


def spawn_helper(want_pid: int | None) -> Helper:
    """Start the helper (with `want_pid` when that pid is free) and leave it seized and stopped."""
    note = ""
    pid = -errno.EEXIST
    if want_pid is not None:
        pid = _run_stub(want_pid)
        if pid < 0:
            why = {
                errno.EEXIST: IN_USE,
                errno.EPERM: "not allowed (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)",
                errno.EINVAL: "it is above pid_max",
            }
            note = f"pid {want_pid} could not be kept: {why.get(-pid, os.strerror(-pid))}"
    if pid < 0:
        pid = _run_stub(0)
    if pid <= 0:
        raise RestoreError(f"cannot create the restore helper: clone3 failed: {os.strerror(-pid)}")
    _seize(pid)
    return Helper(pid, want_pid, note)


def kill_helper(pid: int) -> None:
    """SIGKILL and reap a helper that will not become a process (idempotent). Its threads
    (restore/threads.py) are our tracees: each is reaped first, or the leader never would be."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    except OSError:
        tids = []
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for tid in tids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(tid, raw.WALL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, raw.WALL)
