"""Whether a process's VmFlags can have changed since they were last read, without reading them.

smaps is the only place the kernel shows a mapping's VmFlags (lo, dc, wf, hg, nh, dd, sl, uw, ...),
and reading it walks every page-table entry: ~20 ms of CPU per GiB present, inside the freeze (a
madvise() over a whole mapping shows nowhere else). The guard regions a dump records are another
walk (PAGEMAP_SCAN). Both change only through a short list of system calls of the process itself,
so a dump counts those calls instead: one perf counter per thread on the syscall tracepoints,
filtered in the kernel to the calls (and the arguments) that can change a flag, opened while the
process is frozen. At the next freeze, all of them at zero (and the same threads, and no io_uring,
and no other userfaultfd) means the last reading still holds; anything else, or any doubt, means
read smaps again. See docs/internals.md, "VmFlags without the smaps walk".

Why each call is counted (x86_64 numbers):
- mmap, munmap, mremap, brk, shmat, shmdt, remap_file_pages, uselib, map_shadow_stack: create,
  remove, move or resize mappings (a new mapping carries flags nobody read; MAP_FIXED replaces).
- mprotect, pkey_mprotect: rd/wr/ex and the may-flags (mr mw me), and they split mappings.
- mlock, mlock2, munlock, mlockall, munlockall: lo and lf (VM_LOCKED, VM_LOCKONFAULT);
  mlockall(MCL_FUTURE) also makes later mappings locked, but those come by mmap (counted).
- mseal: sl. madvise and process_madvise (a process may advise itself through a pidfd), unless the
  advice is one that touches only pages (WILLNEED, DONTNEED, FREE, COLD, PAGEOUT, POPULATE_READ,
  POPULATE_WRITE, DONTNEED_LOCKED, COLLAPSE): NORMAL/RANDOM/SEQUENTIAL (sr rr), DONTFORK/DOFORK
  (dc), WIPEONFORK/KEEPONFORK (wf), HUGEPAGE/NOHUGEPAGE (hg nh), DONTDUMP/DODUMP (dd),
  MERGEABLE/UNMERGEABLE (mg), GUARD_INSTALL/GUARD_REMOVE (the guard regions), REMOVE and the
  poison ones (rare; counted rather than reasoned about), and any advice a newer kernel adds.
- prctl PR_SET_MM (the mm's fields), PR_SET_VMA (anon names: in maps too), PR_SET_MEMORY_MERGE
  (mg on every mapping), PR_SET_THP_DISABLE, PR_SET_SHADOW_STACK_STATUS; arch_prctl (x86's
  ARCH_SHSTK_ENABLE maps a shadow stack).
- ioctl UFFDIO_REGISTER / UFFDIO_UNREGISTER: um uw ui (and they split mappings).
- clone, clone3, fork, vfork: a new thread has no counter of its own, and CLONE_VM without
  CLONE_THREAD makes a process that shares the mm; execve, execveat: a new mm altogether.
- io_uring_setup: IORING_OP_MADVISE changes flags from a ring, with no madvise() of a thread.
- The same calls through the 32-bit entry (int 0x80), by their i386 numbers where those are rare as
  native calls (COMPAT_COUNTED); the i386 madvise (219) is restart_syscall's number natively: counted
  apart, beyond the one restart a thread stopped in a restartable sleep makes after the thaw.

What changes a mapping without a counted call of the process, and how each is handled:
- Stack growth (the [stack] mapping's start moves): the maps lines are compared too.
- A page fault, khugepaged, KSM's scanner, reclaim, MADV_COLLAPSE: pages only, no vm_flags.
- Another process: process_madvise() on another process accepts only COLD, PAGEOUT, WILLNEED and
  COLLAPSE (no flags); ptrace POKE and /proc/PID/mem writes break COW, no flags; clear_refs 4 clears
  sd (soft-dirty: the soft-dirty tracker's own write; the skip is not used with it).
- A userfaultfd of this mm held elsewhere can register or unregister ranges from another process:
  refused when the process holds any userfaultfd but the tracker's, or when the last reading shows
  a mapping registered in missing or minor mode (um, ui: not the tracker's). A userfaultfd that was
  made, handed to another process and closed here before the counters began is the one case left
  that nothing here sees; see the docs.
- io_uring: a ring's SQPOLL thread or workers run madvise for the process without a syscall of a
  counted thread: refused while the process holds a ring or has an io thread ("iou-..."). A
  process that shares the mm without being a thread (a child made with CLONE_VM before the
  counters began) is looked for among the children (kcmp KCMP_VM) and refuses the skip.
- ckpt's own calls inside a freeze (the batch's mmap/munmap, UFFDIO_REGISTER of new mappings) are
  counted like any other: the counters are read before them and reset after them, and a freeze
  that registers a mapping does not use the last reading.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import struct
import sys
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from ckpt import sysno as nr
from ckpt.cbuf import char_buffer, warm
from ckpt.errors import CkptError
from ckpt.proc.stat import read_stat

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
PERF_EVENT_OPEN = 298
PERF_TYPE_TRACEPOINT = 2
PERF_ATTR_SIZE = 136  # PERF_ATTR_SIZE_VER8
warm(ctypes.c_char, PERF_ATTR_SIZE)  # (made at import, not in a freeze: ckpt/cbuf.py)
PERF_FLAG_FD_CLOEXEC = 8
PERF_EVENT_IOC_RESET = 0x2403
PERF_EVENT_IOC_SET_FILTER = 0x40082406
KCMP, KCMP_VM = 312, 1
MAX_COUNTERS = 6 * 512  # fds: beyond 512 threads a dump reads smaps

# Counted whatever their arguments (x86_64 numbers; the reason for each is in the docstring).
COUNTED = {
    nr.MMAP: "mmap",
    nr.MPROTECT: "mprotect",
    nr.MUNMAP: "munmap",
    nr.BRK: "brk",
    nr.MREMAP: "mremap",
    30: "shmat",
    56: "clone",
    57: "fork",
    58: "vfork",
    59: "execve",
    67: "shmdt",
    134: "uselib",
    149: "mlock",
    150: "munlock",
    151: "mlockall",
    152: "munlockall",
    158: "arch_prctl",
    216: "remap_file_pages",
    322: "execveat",
    325: "mlock2",
    329: "pkey_mprotect",
    425: "io_uring_setup",
    435: "clone3",
    440: "process_madvise",  # (by number too: the per-syscall tracepoints skip 32-bit calls)
    453: "map_shadow_stack",
    462: "mseal",
}
# The same calls made through the 32-bit entry (int 0x80, which any x86_64 process may use with
# ia32 emulation on): raw_syscalls:sys_enter reports them by their i386 numbers and the per-syscall
# tracepoints not at all. Counted where the number is rare as a native call (chmod, lgetxattr,
# fchmod, capget, vhangup, acct, setresuid, getpgid, fsetxattr, iopl; 358 and up are unused natively).
# Left out, as they collide with common native calls: brk (45, recvfrom: it moves the heap's end,
# which the maps lines show), remap_file_pages (257, openat: it remaps, the maps lines show it),
# fork (2, open: a child of its own mm changes nothing here), ioctl (54, setsockopt: a userfaultfd
# must exist, and one in the process refuses the skip); madvise (219, restart_syscall, which a
# thread makes after every freeze that interrupted a sleep) is counted apart (RESTART_FILTER).
COMPAT_COUNTED = {
    90: "mmap (i386)",
    91: "munmap (i386)",
    117: "ipc: shmat, shmdt (i386)",
    120: "clone (i386)",
    125: "mprotect (i386)",
    150: "mlock (i386)",
    151: "munlock (i386)",
    152: "mlockall (i386)",
    153: "munlockall (i386)",
    163: "mremap (i386)",
    172: "prctl (i386)",
    190: "vfork (i386)",
    192: "mmap2 (i386)",
    358: "execveat (i386)",
    374: "userfaultfd (i386)",
    376: "mlock2 (i386)",
    380: "pkey_mprotect (i386)",
    384: "arch_prctl (i386)",
    397: "shmat (i386)",
    398: "shmdt (i386)",
}
# madvise advice that touches pages only, never a mapping's flags or its guard regions.
MADV_PAGES_ONLY = (3, 4, 8, 20, 21, 22, 23, 24, 25)
PRCTL_COUNTED = (nr.PR_SET_MM, 41, 67, 75, nr.PR_SET_VMA)  # SET_MM, THP_DISABLE, MEMORY_MERGE, SHSTK
UFFD_IOCTLS = (nr.UFFDIO_REGISTER, 0x8010AA01)  # REGISTER, UNREGISTER
UFFD_LINK, IO_URING_LINK = "anon_inode:[userfaultfd]", "anon_inode:[io_uring]"
FOREIGN_UFFD_FLAGS = ("um", "ui")  # registered in missing or minor mode: not the uffd-wp tracker's


def _advice_filter(field: str) -> str:
    return " && ".join(f"{field} != {a}" for a in MADV_PAGES_ONLY)


# (tracepoint, filter): each thread gets one counter per line.
EVENTS = (
    (
        "raw_syscalls/sys_enter",
        " || ".join(f"id == {n}" for n in sorted(COUNTED.keys() | COMPAT_COUNTED.keys())),
    ),
    ("syscalls/sys_enter_madvise", _advice_filter("behavior")),
    ("syscalls/sys_enter_process_madvise", _advice_filter("behavior")),
    ("syscalls/sys_enter_prctl", " || ".join(f"option == {o:#x}" for o in PRCTL_COUNTED)),
    ("syscalls/sys_enter_ioctl", " || ".join(f"cmd == {c:#x}" for c in UFFD_IOCTLS)),
)

# restart_syscall (219) shares its number with the i386 madvise: counted apart, per thread, against the
# one restart each thread stopped in a restartable sleep (-ERESTART_RESTARTBLOCK) makes after the thaw.
RESTART_FILTER = f"id == {nr.RESTART_SYSCALL}"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p)


class Unavailable(Exception):
    """No counters here (no tracefs, no permission, a kernel without the tracepoints): always read."""


# Read in a child of its own private mount namespace when no tracefs is mounted here: the child
# unshares CLONE_NEWNS, makes every mount private (a shared "/" would carry a new mount back to the
# host's namespace), mounts tracefs on a directory the caller made, prints one id per line (or
# "!reason"), and exits: its namespace, and the mount, end with it. A script run by a fresh
# interpreter (fork+exec), not a fork of this process: ckpt has threads, and a fork of a threaded
# Python may inherit a lock held by another thread. PR_SET_PDEATHSIG: it dies with its parent.
_NS_CHILD = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_void_p)
def fail(what):
    sys.stdout.write(f"!{what}: {os.strerror(ctypes.get_errno())}\n")
    sys.exit(0)
libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
if libc.unshare(0x20000) != 0:  # CLONE_NEWNS
    fail("unshare(CLONE_NEWNS)")
if libc.mount(None, b"/", None, 0x4000 | 0x40000, None) != 0:  # MS_REC | MS_PRIVATE
    fail("making the mounts private")
if libc.mount(b"tracefs", sys.argv[2].encode(), b"tracefs", 2 | 4 | 8, None) != 0:  # nosuid nodev noexec
    fail("mount tracefs")
out = []
for tp in sys.argv[3:]:
    try:
        with open(f"{sys.argv[2]}/events/{tp}/id") as f:
            out.append(str(int(f.read())))
    except (OSError, ValueError) as e:
        out.append(f"!{tp}: {e.strerror if isinstance(e, OSError) else e}")
        break
sys.stdout.write("\n".join(out) + "\n")
"""
NS_TIMEOUT = 10.0  # s: an interpreter's start and one mount; beyond it something is wrong


