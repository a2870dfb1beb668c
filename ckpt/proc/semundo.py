"""SysV semaphore undo (SEM_UNDO), found at dump and refused: its adjustments cannot be restored.

A `semop(SEM_UNDO)` leaves an adjustment (semadj) in the process's undo list, which the kernel
applies when the process exits. Nothing shows the adjustments (not /proc, not semctl), so a dump
cannot record them: a restored copy would lose them, and the original's exit (`dump --kill`) would
apply them under the copy's feet.

What can be told, cheaply and without touching the process:
- whether its IPC namespace holds a set that a semop ever changed (otime, /proc/sysvipc/sem): an
  adjustment is only made by a successful semop, and the entries of removed sets are dropped;
- whether the process has an undo list at all: `kcmp(KCMP_SYSVSEM)` against a process whose list
  is NULL (a kernel thread, or a zombie child of ours: fork() and exit leave none). A process gets
  a list by a SEM_UNDO semop, but also from its first thread (every pthread_create passes
  CLONE_SYSVSEM, which allocates an empty list), so a multi-threaded process cannot be told apart
  from one holding adjustments: both are refused while such a set exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import struct

from ckpt.cbuf import char_buffer, warm

SYS_KCMP, KCMP_SYSVSEM = 312, 6
PF_KTHREAD = 0x00200000
SYSVIPC_SEM = "/proc/sysvipc/sem"
MAX_SETS = 32000  # the kernel's default SEMMNI: a longer table is not read further

_libc = ctypes.CDLL(None, use_errno=True)
_semctl = _libc.semctl  # (looked up at import, not in a freeze)


def _kcmp(a: int, b: int) -> int:
    """0 when both undo lists are the same (both NULL), >0 when not, <0: -errno."""
    r = _libc.syscall(SYS_KCMP, a, b, KCMP_SYSVSEM, 0, 0)
    return r if r >= 0 else -ctypes.get_errno()


SEM_INFO = 19
SEMINFO = struct.Struct("<10i")  # struct seminfo; SEM_INFO puts the number of sets in semusz (7)
warm(ctypes.c_char, SEMINFO.size)  # (made at import, not in a freeze: ckpt/cbuf.py)


def any_sets() -> bool:
    """Whether ckpt's IPC namespace holds a semaphore set at all: one syscall (a few us), where
    reading /proc/sysvipc/sem costs ~35 us of CPU; True when it cannot tell."""
    buf = char_buffer(SEMINFO.size)
    if _semctl(0, 0, SEM_INFO, buf) < 0:
        return True
    return SEMINFO.unpack(buf.raw)[7] > 0


def used_sets(path: str = SYSVIPC_SEM) -> list[int] | None:
    """The ids of the semaphore sets of ckpt's IPC namespace that a semop has changed (otime set),
    or None when the table cannot be read."""
    if path == SYSVIPC_SEM and not any_sets():
        return []
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1 : MAX_SETS + 1]
    except OSError:
        return None
    out = []
    for ln in lines:
        cols = ln.split()
        try:
            if int(cols[8]) != 0:  # key semid perms nsems uid gid cuid cgid otime ctime
                out.append(int(cols[1]))
        except (IndexError, ValueError):
            return None
    return out


@functools.cache
def _kernel_thread() -> int:
    """A kernel thread's pid (kthreadd: created without CLONE_SYSVSEM, its list is NULL), or 0 when
    none is visible (ckpt in a pid namespace of its own)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/2/stat") as f:
            flags = int(f.read().rsplit(")", 1)[1].split()[6])
        if flags & PF_KTHREAD:
            return 2
    return 0


def _has_list_via_zombie(pid: int) -> int:
    """kcmp against a child of ours that exited at once (its list is NULL), kept a zombie meanwhile."""
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
        return _kcmp(pid, child)
    finally:
        os.waitpid(child, 0)


def has_undo_list(pid: int) -> bool | None:
    """Whether the process has a SysV undo list; None: cannot tell (no kcmp)."""
    ref = _kernel_thread()
    r = _kcmp(pid, ref) if ref else _has_list_via_zombie(pid)
    if r < 0:
        return None
    return r != 0


@functools.cache
def _our_ipc_ns() -> int:
    return os.stat("/proc/self/ns/ipc").st_ino  # (ckpt never changes its namespaces)


def _in_our_ipc_ns(pid: int, ipc_ns: int | None) -> bool:
    if ipc_ns is None:
        try:
            ipc_ns = os.stat(f"/proc/{pid}/ns/ipc").st_ino
        except OSError:
            return False
    return ipc_ns == _our_ipc_ns()


def refusal(pid: int, ipc_ns: int | None = None) -> str | None:
    """The line naming SEM_UNDO when the process may hold undo adjustments, else None. Read while
    the process is frozen: one semctl(SEM_INFO); /proc/sysvipc/sem only when a set exists, and a
    kcmp only when a used one does. ``ipc_ns``: the inode of its IPC namespace, when the caller
    has read it (props.ns_inodes, the same read as own_namespaces')."""
    sets = used_sets() if _in_our_ipc_ns(pid, ipc_ns) else None  # (another namespace's: cannot be read)
    if sets == []:
        return None
    has = has_undo_list(pid)
    if has is False:
        return None
    if sets:
        ids = ", ".join(map(str, sets[:8])) + (" ..." if len(sets) > 8 else "")
        where = f"semaphore set(s) {ids} of its IPC namespace were changed by semop"
    else:
        where = "the semaphore sets of its IPC namespace (not ckpt's) cannot be read"
    why = "it cannot be told whether it has an undo list" if has is None else "it has an undo list"
    return (
        f"SysV semaphore undo (SEM_UNDO): {why} (a SEM_UNDO semop, or any thread made one) while {where}, "
        "and the kernel does not let undo adjustments (semadj) be read"
    )
