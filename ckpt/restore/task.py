"""What makes the new memory a running process: mm fields, signals, name, registers (CRIU's
restorer: prctl(PR_SET_MM_MAP), rt_sigaction, sigreturn-like register load).

The registers go in last, after the final syscall, so nothing we inject can disturb them. A thread
dumped inside a blocking syscall carries the kernel's restart marker in rax (-ERESTARTSYS and
kin) with the syscall in orig_rax; the helper is detached from a signal-delivery-stop, where the
kernel applies exactly the restart rules it would have applied to the original: rip goes back over
the `syscall` instruction and the call is made again (read, wait4, pause...), or -EINTR is returned
when a handler runs and the rules say so. Only -ERESTART_RESTARTBLOCK (nanosleep, clock_nanosleep,
poll with a timeout, futex waits with a timeout) needs help: the kernel would call restart_syscall,
which continues from the task's restart_block, kernel state of the original task that no image
holds. We re-issue the original syscall instead, with its original arguments (CRIU returns -EINTR
here): an absolute sleep ends when it should, a relative one sleeps its full time again.
"""

from __future__ import annotations

import resource
import signal
import struct

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.image.format import TaskRecord, ThreadRecord
from ckpt.proc.task import RLIMITS
from ckpt.ptrace import raw
from ckpt.ptrace.batch import Call
from ckpt.ptrace.regs import MASK64, XSTATE_MAX, dict_to_regs, signed64
from ckpt.restore import blob, freshactions, identityblob
from ckpt.restore.creds import apply_security, keep_caps, set_fs_id
from ckpt.restore.plan import RestorePlan
from ckpt.restore.remote import Remote
from ckpt.restore.signals import send_to_process

SIG_IGN = 1
KSIGACTION = struct.Struct("<QQQQ")  # handler, flags, restorer, mask: x86_64 struct sigaction
PRCTL_MM_MAP = struct.Struct("<11QQII")  # struct prctl_mm_map (104 bytes)
AUXV_OFFSET = 0x1000  # scratch offsets: paths use the start, these live past PATH_MAX
MM_MAP_OFFSET = 0x1400


def xsave_size(pid: int) -> int:
    try:
        return len(raw.getregset(pid, raw.NT_X86_XSTATE, XSTATE_MAX))
    except OSError:
        return len(raw.getregset(pid, raw.NT_PRFPREG, 512))


def check_cpu(pid: int, plan: RestorePlan) -> None:
    """The FPU/vector state must fit this CPU's XSAVE layout (it does on the machine of the dump)."""
    mine, theirs = xsave_size(pid), len(plan.thread.xsave)
    if theirs not in (mine, 512):
        raise RestoreError(
            f"the image's FPU state is {theirs} bytes but this CPU's is {mine}: "
            "restore needs a CPU like the one dumped on"
        )


def open_exe(remote: Remote, plan: RestorePlan) -> int:
    """The executable, opened for PR_SET_MM_MAP (with the process's rights: creds.enter_files); -1
    when /proc/PID/exe is not to be set."""
    if not plan.exe_ok:
        return -1
    mm = plan.mm
    return remote.check(f"opening {mm.exe}", nr.OPENAT, nr.AT_FDCWD & MASK64, remote.put_str(mm.exe),
                        nr.O_RDONLY | nr.O_CLOEXEC, 0)  # fmt: skip


def set_mm(remote: Remote, plan: RestorePlan, exe_fd: int) -> None:
    mm = plan.mm
    auxv = remote.put(mm.auxv, AUXV_OFFSET) if mm.auxv else 0
    rec = PRCTL_MM_MAP.pack(
        mm.start_code, mm.end_code, mm.start_data, mm.end_data, mm.start_brk, mm.brk, mm.start_stack,
        mm.arg_start, mm.arg_end, mm.env_start, mm.env_end, auxv, len(mm.auxv), exe_fd & 0xFFFFFFFF,
    )  # fmt: skip
    try:
        remote.check("setting the mm fields (prctl PR_SET_MM_MAP)", nr.PRCTL, nr.PR_SET_MM, nr.PR_SET_MM_MAP,
                     remote.put(rec, MM_MAP_OFFSET), len(rec), 0)  # fmt: skip
    finally:
        if exe_fd >= 0:
            remote.syscall(nr.CLOSE, exe_fd)
    if plan.comm:
        name = plan.comm.encode("utf-8", "surrogateescape")[:15] + b"\0"
        remote.check("setting the name", nr.PRCTL, nr.PR_SET_NAME, remote.put(name))


def set_sigactions(remote: Remote, plan: RestorePlan) -> None:
    """Every signal's action that the helper does not have already (freshactions.py), in one run
    of injected code (blob.py): one ptrace round trip, not ~62."""
    blob.check_all(remote, sigaction_calls(remote, plan))


def sigaction_calls(remote: Remote, plan: RestorePlan) -> list[tuple[str, Call]]:
    """set_sigactions' calls, each with what it does (for its error)."""
    calls = []
    for a in plan.sigactions:
        if a.sig == signal.SIGTRAP and a.handler == SIG_IGN:
            remote.no_traps = True  # from here on, no injection may force a SIGTRAP (remote.py)
    for a in freshactions.to_set(plan.sigactions, freshactions.helper_ignored(remote.pid)):
        if a.sig in (nr.SIGKILL, nr.SIGSTOP):
            continue
        act = KSIGACTION.pack(a.handler, a.flags, a.restorer, a.mask)
        call = Call(nr.RT_SIGACTION, (a.sig, 0, 0, 8), out_arg=1, inp=act)
        calls.append((f"setting the action of signal {a.sig}", call))
    return calls