def _mounted_tracefs() -> list[str]:
    """Where tracefs is mounted in this namespace (/proc/self/mounts), besides the usual places."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for ln in f:
            parts = ln.split()
            if len(parts) > 2 and parts[2] == "tracefs":
                found.append(parts[1].replace("\\040", " "))
    return found


def _ids_from(root: str) -> tuple[int, ...]:
    return tuple(int(open(f"{root}/events/{tp}/id").read()) for tp, _ in EVENTS)


def ids_in_private_namespace(timeout: float = NS_TIMEOUT) -> tuple[int, ...]:
    """The EVENTS' tracepoint ids read from a tracefs mounted in a child's private mount namespace
    (nothing is mounted in this one). Raises Unavailable with the reason: no CAP_SYS_ADMIN, no
    tracefs in the kernel, a tracepoint missing, or the child not done within ``timeout``. The
    child is always reaped before this returns; its end is seen through its pidfd, its output
    through its pipe's EOF."""
    # Imported here: only a machine without tracefs needs them, and a dump's start avoids them
    # (tests/test_startup.py: subprocess and tempfile bring shutil, bz2, lzma).
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ckpt-tracefs-") as mnt:
        argv = [sys.executable, "-I", "-S", "-c", _NS_CHILD, str(os.getpid()), mnt]
        argv += [tp for tp, _ in EVENTS]
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        except OSError as e:
            raise Unavailable(f"no tracefs mounted, and no child to mount one: {e}") from e
        try:
            assert child.stdout is not None
            out, exited = _collect(child.pid, child.stdout.fileno(), time.monotonic() + timeout)
        finally:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
            child.wait()  # (the pidfd said it exited, or SIGKILL was sent: no wait without end)
            assert child.stdout is not None
            child.stdout.close()
    if not exited:
        raise Unavailable(f"no tracefs mounted, and the child mounting one took over {timeout:g} s")
    lines = out.decode(errors="replace").splitlines()
    bad = [ln[1:] for ln in lines if ln.startswith("!")]
    if bad:
        raise Unavailable(f"no tracefs mounted, and none in a private namespace: {bad[0]}")
    if child.returncode != 0 or len(lines) != len(EVENTS):
        raise Unavailable(f"no tracefs mounted, and the child reading one exited {child.returncode}")
    return tuple(int(ln) for ln in lines)


