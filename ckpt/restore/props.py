"""Process properties given back (issue 12 (A)): VmFlags by madvise/mlock, guard regions, file locks,
oom_score_adj, loginuid, THP disable, membarrier and rseq registrations, interval and POSIX timers.

plan.py refuses what none of this can give back; `verify_vmflags` checks, before the process runs,
that every mapping has the VmFlags it was dumped with, so a flag nobody thought of is an error
rather than a silent difference.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import struct

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.image.format import PropsRecord, ThreadProps
from ckpt.proc.props import ITIMERSPEC, ITIMERVAL, PRCTL_STATE, read_vmflags
from ckpt.ptrace.batch import Call
from ckpt.restore.blob import check_ret
from ckpt.restore.pidns import inner
from ckpt.restore.plan import IGNORED_VMFLAGS, RestorePlan
from ckpt.restore.remote import Remote

MADVISE_FLAGS = {  # VmFlags mnemonic -> the madvise advice that sets it
    "rr": 1,  # MADV_RANDOM
    "sr": 2,  # MADV_SEQUENTIAL
    "dc": 10,  # MADV_DONTFORK
    "mg": 12,  # MADV_MERGEABLE
    "hg": 14,  # MADV_HUGEPAGE
    "nh": 15,  # MADV_NOHUGEPAGE
    "dd": 16,  # MADV_DONTDUMP
    "wf": 18,  # MADV_WIPEONFORK
}
MLOCK_ONFAULT = 1
MLOCK2, SETITIMER, TIMER_CREATE, TIMER_SETTIME, RSEQ, MEMBARRIER = 325, 38, 222, 223, 334, 324
FLOCK, FCNTL = 73, 72
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
F_SETLK, F_OFD_SETLK = 6, 37
F_RDLCK, F_WRLCK = 0, 1
FLOCK_STRUCT = struct.Struct("<hh4xqqi4x")  # l_type, l_whence, l_start, l_len, l_pid
SIGEVENT = struct.Struct("<Qiii44x")  # sigev_value, sigev_signo, sigev_notify, sigev_tid (64 bytes)
SIGEV_NOTIFY = {"signal": 0, "none": 1, "thread": 2}
SIGEV_THREAD_ID = 4
PR_SET_THP_DISABLE = 41
PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, RESTORE_IDS_ON = 77, 0, 1
ARG_OFFSET = 0x1800  # scratch offset for the structs below (paths use the start)


def set_vma_flags(remote: Remote, plan: RestorePlan) -> None:
    """madvise, mlock and guard regions, on the mappings as built and filled."""
    for p in plan.vmas:
        v = p.vma
        flags = v.flag_set
        size = v.end - v.start
        where = f"{v.path or '[anon]'} [{v.start:#x}-{v.end:#x})"
        for mn, advice in MADVISE_FLAGS.items():
            if mn in flags:
                remote.check(f"madvise({mn}) of {where}", nr.MADVISE, v.start, size, advice)
        if "lo" in flags:
            remote.check(f"locking {where} in memory", MLOCK2, v.start, size,
                         MLOCK_ONFAULT if "lf" in flags else 0)  # fmt: skip
    props = plan.props
    for start, end in props.guards if props else []:
        remote.check(f"installing the guard region [{start:#x}-{end:#x})", nr.MADVISE, start, end - start,
                     nr.MADV_GUARD_INSTALL)  # fmt: skip


def verify_vmflags(pid: int, plan: RestorePlan, ignore: frozenset[str] = frozenset()) -> None:
    """Every mapping's VmFlags as dumped (those a layer recorded), or the restore fails naming it.
    `ignore`: flags not compared (a migration's warm helper checks before the final protections)."""
    got = read_vmflags(pid)
    starts = sorted(got)
    bad = []
    for p in plan.vmas:
        v = p.vma
        if v.flags is None:
            continue
        i = bisect.bisect_right(starts, v.start) - 1
        have = set(got[starts[i]].split()) if i >= 0 else set()
        want = set(v.flag_set)
        diff = (want ^ have) - IGNORED_VMFLAGS - ignore
        if diff:
            now, then = (" ".join(sorted(f - IGNORED_VMFLAGS)) for f in (have, want))
            where = f"{v.path or '[anon]'} [{v.start:#x}-{v.end:#x})"
            bad.append(f"{where} has VmFlags {now}, dumped with {then}")
    if bad:
        raise RestoreError("the restored mappings differ from the dumped ones: " + "; ".join(bad[:8]))


def set_oom_score_adj(pid: int, props: PropsRecord) -> None:
    """From outside: lowering it needs CAP_SYS_RESOURCE, which ckpt has and the process may not."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(props.oom_score_adj))
    except OSError as e:
        raise RestoreError(f"cannot set oom_score_adj {props.oom_score_adj}: {e.strerror}") from None


def set_loginuid(remote: Remote, pid: int, props: PropsRecord) -> None:
    """Only the task itself may write its loginuid (and only once, without CAP_AUDIT_CONTROL): an
    injected write, while the helper still has ckpt's capabilities. The helper inherited ckpt's."""
    try:
        with open(f"/proc/{pid}/loginuid") as f:
            mine = int(f.read()) & 0xFFFFFFFF
    except FileNotFoundError:
        return  # a kernel without CONFIG_AUDIT: no loginuid to give back (nor to see)
    if mine == props.loginuid:
        return
    what = f"setting loginuid {props.loginuid}"
    fd = remote.check(what, nr.OPENAT, nr.AT_FDCWD & (2**64 - 1), remote.put_str("/proc/self/loginuid"),
                      nr.O_RDWR | nr.O_CLOEXEC, 0)  # fmt: skip
    try:
        text = str(props.loginuid).encode()
        n = remote.check(what, nr.WRITE, fd, remote.put(text, ARG_OFFSET), len(text))
        if n != len(text):
            raise RestoreError(f"{what}: short write")
    finally:
        remote.syscall(nr.CLOSE, fd)


# (what, the call, whether its failure counts): a step of the restore as taskbatch.py runs it in
# one go, or as _each does it one syscall at a time.
Step = tuple[str, Call, bool]


def task_props_calls(plan: RestorePlan) -> list[Step]:
    """THP disable, membarrier and rseq registrations."""
    out: list[Step] = []
    props = plan.props
    if props is not None:
        if props.thp_disabled:
            thp = Call(nr.PRCTL, (PR_SET_THP_DISABLE, 1, 0, 0, 0))
            out.append(("disabling transparent huge pages (PR_SET_THP_DISABLE)", thp, True))
        for bit in (1 << 4, 1 << 6, 1 << 8):
            if props.membarrier & bit:
                out.append((f"membarrier registration {bit:#x}", Call(MEMBARRIER, (bit, 0, 0)), True))
    if plan.thread.rseq is not None:
        addr, length, sig = plan.thread.rseq
        out.append((f"registering the rseq area {addr:#x}", Call(RSEQ, (addr, length, 0, sig)), True))
    return out


def set_task_props(remote: Remote, plan: RestorePlan) -> None:
    _each(remote, task_props_calls(plan))


def _each(remote: Remote, steps: list[Step]) -> None:
    """The steps one syscall at a time (a call's input buffer at ARG_OFFSET)."""
    for what, c, counts in steps:
        args = [a for a in c.args if isinstance(a, int)]  # (no Refs: nothing uses an earlier result)
        if c.inp:
            args[c.out_arg] = remote.put(c.inp, ARG_OFFSET)
        r = remote.syscall(c.nr, *args)
        if counts:
            check_ret(what, r)


def take_locks(remote: Remote, plan: RestorePlan) -> None:
    """The file locks the process held, on its restored fds. Not waited for: a lock someone else
    holds now (the original process, if it still runs) fails the restore."""
    if plan.props is None:
        return
    for lk in plan.props.locks:
        what = f"taking the {lk.kind} lock on fd {lk.fd}"
        if lk.kind == "FLOCK":
            r = remote.syscall(FLOCK, lk.fd, (LOCK_EX if lk.write else LOCK_SH) | LOCK_NB)
        else:
            length = 0 if lk.end == -1 else lk.end - lk.start + 1
            arg = remote.put(FLOCK_STRUCT.pack(F_WRLCK if lk.write else F_RDLCK, 0, lk.start, length, 0),
                             ARG_OFFSET)  # fmt: skip
            r = remote.syscall(FCNTL, lk.fd, F_SETLK if lk.kind == "POSIX" else F_OFD_SETLK, arg)
        if r < 0:
            raise RestoreError(f"{what} failed: another process holds it now (is the original still running?)"
                               if r in (-11, -13) else f"{what} failed: error {-r}")  # fmt: skip


def set_timers(remote: Remote, pid: int, plan: RestorePlan, tids: dict[int, int] | None = None) -> None:
    """Interval timers, then POSIX timers with their own ids (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.17+:
    timer_create takes the id from *timerid), each armed with the time it had left. `tids`: the
    restored thread of each dumped one (a timer may signal one thread)."""
    props = plan.props
    if props is None:
        return
    for which, (value, interval) in enumerate(props.itimers):
        if value or interval:
            tv = ITIMERVAL.pack(interval // 10**6, interval % 10**6, value // 10**6, value % 10**6)
            arg = remote.put(tv, ARG_OFFSET)
            remote.check(f"setting interval timer {which}", SETITIMER, which, arg, 0)
    if not props.timers:
        return
    remote.check("restoring POSIX timer ids (prctl PR_TIMER_CREATE_RESTORE_IDS, Linux 6.17+)", nr.PRCTL,
                 PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0)  # fmt: skip
    for t in sorted(props.timers, key=lambda t: t.id):
        notify = SIGEV_NOTIFY[t.notify] | (SIGEV_THREAD_ID if t.tid else 0)
        own = {plan.pid: pid, **(tids or {})}
        tid = inner(own[t.tid]) if t.tid in own else t.tid  # (as a --pidns namespace numbers it)
        ev = remote.put(SIGEVENT.pack(t.sigval, t.signo, notify, tid), ARG_OFFSET)
        idp = remote.put(struct.pack("<i", t.id), ARG_OFFSET + SIGEVENT.size)
        remote.check(f"creating POSIX timer {t.id}", TIMER_CREATE, t.clock & (2**64 - 1), ev, idp)
        got = struct.unpack("<i", remote.read(idp, 4))[0]
        if got != t.id:
            raise RestoreError(f"POSIX timer {t.id} was created as {got}")
        if t.value_ns:
            spec = ITIMERSPEC.pack(t.interval_ns // 10**9, t.interval_ns % 10**9, t.value_ns // 10**9,
                                   t.value_ns % 10**9)  # fmt: skip
            remote.check(
                f"arming POSIX timer {t.id}", TIMER_SETTIME, t.id, 0, remote.put(spec, ARG_OFFSET), 0
            )
    remote.check(
        "ending POSIX timer id restore", nr.PRCTL, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0
    )


SIGALTSTACK, SET_TID_ADDRESS, SET_ROBUST_LIST, IOPRIO_SET = 131, 218, 273, 251
SS_ONSTACK = 1  # reported, never set: the kernel tells it from the stack pointer
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
STACK_T = struct.Struct("<Qi4xQ")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def set_thread_state(remote: Remote, plan: RestorePlan) -> None:
    """sigaltstack, clear_child_tid and the robust futex list: the helper's own point into the
    stub, which is gone."""
    if plan.thread.props is not None:
        set_own_state(remote, plan.thread.props)


def set_own_state(remote: Remote, tp: ThreadProps) -> None:
    """sigaltstack, clear_child_tid, robust list: of the thread `remote` runs syscalls in."""
    _each(remote, own_state_calls(tp))


def own_state_calls(tp: ThreadProps) -> list[Step]:
    out: list[Step] = []
    if tp.sigaltstack is not None:
        sp, flags, size = tp.sigaltstack
        ss = STACK_T.pack(sp, flags & ~SS_ONSTACK, size)
        out.append(("setting the signal stack (sigaltstack)", Call(SIGALTSTACK, (0, 0), inp=ss), True))
    # set_tid_address returns the tid; it cannot fail
    out.append(("setting the clear-child-tid address", Call(SET_TID_ADDRESS, (tp.tid_address,)), False))
    head, length = tp.robust_list
    if head:
        out.append(("setting the robust futex list", Call(SET_ROBUST_LIST, (head, length)), True))
    return out


def set_after_identity(remote: Remote, plan: RestorePlan) -> None:
    """The parent-death signal (a change of credentials clears it), the child-subreaper bit, and
    memory-deny-write-execute (which would refuse the restore's own executable page)."""
    props = plan.props
    # Always: the helper asked for SIGKILL when ckpt dies, until it was seized (restore/stub.S).
    pdeath = props.pdeathsig if props is not None else 0
    remote.check("setting the parent-death signal", nr.PRCTL, PR_SET_PDEATHSIG, pdeath, 0, 0, 0)
    if props is None:
        return
    if props.subreaper:
        remote.check("making it a child subreaper", nr.PRCTL, PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # mlockall(MCL_FUTURE [| MCL_ONFAULT]): only the mm's default for new mappings (the current
    # ones were locked by set_vma_flags, as dumped); late, so that the restore's own mappings are not.
    mcl = props.prctl.get("mlockall", 0) & (MCL_FUTURE | MCL_ONFAULT)
    if mcl & MCL_FUTURE:
        remote.check("mlockall(MCL_FUTURE) (new mappings locked)", MLOCKALL, mcl)
    # Last of all: from here on no mapping may become executable and writable.
    mdwe = props.prctl.get("mdwe", 0)
    if mdwe:
        remote.check("setting memory-deny-write-execute", nr.PRCTL, PR_SET_MDWE, mdwe, 0, 0, 0)


# name -> how to set it: (syscall, option, value goes after this many fixed arguments, ...)
PRCTL_SETTERS: dict[str, tuple[int, tuple[int, ...]]] = {
    "tsc": (nr.PRCTL, (26,)),  # PR_SET_TSC
    "mce_kill": (nr.PRCTL, (33, 1)),  # PR_MCE_KILL, PR_MCE_KILL_SET
    "io_flusher": (nr.PRCTL, (57,)),  # PR_SET_IO_FLUSHER
    "memory_merge": (nr.PRCTL, (67,)),  # PR_SET_MEMORY_MERGE
    "spec_store_bypass": (nr.PRCTL, (53, 0)),  # PR_SET_SPECULATION_CTRL
    "spec_indirect_branch": (nr.PRCTL, (53, 1)),
    "spec_l1d_flush": (nr.PRCTL, (53, 2)),
    "cpuid": (158, (0x1012,)),  # arch_prctl ARCH_SET_CPUID
}
PR_SET_MDWE = 65
MLOCKALL, MCL_FUTURE, MCL_ONFAULT = 151, 2, 4
PR_SPEC_PRCTL, PR_SPEC_STATES = 1, 2 | 4 | 8 | 16  # ENABLE, DISABLE, FORCE_DISABLE, DISABLE_NOEXEC
PR_SPEC_ENABLE = 2


def set_prctl_state(remote: Remote, plan: RestorePlan) -> None:
    """prctl state that differs from what the helper has now (ckpt.proc.props.PRCTL_STATE). Not
    memory-deny-write-execute: see set_after_identity."""
    props = plan.props
    if props is None:
        return
    for name, val in sorted(props.prctl.items()):
        if name not in PRCTL_SETTERS:
            continue
        sysno, head = PRCTL_SETTERS[name]
        if name.startswith("spec_"):
            # Settable only where the CPU's mitigation is under prctl control; enabled is the default.
            state = val & PR_SPEC_STATES
            if not val & PR_SPEC_PRCTL or state in (0, PR_SPEC_ENABLE):
                continue
            val = state
        elif val == _default(name):
            continue
        args = (*head, val, 0, 0, 0)[:5]
        remote.check(f"setting {name} ({val})", sysno, *args)


def _default(name: str) -> int:
    return PRCTL_STATE[name][4]


def set_from_outside(pid: int, plan: RestorePlan) -> None:
    """Scheduling, nice, affinity, timer slack, I/O priority and coredump_filter, from ckpt (root may
    set them on another process). Last, just before the process runs: SCHED_IDLE or a narrow
    affinity would only slow the restore down."""
    props = plan.props
    tp = plan.thread.props
    try:
        if props is not None:
            with open(f"/proc/{pid}/coredump_filter", "w") as f:
                f.write(f"{props.coredump_filter:#x}")
        if tp is not None:
            set_sched(pid, tp)
    except OSError as e:
        raise RestoreError(f"cannot set the scheduling state of the restored process: {e}") from None


def set_sched(tid: int, tp: ThreadProps) -> None:
    """Scheduling policy and priority, nice, affinity, timer slack and I/O priority of one thread,
    from outside (each is per thread in the kernel)."""
    os.sched_setscheduler(tid, tp.policy, os.sched_param(tp.rt_priority))
    os.setpriority(os.PRIO_PROCESS, tid, tp.nice)
    if tp.affinity and set(tp.affinity) != os.sched_getaffinity(tid):
        os.sched_setaffinity(tid, tp.affinity)
    with open(f"/proc/{tid}/timerslack_ns", "w") as f:
        f.write(str(tp.timerslack_ns))
    if tp.ioprio and _libc.syscall(IOPRIO_SET, 1, tid, tp.ioprio) < 0:
        raise OSError(ctypes.get_errno(), "ioprio_set")