def set_process(remote: Remote, plan: RestorePlan) -> None:
    """umask and personality. After the address space is built: a personality such as
    READ_IMPLIES_EXEC changes what later mmap and mprotect calls do."""
    t = plan.task
    remote.syscall(nr.UMASK, t.umask)  # cannot fail; returns the old mask
    remote.check("setting the personality", nr.PERSONALITY, t.personality)


def set_identity(remote: Remote, pid: int, plan: RestorePlan) -> None:
    """Resource limits, then credentials: the last changes that need privilege, so that everything
    before them (PR_SET_MM_MAP...) could still use ckpt's, and a process dumped as an ordinary user
    is not restored as root. The groups and filesystem ids were taken before the first open
    (creds.enter_files); the capabilities, no_new_privs and seccomp come last (creds.apply_security).

    The limits go in from outside (prlimit) while the helper still has ckpt's credentials: after
    they change, prlimit on it would need CAP_SYS_RESOURCE. Nothing left after them allocates, so a
    tight RLIMIT_AS or RLIMIT_NOFILE cannot get in the way of the restore itself."""
    set_rlimits(pid, plan.task)
    if identityblob.usable(remote, plan):  # two stops instead of ~14 (identityblob.py)
        identityblob.set_main_identity(remote, pid, plan)
        return
    set_thread_identity(remote, pid, plan)
    # A change of credentials makes the mm non-dumpable (fs.suid_dumpable): give back what it was.
    remote.check("setting whether it is dumpable", nr.PRCTL, nr.PR_SET_DUMPABLE, int(plan.task.dumpable))


def set_thread_identity(remote: Remote, tid: int, plan: RestorePlan) -> None:
    """Credentials, capabilities, no_new_privs, seccomp: each is per thread in the kernel, so every
    thread of a multi-threaded process takes them (restore/threads.py)."""
    t = plan.task
    keep_caps(remote, plan)
    r, e, s, fs = t.gid
    remote.check("setting the group ids", nr.SETRESGID, r, e, s)
    set_fs_id(remote, nr.SETFSGID, fs, "group")
    r, e, s, fs = t.uid
    remote.check("setting the user ids", nr.SETRESUID, r, e, s)
    set_fs_id(remote, nr.SETFSUID, fs, "user")
    apply_security(remote, tid, plan)


def set_rlimits(pid: int, task: TaskRecord) -> None:
    for name, (soft, hard) in sorted(task.rlimits.items()):
        try:
            # Python takes limits as signed 64-bit (RLIM_INFINITY is -1); the bits are the kernel's.
            resource.prlimit(pid, RLIMITS[name], (signed64(soft), signed64(hard)))
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            raise RestoreError(f"cannot set the restored process's limit on {name}: {why}") from None


def queue_signals(pid: int, plan: RestorePlan, tids: dict[int, int] | None = None) -> None:
    """The signals pending at dump time, sent again while the process is still stopped: it takes
    them as it resumes, as the original would have. Each to the thread it was pending for (`tids`:
    the restored thread of each dumped one), those of the process's shared queue to the process."""
    for p in plan.task.pending:
        tid = (tids or {}).get(p.tid, pid)
        try:
            if p.shared:
                send_to_process(pid, p.sig, p.info)
            elif p.info is not None:
                raw.requeue_signal(pid, tid, p.sig, p.info)
            else:
                raw.tgkill(pid, tid, p.sig)
        except OSError as e:
            raise RestoreError(f"cannot send the pending signal {p.sig} again: {e.strerror}") from None


def resume_regs(regs: dict[str, int]) -> dict[str, int]:
    """The dumped registers, with -ERESTART_RESTARTBLOCK turned into a re-issue (module docstring)."""
    r = dict(regs)
    if signed64(r["orig_rax"]) >= 0 and signed64(r["rax"]) == -nr.ERESTART_RESTARTBLOCK:
        r["rax"] = r["orig_rax"]
        r["rip"] = (r["rip"] - 2) & MASK64
        r["orig_rax"] = MASK64  # no syscall in progress any more: nothing for the kernel to restart
    return r


def load_thread(pid: int, plan: RestorePlan) -> None:
    """Signal mask, FPU/vector state, then the general registers. No syscall may follow."""
    load_regs(pid, plan.thread)


def load_regs(tid: int, t: ThreadRecord) -> None:
    """One thread's signal mask, FPU/vector state and general registers (fs_base/gs_base: its TLS)."""
    try:
        raw.setsigmask(tid, t.sigmask)
        raw.setregset(tid, raw.NT_PRFPREG if len(t.xsave) == 512 else raw.NT_X86_XSTATE, t.xsave)
        raw.setregs(tid, dict_to_regs(resume_regs(t.regs)))
    except OSError as e:
        raise RestoreError(f"cannot load the registers of restored thread {tid}: {e.strerror}") from None