# The new mount API (Linux 5.2): a tracefs mount that is attached nowhere, read through its fd.
FSOPEN, FSCONFIG, FSMOUNT = 430, 431, 432
FSOPEN_CLOEXEC = FSMOUNT_CLOEXEC = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RO_NOSUID_NODEV_NOEXEC = 0x1 | 0x2 | 0x4 | 0x8


def ids_from_detached_mount() -> tuple[int, ...]:
    """The EVENTS' tracepoint ids read through a tracefs mount attached to no directory of any
    namespace (fsopen, fsconfig CREATE, fsmount; no move_mount): the files are opened relative to
    the mount's fd, and the mount ends when that fd is closed. Nothing is mounted anywhere, no child
    runs: ~0.1 ms where the private namespace's child took ~40-60 ms of wall time. Raises
    Unavailable (no CAP_SYS_ADMIN, a kernel or a seccomp filter without these calls, a tracepoint
    missing)."""
    fs = _libc.syscall(FSOPEN, b"tracefs", FSOPEN_CLOEXEC)
    if fs < 0:
        raise Unavailable(f"fsopen(tracefs): {os.strerror(ctypes.get_errno())}")
    try:
        if _libc.syscall(FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0) < 0:
            raise Unavailable(f"fsconfig(tracefs): {os.strerror(ctypes.get_errno())}")
        mnt = _libc.syscall(FSMOUNT, fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_RO_NOSUID_NODEV_NOEXEC)
        if mnt < 0:
            raise Unavailable(f"fsmount(tracefs): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fs)
    try:
        ids = []
        for tp, _ in EVENTS:
            fd = os.open(f"events/{tp}/id", os.O_RDONLY | os.O_CLOEXEC, dir_fd=mnt)
            try:
                ids.append(int(os.read(fd, 64)))
            finally:
                os.close(fd)
        return tuple(ids)
    except (OSError, ValueError) as e:
        raise Unavailable(f"tracefs without the tracepoint ids: {e}") from e
    finally:
        os.close(mnt)


def _collect(pid: int, fd: int, deadline: float) -> tuple[bytes, bool]:
    """The child's output up to its pipe's EOF, then its exit through its pidfd, by ``deadline``:
    (the output, whether it exited in time)."""
    import selectors

    chunks: list[bytes] = []
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # reaped already (a host program that reaps with waitpid(-1))
        pidfd = -1
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ, "out")
            if pidfd >= 0:
                sel.register(pidfd, selectors.EVENT_READ, "exit")
            eof, done = False, pidfd < 0
            while not (eof and done):
                left = deadline - time.monotonic()
                if left <= 0:
                    return b"".join(chunks), False
                for key, _ in sel.select(left):
                    if key.data == "out":
                        data = os.read(fd, 4096)
                        if data:
                            chunks.append(data)
                        else:
                            eof = True
                            sel.unregister(fd)
                    else:
                        done = True
                        sel.unregister(pidfd)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return b"".join(chunks), True


