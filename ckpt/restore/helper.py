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
from dataclasses import dataclass

from ckpt.errors import RestoreError
from ckpt.ptrace import raw
from ckpt.restore import caller, cancel
from ckpt.restore.parent import as_parent
from ckpt.stubelf import CLONE_PARENT, CODE_OFFSET, PAUSE_SYSCALL, STUB_BASE, run_stub, stub_elf

# (the stub's bytes live in ckpt/stubelf.py, which the `ckpt` client imports without the rest of
# ckpt: a served restore's helper is started by the client, restore/caller.py)
_REEXPORTED = (CLONE_PARENT, CODE_OFFSET, stub_elf)  # (pidns.py, restorer.py and tests take them here)

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

PTRACE_O_EXITKILL = 0x100000  # the helper dies with us if ckpt is killed: never a stray half-built process
START_TIMEOUT = 10.0
# Why a dumped pid was not kept, when another process has it: say what would keep it.
IN_USE = "it is in use; --pidns keeps it (ckpt restore --pidns, ckpt serve --pidns)"


@dataclass
class Helper:
    pid: int
    wanted_pid: int | None  # the pid asked for, if any
    pid_note: str  # why the wanted pid was not given, or ""


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
    """Run the stub once; clone3's result: the child's pid, or -errno. A restore served by a `ckpt
    service` has its client run it (the helper is the client's child: restore/caller.py)."""
    if caller.served():
        return caller.start_stub(set_tid)
    # From ckpt's long-lived thread: the helper is its child (parent.py).
    pid, why = run_stub(set_tid, as_parent, _readable, _reap_stub)
    if why:
        raise RestoreError(why)
    return pid


PTRACE_SETOPTIONS = 0x4200


def _seize(pid: int) -> None:
    if caller.served():
        _seize_given(pid)
        return
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


def _seize_given(pid: int) -> None:
    """The seize of the helper a client gave (restore/caller.py). Its pidfd was checked, but the
    seize can only name a pid: until check_seized() has found the pidfd's process still there, the
    pid seized may be another's (the helper died and its pid was given again). So nothing here kills
    by pid (the helper is the client's to kill: client.py kills the ones not yet the process, by
    their pidfds), and PTRACE_O_EXITKILL, which would kill the seized process at our death, is set
    only once it is known to be the helper."""
    try:
        raw.seize(pid, 0)
        raw.interrupt(pid)
    except OSError as e:
        raise RestoreError(f"cannot take the restore helper {pid} under ptrace: {e.strerror}") from None
    w = raw.wait(pid, START_TIMEOUT)
    if w is None or not w.stopped:
        # (still running: let go at our exit, without EXITKILL)
        raise RestoreError(f"the restore helper {pid} did not stop under ptrace")
    try:
        caller.check_seized(pid)  # the same process as checked before, running the stub
        raw.call(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL)
    except (RestoreError, OSError) as e:
        with contextlib.suppress(OSError):
            raw.detach(pid)  # (not ours to kill: it may not be a helper at all)
        if isinstance(e, RestoreError):
            raise
        raise RestoreError(f"cannot take the restore helper {pid} under ptrace: {e.strerror}") from None


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
    if caller.served():
        _test_hold(pid, "checked")
    _seize(pid)
    _test_hold(pid, "seized")
    return Helper(pid, want_pid, note)


def _test_hold(pid: int, at: str) -> None:
    """Tests hold a restore with its helper seized (to kill a `ckpt service` or Ctrl-C `ckpt
    restore` exactly then): CKPT_RESTORE_TEST_HOLD_FD=FD, a socket the test passed down: "seized
    PID\n" goes to it, and the restore goes on once the test writes a byte or closes its end, or
    the restore is cancelled (a Ctrl-C: restore/cancel.py). Off (one lookup) otherwise.
    CKPT_RESTORE_TEST_HOLD_AT=checked holds a served restore instead where its client's helper has
    been checked and not yet seized ("checked PID\n"): to have its pid given again meanwhile."""
    fd = os.environ.get("CKPT_RESTORE_TEST_HOLD_FD")
    if not fd or os.environ.get("CKPT_RESTORE_TEST_HOLD_AT", "seized") != at:
        return
    stop = cancel.current()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if stop is not None:
            stop.wake.append(w)  # (before the line goes out: a Ctrl-C after it cannot come unseen)
        with contextlib.suppress(OSError, ValueError):
            os.write(int(fd), b"%s %d\n" % (at.encode(), pid))
            if stop is None or not stop.set_:
                p = select.poll()
                p.register(int(fd), select.POLLIN)
                p.register(r, select.POLLIN)
                p.poll()
    finally:
        if stop is not None:
            stop.wake.remove(w)
        os.close(r)
        os.close(w)


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
