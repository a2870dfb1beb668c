"""The restore helper's program (ckpt/restore/stub.S) as bytes, and a run of it: what both a restore
in ckpt's own process (ckpt/restore/helper.py) and the `ckpt` client of a `ckpt service` need.

The client (ckpt/client.py) starts the helper itself when the service restores for it: the helper
must be the child of the `ckpt` process the caller started, in its process group and session, as
in-process. So this module imports only builtin modules (os, _struct): the client's start stays
~nil, and ckpt's package hook (ckpt/__init__.py) lets it be imported without setting anything up.
"""

from __future__ import annotations

import os
from _struct import pack

TYPE_CHECKING = False  # (typing not imported: the client's start)
if TYPE_CHECKING:
    from collections.abc import Callable

# Where the stub is linked. Any address works: it is unmapped before the dumped mappings are
# created, and the restore's own pages are placed in holes of both layouts.
STUB_BASE = 0x10000000
CODE_OFFSET = 0xC0  # after the ELF header (64 bytes) and two program headers (2 x 56)

# stub.S assembled (gcc -c; objcopy -O binary -j .text): the code, then the data it addresses.
CODE = bytes.fromhex(
    "b86e0000000f054989c4488d3d6f000000be50000000b8b30100000f054885c07429488905af0000008b3da5"
    "000000488d35a2000000ba08000000b8010000000f0531ffb83c0000000f05b89d000000bf01000000be0900"
    "00000f05b86e0000000f054939c47509b8220000000f05ebf7bf01000000b8e70000000f050f1f00"
)
ARGS_OFF, TID_OFF, RESFD_OFF, RESULT_OFF, END = 0x80, 0xD0, 0xD4, 0xD8, 0xE0
PAUSE_SYSCALL = 0x6D  # offset of the child's `syscall` (pause) in the code: the first injection site
CLONE_PARENT = 0x8000
MEMFD_NAME = "ckpt-restore-helper"
EXE_LINK = f"/memfd:{MEMFD_NAME} (deleted)"  # /proc/PID/exe of a helper still running the stub
_SIGPIPE, _SIGXFSZ = 13, 25


def stub_code(set_tid: int, resfd: int) -> bytes:
    """The stub's code and data with clone3's arguments filled in."""
    tid_addr = STUB_BASE + CODE_OFFSET + TID_OFF
    # clone3 refuses a set_tid pointer with set_tid_size 0 (and the reverse): both or neither.
    want = (tid_addr, 1) if set_tid else (0, 0)
    # exit_signal must be 0 with CLONE_PARENT: the child takes the stub's own (SIGCHLD, from posix_spawn).
    args = pack("<10Q", CLONE_PARENT, 0, 0, 0, 0, 0, 0, 0, *want)
    return CODE + args + pack("<iiq", set_tid, resfd, 0)


def stub_elf(set_tid: int, resfd: int) -> bytes:
    """A static ELF64 executable of one RWX segment holding stub_code()."""
    body = stub_code(set_tid, resfd)
    assert len(body) == END
    size = CODE_OFFSET + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + pack("<HHIQQQIHHHHHH", 2, 62, 1, STUB_BASE + CODE_OFFSET, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    load = pack("<IIQQQQQQ", 1, 7, 0, STUB_BASE, STUB_BASE, size, size, 0x1000)
    # PT_GNU_STACK without PF_X: a non-executable stack, which the restored process inherits nothing of.
    gnu_stack = pack("<IIQQQQQQ", 0x6474E551, 6, 0, 0, 0, 0, 0, 16)
    head = ehdr + load + gnu_stack
    return head + bytes(CODE_OFFSET - len(head)) + body


def spawn_stub(mfd: int, wfd: int) -> int:
    """The stub started from the memfd `mfd` (posix_spawn: subprocess and its imports are not worth
    it for one program with no arguments); its pid. The memfd has no O_CLOEXEC; the pipe's end is
    kept across the exec by a dup2 onto itself. The stub's other inherited fds are the helper's to
    close (restore/memory.py clear_helper closes all above 2). SIGPIPE and SIGXFSZ back to SIG_DFL,
    which Python ignores (as Popen's restore_signals does)."""
    return os.posix_spawn(
        f"/proc/self/fd/{mfd}",
        [f"/proc/self/fd/{mfd}"],
        {},
        file_actions=[(os.POSIX_SPAWN_DUP2, wfd, wfd)],
        setsigdef=(_SIGPIPE, _SIGXFSZ),
    )


def _reap(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return -1


def run_stub(
    set_tid: int,
    spawn: Callable[[Callable[[], int]], int] = lambda start: start(),
    ready: Callable[[int], bool] = lambda fd: True,
    reap: Callable[[int], int] = _reap,
) -> tuple[int, str]:
    """Run the stub once: (clone3's result: the helper's pid, a child of the spawning thread's, or
    -errno; "" or why the stub did not start). The client's way by default, from its one thread,
    waiting as long as the stub takes; a restore in ckpt's own process passes its own (restore/
    helper.py): `spawn` runs the start in the thread that outlives the restore, `ready` bounds the
    wait for the stub's answer, `reap` its wait status (-1: unknown), killing one past its time."""
    mfd = os.memfd_create(MEMFD_NAME, 0)
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(mfd, stub_elf(set_tid, wfd))
        try:
            stub = spawn(lambda: spawn_stub(mfd, wfd))
        except OSError as e:
            return 0, f"cannot start the restore helper: {e.strerror}"
        os.close(wfd)
        wfd = -1
        try:
            # (the stub writes 8 bytes and exits: EOF if it died first)
            data = os.read(rfd, 8) if ready(rfd) else b""
        finally:
            status = reap(stub)
        if len(data) != 8:
            how = "unknown" if status == -1 else str(os.waitstatus_to_exitcode(status))
            return 0, f"the restore helper did not start (exit status {how})"
        return int.from_bytes(data, "little", signed=True), ""
    finally:
        for fd in (mfd, rfd, wfd):
            if fd >= 0:
                os.close(fd)