# The ids are fixed for a boot (a ckpt process lives within one): read once per process, and so is
# the reason there are none (a dump that failed to get them before a freeze must not try again
# inside it, rearm()).
_ids_cache: list[tuple[int, ...] | str] = []


def _tracepoint_ids() -> tuple[int, ...]:
    """The EVENTS' tracepoint ids (perf_event_open's config): from a mounted tracefs, else from a
    detached one (ids_from_detached_mount), else from one mounted in a short-lived private mount
    namespace (ids_in_private_namespace). Cached."""
    if not _ids_cache:
        _ids_cache.append(_find_ids())
    got = _ids_cache[0]
    if isinstance(got, str):
        raise Unavailable(got)
    return got


def prefetch_ids() -> str | None:
    """Get the ids now (out of any freeze): None, or why there are none."""
    try:
        _tracepoint_ids()
    except Unavailable as e:
        return str(e)
    return None


def _find_ids() -> tuple[int, ...] | str:
    for root in (*TRACEFS, *_mounted_tracefs()):
        try:
            return _ids_from(root)
        except (OSError, ValueError):
            continue
    with contextlib.suppress(Unavailable):
        return ids_from_detached_mount()
    try:  # (a kernel or a filter without the new mount API)
        return ids_in_private_namespace()
    except Unavailable as e:
        return str(e)


