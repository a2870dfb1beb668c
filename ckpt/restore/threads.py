"""Every thread of a multi-threaded process, made in the restored process (issue 12 B2; CRIU's
restorer clones its threads the same way).

Each thread is made by a `clone3` injected into the main thread once that one holds everything the
threads share (memory, fds, cwd, signal actions) and the per-thread settings a clone copies
(personality, loginuid, prctl flags; its credentials come later, per thread):
CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM, with `set_tid` = the dumped
tid when it is free (as for the main pid; a taken tid is reported, not hidden). The helper is traced
with PTRACE_O_TRACECLONE, so the kernel attaches every new thread to ckpt and stops it
(PTRACE_EVENT_STOP) before it runs a single instruction of its own; the bytes after the gadget's
`syscall`, where it would start, are a `jmp .` all the same. From then on each thread is a Remote of
its own (the same gadget, the same scratch page) and gets, by syscalls injected into it: its
sigaltstack, clear_child_tid, robust futex list, rseq area and name; later the credentials and
seccomp filters (task.set_thread_identity), and last, from outside, its signal mask, FPU state and
registers (fs_base/gs_base: its TLS), the signals pending for it, and its scheduling policy,
priority, nice value, affinity, timer slack and I/O priority.

A thread dumped inside a blocking syscall (futex, read, nanosleep...) is let go from the
signal-delivery-stop of its last injected syscall, like the main thread, so the kernel applies the
same restart rules to it (task.resume_regs), and only once it is back inside the syscall (resume.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from dataclasses import dataclass, field

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.image.format import ThreadRecord
from ckpt.ptrace import raw
from ckpt.ptrace.seccomp import PTRACE_SETOPTIONS
from ckpt.restore.helper import PTRACE_O_EXITKILL
from ckpt.restore.pidns import inside_tid, outer_tid
from ckpt.restore.plan import RestorePlan
from ckpt.restore.props import PR_SET_PDEATHSIG, RSEQ, set_own_state, set_sched
from ckpt.restore.remote import SYSCALL_INSN, Remote
from ckpt.restore.resume import let_run
from ckpt.restore.task import load_regs, set_thread_identity

CLONE3 = 435
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM = 0x10000, 0x40000
THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
CLONE_ARGS = struct.Struct("<10Q")  # struct clone_args up to set_tid_size (CLONE_ARGS_SIZE_VER1)
PTRACE_O_TRACECLONE = 1 << 3
JMP_SELF = b"\xeb\xfe"
ARGS_OFFSET = 0x1800  # in the scratch area: clone_args, then the tid set_tid points at
START_TIMEOUT = 10.0


@dataclass
class Thread:
    record: ThreadRecord
    tid: int
    remote: Remote


@dataclass
class Threads:
    """The restored process's threads other than the main one, stopped under ptrace."""

    pid: int
    dumped_pid: int
    items: list[Thread] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # tids that could not be kept

    @property
    def tids(self) -> dict[int, int]:
        """Dumped tid -> restored tid, the main thread included."""
        return {self.dumped_pid: self.pid, **{t.record.tid: t.tid for t in self.items}}

    @property
    def syscalls(self) -> int:
        return sum(t.remote.count for t in self.items)

    def set_identity(self, plan: RestorePlan) -> None:
        for t in self.items:
            set_thread_identity(t.remote, t.tid, plan)
            pdeath = t.record.props.pdeathsig if t.record.props is not None else 0
            if pdeath:  # after the credentials: a change of them clears it
                t.remote.check(f"setting the parent-death signal of thread {t.record.tid}", nr.PRCTL,
                               PR_SET_PDEATHSIG, pdeath, 0, 0, 0)  # fmt: skip

    def load(self) -> None:
        for t in self.items:
            load_regs(t.tid, t.record)

    def set_from_outside(self) -> None:
        for t in self.items:
            if t.record.props is None:
                continue
            try:
                set_sched(t.tid, t.record.props)
            except OSError as e:
                raise RestoreError(f"cannot set the scheduling state of thread {t.tid}: {e}") from None

    def detach(self) -> None:
        """Let every thread run (before the main one: the process runs once any thread does), each
        dumped in a syscall back inside it first (resume.py)."""
        for t in self.items:
            let_run(t.tid, t.record.regs)

    def close(self) -> None:
        for t in self.items:
            t.remote.close()


def _clone(remote: Remote, want: int | None) -> int:
    """clone3 in the main thread; the new tid, or -errno."""
    tid_at = remote.scratch + ARGS_OFFSET + CLONE_ARGS.size
    set_tid, size = (tid_at, 1) if want else (0, 0)
    args = CLONE_ARGS.pack(THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, set_tid, size)
    addr = remote.put(args + struct.pack("<iI", want or 0, 0), ARGS_OFFSET)
    return remote.syscall(CLONE3, addr, CLONE_ARGS.size)


def _take(remote: Remote, tid: int) -> Remote:
    """The new thread's first stop (the kernel attached it to us), and a Remote for it."""
    w = raw.wait(tid, START_TIMEOUT)
    if w is None or not w.stopped:
        raise RestoreError(f"the restored thread {tid} did not stop under ptrace")
    r = Remote(tid, remote.site, remote.shared_sigchld)  # (the same threads of ours: no new scan)
    r.scratch, r.scratch_size = remote.scratch, remote.scratch_size
    r.no_traps = remote.no_traps  # the actions are the process's: its threads share them
    return r


def _own_state(t: Thread) -> None:
    """What each thread holds for itself and a clone does not copy: given by the thread itself."""
    rec, r = t.record, t.remote
    tp = rec.props
    if tp is not None:
        set_own_state(r, tp)
    if rec.rseq is not None:
        addr, length, sig = rec.rseq
        r.check(f"registering the rseq area {addr:#x} of thread {rec.tid}", RSEQ, addr, length, 0, sig)
    if tp is not None and tp.comm is not None:
        name = tp.comm.encode("utf-8", "surrogateescape")[:15] + b"\0"
        r.check(f"naming thread {rec.tid}", nr.PRCTL, nr.PR_SET_NAME, r.put(name, ARGS_OFFSET))


def create_threads(remote: Remote, pid: int, plan: RestorePlan) -> Threads:
    """Clone every other thread of the plan from the main thread (`remote`), each stopped and given
    its own state. On failure the caller kills the helper (helper.kill_helper reaps the threads)."""
    out = Threads(pid, plan.pid)
    if not plan.threads:
        return out
    # A new thread would start right after the `syscall`: make that a harmless spin.
    remote.write(remote.site + len(SYSCALL_INSN), JMP_SELF)
    try:
        raw.call(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL | PTRACE_O_TRACECLONE)
    except OSError as e:
        raise RestoreError(f"cannot trace the threads of the restore helper: {e.strerror}") from None
    try:
        for rec in plan.threads:
            tid = _clone(remote, inside_tid(plan, pid, rec.tid))  # (the tid it saw, in a --pidns namespace)
            if tid < 0:
                why = {errno.EEXIST: "it is in use", errno.EPERM: "not allowed"}.get(-tid, os.strerror(-tid))
                tid = _clone(remote, None)
                if tid < 0:
                    raise RestoreError(f"cannot create thread {rec.tid}: clone3 failed: {os.strerror(-tid)}")
                out.notes.append(f"thread {rec.tid} restored as tid {tid} (its tid could not be kept: {why})")
            tid = outer_tid(pid, tid)  # clone3 answered with the tid inside a --pidns namespace
            t = Thread(rec, tid, _take(remote, tid))
            out.items.append(t)
            _own_state(t)
    except BaseException:
        out.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            raw.call(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL)
    return out