def _open(tid: int, config: int, flt: str) -> int:
    attr = bytearray(PERF_ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, PERF_TYPE_TRACEPOINT, PERF_ATTR_SIZE, config)  # counting, enabled
    buf = char_buffer(PERF_ATTR_SIZE, bytes(attr))
    fd = int(_libc.syscall(PERF_EVENT_OPEN, buf, tid, -1, -1, PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        e = ctypes.get_errno()
        raise (
            ProcessLookupError(e, os.strerror(e))
            if e == errno.ESRCH
            else Unavailable(f"perf_event_open: {os.strerror(e)}")
        )
    if _libc.ioctl(fd, PERF_EVENT_IOC_SET_FILTER, flt.encode()) < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise Unavailable(f"tracepoint filter refused: {os.strerror(e)}")
    return fd


def _close_here(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# The closer's shell line: a background `read` on a pipe of ckpt's holds copies of the counters
# until ckpt closes the pipe's write end, or dies; then it exits, and its exit closes them. (A
# background job's stdin is /dev/null in a shell without job control: the pipe comes as fd {fd},
# one digit, all that dash's redirections take.)
CLOSER = "read -r x <&{fd} &"
SH = "/bin/sh"


class Closer:
    """Where the kernel's work of closing the counters goes, so that nobody waits for it.

    Closing the last counter of a tracepoint unregisters the kernel's probe, which then waits until
    no CPU can be inside it (perf_trace_destroy -> tracepoint_synchronize_unregister: an RCU-tasks-
    trace grace period and an RCU one, ~36 ms here) under the tracing's event_mutex: one tracepoint
    after another, from whatever threads: ~180 ms for EVENTS' five, asleep in close(), no CPU. A
    command doing that (or its exit doing it) held its caller that long (a migration's exit, after
    the copy ran).

    So a closer holds copies of one thread's counters (one of each tracepoint) from when they are
    opened: `sh -c CLOSER`, spawned with them (posix_spawn: no import of subprocess, fds 0-2 on
    /dev/null, a session of its own), forks a background `read` on a pipe of ours and exits. ckpt's
    own closes then never drop a tracepoint's last counter, so they cost what a close costs;
    `release()` reaps the shell (exited long before) and closes the pipe's write end: the `read`
    sees EOF and exits, its exit unregisters the tracepoints, and init (or the nearest subreaper)
    reaps it ~0.2 s later. A SIGKILL of ckpt closes the write end too: the counters never outlive
    ckpt by more than the kernel's unregister. Where the closer cannot start, nothing else changes
    (ckpt's last close waits, as it would have)."""

    def __init__(self, fds: Sequence[int]) -> None:
        self.pid = -1  # the shell, until reaped
        self._w = -1
        try:
            r, w = os.pipe()  # (both close-on-exec: only the dup2 below reaches the closer)
        except OSError:
            return
        try:
            # The pipe's number in the closer: one digit, none of the counters' (6 of 3-9 at most).
            pfd = next((n for n in range(3, 10) if n not in fds), None)
            if min(r, *fds) > 2 and pfd is not None:  # (0-2 are the closer's /dev/null)
                null = os.devnull
                actions: list[tuple[Any, ...]] = [
                    (os.POSIX_SPAWN_OPEN, 0, null, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, null, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, r, pfd),  # (in the closer only, over whatever is there)
                ]
                # dup2 of a fd onto itself clears its close-on-exec flag (POSIX, glibc >= 2.29).
                actions += [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in fds]
                # Not one of the caller's inheritable fds (a pipe its caller reads to its end).
                keep = {pfd, *fds}
                actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable(3) if fd not in keep]
                argv = [SH, "-c", CLOSER.format(fd=pfd)]
                self.pid = os.posix_spawn(SH, argv, os.environ, file_actions=actions, setsid=True)
                self._w, w = w, -1
        except OSError:
            pass
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def release(self) -> None:
        """After ckpt's own copies are closed: the closer closes its copies, which nobody waits for."""
        if self.pid > 0:
            # Reaped before the write end goes: a shell that outlived its `read` would be the last
            # to hold them, and waiting for it, the one to wait for their unregister.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = -1
        if self._w >= 0:
            os.close(self._w)
            self._w = -1


def _inheritable(low: int) -> list[int]:
    """This process's fds from `low` up without close-on-exec."""
    out = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            with contextlib.suppress(OSError):  # (the listing's own fd, closed by now)
                if fd >= low and os.get_inheritable(fd):
                    out.append(fd)
    return out


def _close_all(fds: dict[int, list[int]], closers: list[Closer]) -> None:
    for each in fds.values():
        _close_here(each)
    fds.clear()
    for c in closers:
        c.release()
    closers.clear()


def _read_count(fd: int) -> int:
    return int(struct.unpack("<Q", os.read(fd, 8))[0])


def restarting_threads(threads: Iterable[dict[str, Any]]) -> set[int]:
    """Of a dump's thread records (tid, regs), those stopped in a sleep that the kernel restarts
    through restart_syscall after the thaw (rax -ERESTART_RESTARTBLOCK)."""
    out = set()
    for th in threads:
        rax = th["regs"]["rax"] & (1 << 64) - 1
        if rax == (1 << 64) - nr.ERESTART_RESTARTBLOCK:
            out.add(th["tid"])
    return out


def _threads_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("Threads:"):
                return int(ln.split()[1])
    return -1


def _list_threads(pid: int) -> tuple[int, set[int], int]:
    """(Threads: before, the tids listed, Threads: after)."""
    before = _threads_count(pid)
    tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    return before, tids, _threads_count(pid)


def _start_time(pid: int) -> int | None:
    try:
        return read_stat(pid).start_time
    except (OSError, CkptError):
        return None


def _fd_links(pid: int) -> Iterable[tuple[int, str]]:
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            yield int(name), os.readlink(f"/proc/{pid}/fd/{name}")


def foreign_fds(pid: int, ours: Iterable[int], links: Iterable[tuple[int, str]] | None = None) -> str | None:
    """Why the process's fds make the counters blind, or None: a userfaultfd that is not the
    tracker's, or an io_uring. ``links``: (fd, link) of every fd as read in this freeze (the grab's
    table, ckpt/proc/grab.py); else read now."""
    mine = set(ours)
    for fd, link in _fd_links(pid) if links is None else links:
        if link == IO_URING_LINK:
            return f"fd {fd} is an io_uring"
        if link == UFFD_LINK and fd not in mine:
            return f"fd {fd} is a userfaultfd of its own"
    return None


def _io_threads(pid: int, tids: Iterable[int]) -> str | None:
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().startswith("iou-"):
                return f"thread {tid} is an io_uring thread"
    return None


def _mm_sharers(pid: int, tids: Iterable[int]) -> str | None:
    """A child that shares the mm (clone with CLONE_VM, not a thread) changes it uncounted."""
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for k in kids:
            if _libc.syscall(KCMP, pid, k, KCMP_VM, 0, 0) == 0:
                return f"process {k} shares its memory"
    return None


def foreign_flags(vmflags: dict[int, str]) -> str | None:
    """A mapping that a userfaultfd other than the tracker's registered (missing or minor mode)."""
    for start, flags in vmflags.items():
        if any(f in FOREIGN_UFFD_FLAGS for f in flags.split()):
            return f"the mapping at {start:#x} is registered with another userfaultfd"
    return None


class FlagWatch:
    """Counters of every flag-changing call of each thread of a process. They may be opened while it
    runs (their cost then stays out of the freeze), but they vouch for nothing until cover() and
    reset() at the end of a freeze, after the last injected call: then the thread set is exact and
    the count starts from the state a reading at that moment sees."""

    def __init__(self, pid: int, tids: Iterable[int] = ()) -> None:
        self._ids = _tracepoint_ids()
        self.pid = pid
        self._start = _start_time(pid)  # the pid could name another process at the next dump
        self._fds: dict[int, list[int]] = {}  # tid -> [the EVENTS' counters..., restart_syscall's]
        self._restarts: frozenset[int] = frozenset()  # threads that make one restart_syscall after the thaw
        self._closers: list[Closer] = []  # (one, once a thread has counters)
        self._finalizer = weakref.finalize(self, _close_all, self._fds, self._closers)
        try:
            self._add(tids)
        except BaseException:
            self.close()
            raise

    def _add(self, tids: Iterable[int]) -> None:
        budget = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4  # the dump's own files come first
        for tid in tids:
            if tid in self._fds:
                continue
            if (len(self._fds) + 1) * (len(EVENTS) + 1) > min(budget, MAX_COUNTERS):
                raise Unavailable(f"too many threads to count ({len(self._fds) + 1} or more)")
            fds = self._fds[tid] = []
            for config, (_, flt) in zip(self._ids, EVENTS, strict=True):
                fds.append(_open(tid, config, flt))
            fds.append(_open(tid, self._ids[0], RESTART_FILTER))
            if not self._closers:
                self._closers.append(Closer(fds))  # (one counter of each tracepoint: enough)

    def cover(self, tids: Sequence[int], check: bool = True, restarts: Iterable[int] = ()) -> None:
        """Counters on exactly ``tids`` (the frozen threads), then all at zero. ``check``: look again
        for what no counter sees (io_uring threads, processes sharing the mm); raises Unavailable.
        ``restarts``: the threads stopped in a restartable sleep (restarting_threads())."""
        self._restarts = frozenset(restarts)
        if check:
            why = _io_threads(self.pid, tids) or _mm_sharers(self.pid, tids)
            if why is not None:
                raise Unavailable(why)
        for tid in set(self._fds) - set(tids):
            for fd in self._fds.pop(tid):
                os.close(fd)
        self._add(tids)
        self.reset()

    def cover_running(self, tries: int = 8) -> None:
        """cover() for a process that runs (a dump with no earlier reading of its own takes one
        before its freeze): counters on every thread, all at zero, then a listing of
        /proc/PID/task taken after the reset that shows no thread without one, with the `Threads:`
        count of /proc/PID/status the same before and after it and equal to it. A thread exiting
        during a listing can end it early; the count shows that, and one made meanwhile by a
        counted thread counts as a clone. So every thread that runs after the reset is counted,
        or was made by a counted clone. Raises Unavailable when the threads do not hold still."""
        self._restarts = frozenset()
        for _ in range(tries):
            with contextlib.suppress(ProcessLookupError):  # a thread gone: list again
                self._add(_list_threads(self.pid)[1])
                self.reset()
                before, tids, after = _list_threads(self.pid)
                why = _io_threads(self.pid, tids) or _mm_sharers(self.pid, tids)
                if why is not None:
                    raise Unavailable(why)
                if before == after == len(tids) and tids <= self._fds.keys():
                    return
        raise Unavailable("its threads did not hold still while the counters were opened")

    def count(self) -> int:
        """Flag-changing calls since the last reset (a restart_syscall beyond the one each thread
        stopped in a restartable sleep makes counts as an i386 madvise)."""
        n = 0
        for tid, fds in self._fds.items():
            n += sum(_read_count(fd) for fd in fds[:-1])
            n += max(0, _read_count(fds[-1]) - (tid in self._restarts))
        return n

    def changed(
        self, tids: Iterable[int], ours: Iterable[int] = (), start_time: int | None = None, fds: bool = True
    ) -> str | None:
        """Why the last reading may be stale, or None when it cannot be: every thread now frozen
        was counted (a thread made since would have counted a clone), no counted call happened,
        and nothing uncounted can change the mm (another userfaultfd, io_uring). ``ours``: the
        tracker's userfaultfd. ``start_time``: the process's, as the freeze read it (Frozen's).
        ``fds`` False: the fds are left to the caller (foreign_fds, later in the same freeze)."""
        if (_start_time(self.pid) if start_time is None else start_time) != self._start:
            return f"process {self.pid} is not the one counted"
        extra = set(tids) - set(self._fds)
        if extra:
            return f"thread {min(extra)} is not counted"
        n = self.count()
        if n:
            return f"{n} call(s) that may change a mapping's flags"
        return foreign_fds(self.pid, ours) if fds else None

    def reset(self) -> None:
        for fds in self._fds.values():
            for fd in fds:
                if _libc.ioctl(fd, PERF_EVENT_IOC_RESET, None) < 0:
                    raise OSError(ctypes.get_errno(), "PERF_EVENT_IOC_RESET")

    def close(self) -> None:
        self._finalizer()


def open_watch(pid: int, tids: Iterable[int]) -> FlagWatch | str:
    """A FlagWatch, or why there is none (then every dump reads smaps)."""
    try:
        return FlagWatch(pid, tids)
    except Unavailable as e:
        return str(e)
    except ProcessLookupError:
        return "a thread exited"
