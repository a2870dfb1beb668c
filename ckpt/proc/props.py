"""Process properties beyond memory, registers and fds, read at dump (issue 12 (A)).

From /proc and from outside, without touching the process: oom_score_adj, loginuid, THP disable
(status), coredump_filter, each mapping's VmFlags (smaps), POSIX timers (timers), file locks (fdinfo),
guard regions (PAGEMAP_SCAN's PAGE_IS_GUARD), and per thread the scheduling policy, nice value,
affinity, timer slack, I/O priority and robust futex list. From the frozen process, by ptrace or an
injected syscall: the rseq registration of each thread (PTRACE_GET_RSEQ_CONFIGURATION), its
sigaltstack and clear_child_tid address (PR_GET_TID_ADDRESS), interval timers (getitimer), POSIX
timers' time left (timer_gettime), the parent-death signal, the child-subreaper bit, and the private
membarrier registrations, which nothing in /proc shows: the expedited commands themselves answer
EPERM when unregistered and are harmless on a frozen process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from typing import Any

from ckpt.errors import TargetError, TargetExited
from ckpt.memory import PagemapScanner
from ckpt.proc.maps import Vma
from ckpt.proc.threads import add_thread_state
from ckpt.ptrace import Frozen, raw

PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
RSEQ_CONFIG = struct.Struct("<QIIII")  # rseq_abi_pointer, rseq_abi_size, signature, flags, pad
PAGE_IS_GUARD = 1 << 8  # PAGEMAP_SCAN category (Linux 6.15+)
GETITIMER, TIMER_GETTIME, MEMBARRIER = 36, 224, 324
SIGALTSTACK, GET_ROBUST_LIST, IOPRIO_GET, PRCTL = 131, 274, 252, 157
PR_GET_PDEATHSIG, PR_GET_CHILD_SUBREAPER, PR_GET_TID_ADDRESS = 2, 37, 40
STACK_T = struct.Struct("<Qi4xQ")  # ss_sp, ss_flags, ss_size
SS_DISABLE = 2
IOPRIO_WHO_PROCESS = 1
ITIMERVAL = struct.Struct("<4q")  # interval (sec, usec), value (sec, usec)
ITIMERSPEC = struct.Struct("<4q")  # interval (sec, nsec), value (sec, nsec)
# membarrier: (the command that needs the registration, the registration's command bit)
MEMBARRIER_PRIVATE = ((1 << 3, 1 << 4), (1 << 5, 1 << 6), (1 << 7, 1 << 8))
LOCK_TYPES = ("READ", "WRITE")


@dataclass(frozen=True)
class Props:
    """What a dump records: the props record (a dict for PropsRecord), VmFlags by mapping start, and
    the rseq registration of each thread."""

    record: dict[str, Any]
    vmflags: dict[int, str]
    rseq: dict[int, tuple[int, int, int] | None]
    threads: dict[int, dict[str, Any]]  # tid -> ThreadProps as a dict


def _read(path: str, pid: int) -> str:
    try:
        with open(path, errors="surrogateescape") as f:  # paths in smaps are bytes, not always UTF-8
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise TargetExited(f"process {pid} does not exist (or exited)") from None
    except PermissionError:
        raise TargetError(f"cannot read {path}: permission denied") from None


def read_vmflags(pid: int) -> dict[int, str]:
    """smaps' VmFlags line of each mapping, by its start address."""
    out: dict[int, str] = {}
    start = -1
    for ln in _read(f"/proc/{pid}/smaps", pid).splitlines():
        head = ln.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start = int(head.split("-", 1)[0], 16)
        elif ln.startswith("VmFlags:") and start >= 0:
            out[start] = " ".join(ln[8:].split())
    return out


def read_timers(pid: int) -> list[dict[str, Any]]:
    """/proc/PID/timers: "ID: N", "signal: SIG/SIGVAL", "notify: KIND/pid.N|tid.N", "ClockID: N"."""
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    try:
        for ln in _read(f"/proc/{pid}/timers", pid).splitlines():
            key, _, val = ln.partition(": ")
            if key == "ID":
                cur = {"id": int(val), "value_ns": 0, "interval_ns": 0}
                out.append(cur)
            elif key == "signal":
                sig, _, sv = val.partition("/")
                cur["signo"], cur["sigval"] = int(sig), int(sv, 16)
            elif key == "notify":
                kind, _, who = val.partition("/")
                cur["notify"] = kind
                cur["tid"] = int(who.split(".", 1)[1]) if who.startswith("tid.") else 0
            elif key == "ClockID":
                cur["clock"] = int(val)
    except (ValueError, IndexError):
        raise TargetError(f"cannot parse /proc/{pid}/timers") from None
    return out


def read_locks(pid: int, fds: list[int]) -> list[dict[str, Any]]:
    """Locks the process holds, from each fd's fdinfo "lock:" lines, one per lock.

    A POSIX lock belongs to the process and shows on every fd of its file; a flock or OFD lock on
    each fd sharing its open file description: the first fd that shows it is where it is taken again.
    Lines with "->" are requests the process waits for, not locks it holds."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for fd in sorted(fds):
        try:
            text = _read(f"/proc/{pid}/fdinfo/{fd}", pid)
        except TargetExited:
            if not os.path.exists(f"/proc/{pid}"):
                raise
            continue  # closed meanwhile (cannot happen frozen, but a lock is not worth a failure)
        for ln in text.splitlines():
            if not ln.startswith("lock:") or "->" in ln:
                continue
            w = ln.split()
            # lock: ID: KIND ADVISORY|MANDATORY|ACTIVE|BREAKING TYPE PID MAJ:MIN:INO START END
            if len(w) < 9:
                raise TargetError(f"cannot parse a lock of fd {fd} of process {pid}: {ln!r}")
            kind, typ, inode, start, end = w[2], w[4], w[6], w[7], w[8]
            key = (kind, typ, inode, start, end)
            if key in seen:
                continue
            seen.add(key)
            out.append(
                {
                    "fd": fd,
                    "kind": kind,
                    "write": typ == "WRITE",
                    "start": int(start),
                    "end": -1 if end == "EOF" else int(end),
                }
            )
    return out


def read_guards(pid: int, vmas: list[Vma]) -> list[list[int]]:
    """Guard regions (MADV_GUARD_INSTALL) in the mappings; none found on a kernel without the
    PAGEMAP_SCAN category, which also has no way to show them."""
    spans = [(v.start, v.end) for v in vmas if not v.is_special]
    if not spans:
        return []
    try:
        with PagemapScanner(pid) as s:
            r = s.scan_arrays(spans[0][0], spans[-1][1], category_anyof_mask=PAGE_IS_GUARD)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTTY):  # no PAGEMAP_SCAN (< 6.7) or no guard category
            return []
        raise
    return [[int(a), int(b)] for a, b, _ in r]


def rseq_config(tid: int) -> tuple[int, int, int] | None:
    buf = ctypes.create_string_buffer(RSEQ_CONFIG.size)
    try:
        raw.call(PTRACE_GET_RSEQ_CONFIGURATION, tid, RSEQ_CONFIG.size, ctypes.addressof(buf))
    except OSError as e:
        if e.errno in (errno.EIO, errno.EINVAL):  # a kernel before 5.13: no rseq to see
            return None
        raise
    addr, size, sig, _, _ = RSEQ_CONFIG.unpack(buf.raw)
    return (addr, size, sig) if addr else None


def _itimers(fz: Frozen) -> list[list[int]]:
    out = []
    with fz.scratch_region(64) as buf:
        for which in range(3):
            r = fz.syscall(GETITIMER, which, buf)
            if r < 0:
                raise TargetError(f"getitimer({which}) in process {fz.pid} failed: {os.strerror(-r)}")
            isec, iusec, vsec, vusec = ITIMERVAL.unpack(fz.read_mem(buf, ITIMERVAL.size))
            out.append([vsec * 1_000_000 + vusec, isec * 1_000_000 + iusec])
    return out


def _timer_times(fz: Frozen, timers: list[dict[str, Any]]) -> None:
    with fz.scratch_region(64) as buf:
        for t in timers:
            r = fz.syscall(TIMER_GETTIME, t["id"], buf)
            if r < 0:
                raise TargetError(f"timer_gettime({t['id']}) in process {fz.pid} failed: {os.strerror(-r)}")
            isec, insec, vsec, vnsec = ITIMERSPEC.unpack(fz.read_mem(buf, ITIMERSPEC.size))
            t["value_ns"] = vsec * 1_000_000_000 + vnsec
            t["interval_ns"] = isec * 1_000_000_000 + insec


def _membarrier(fz: Frozen) -> int:
    got = 0
    for cmd, register in MEMBARRIER_PRIVATE:
        if fz.syscall(MEMBARRIER, cmd, 0, 0) == 0:
            got |= register
    return got


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _robust_list(tid: int) -> list[int]:
    head, length = ctypes.c_void_p(), ctypes.c_size_t()
    r = _libc.syscall(GET_ROBUST_LIST, tid, ctypes.byref(head), ctypes.byref(length))
    if r < 0:
        raise TargetError(f"get_robust_list of thread {tid} failed: {os.strerror(ctypes.get_errno())}")
    return [head.value or 0, length.value]


def _prctl_int(fz: Frozen, tid: int, option: int, buf: int, size: int, what: str) -> int:
    r = fz.syscall(PRCTL, option, buf, 0, 0, 0, tid=tid)
    if r < 0:
        raise TargetError(f"prctl({what}) in thread {tid} failed: {os.strerror(-r)}")
    return int.from_bytes(fz.read_mem(buf, size), "little")


def _thread_props(fz: Frozen, pid: int, tid: int) -> dict[str, Any]:
    """sigaltstack, robust list, clear_child_tid, scheduling, timer slack, I/O priority."""
    with fz.scratch_region(64) as buf:
        r = fz.syscall(SIGALTSTACK, 0, buf, tid=tid)
        if r < 0:
            raise TargetError(f"sigaltstack in thread {tid} failed: {os.strerror(-r)}")
        sp, flags, size = STACK_T.unpack(fz.read_mem(buf, STACK_T.size))
        tid_address = _prctl_int(fz, tid, PR_GET_TID_ADDRESS, buf, 8, "PR_GET_TID_ADDRESS")
        # Per thread in the kernel; the main thread's is the process's (read_props).
        pdeath = 0 if tid == pid else _prctl_int(fz, tid, PR_GET_PDEATHSIG, buf, 4, "PR_GET_PDEATHSIG")
    prio = _libc.syscall(IOPRIO_GET, IOPRIO_WHO_PROCESS, tid)
    try:
        slack = int(_read(f"/proc/{tid}/timerslack_ns", pid))
        policy = os.sched_getscheduler(tid)
        rt = os.sched_getparam(tid).sched_priority
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        cpus = sorted(os.sched_getaffinity(tid))
    except ProcessLookupError:
        raise TargetExited(f"process {pid} exited") from None
    return {
        "sigaltstack": None if flags & SS_DISABLE else [sp, flags, size],
        "robust_list": _robust_list(tid),
        "tid_address": tid_address,
        "policy": policy,
        "rt_priority": rt,
        "nice": nice,
        "affinity": cpus,
        "timerslack_ns": slack,
        "ioprio": max(prio, 0),
        "pdeathsig": pdeath,
    }


ARCH_PRCTL = 158
# prctl/arch_prctl state with a getter, restored when it differs from a new process's:
# name -> (syscall, get option, extra get argument or None, reads through a pointer, default)
PRCTL_STATE: dict[str, tuple[int, int, int | None, bool, int]] = {
    "tsc": (PRCTL, 25, None, True, 1),  # PR_GET_TSC -> PR_TSC_ENABLE
    "mce_kill": (PRCTL, 34, None, False, 2),  # PR_MCE_KILL_GET -> PR_MCE_KILL_DEFAULT
    "io_flusher": (PRCTL, 58, None, False, 0),  # PR_GET_IO_FLUSHER
    "mdwe": (PRCTL, 66, None, False, 0),  # PR_GET_MDWE
    "memory_merge": (PRCTL, 68, None, False, 0),  # PR_GET_MEMORY_MERGE (KSM for the whole process)
    "spec_store_bypass": (PRCTL, 52, 0, False, -1),  # PR_GET_SPECULATION_CTRL: default is the CPU's
    "spec_indirect_branch": (PRCTL, 52, 1, False, -1),
    "spec_l1d_flush": (PRCTL, 52, 2, False, -1),
    "cpuid": (ARCH_PRCTL, 0x1011, None, False, 1),  # ARCH_GET_CPUID: cpuid not faulting
}


def _prctl_state(fz: Frozen, buf: int) -> dict[str, int]:
    """Each PRCTL_STATE the kernel answers (a kernel or CPU without one: left out)."""
    out = {}
    for name, (sysno, opt, extra, by_ptr, _) in PRCTL_STATE.items():
        if by_ptr:
            r = fz.syscall(sysno, opt, buf, 0, 0, 0)
            val = int.from_bytes(fz.read_mem(buf, 4), "little", signed=True) if r >= 0 else r
        else:
            r = val = fz.syscall(sysno, opt, extra or 0, 0, 0, 0)
        if r >= 0:
            out[name] = val
    return out


def _status_int(status: str, key: str, default: int) -> int:
    for ln in status.splitlines():
        if ln.startswith(key + ":"):
            return int(ln.split()[1])
    return default


def read_props(fz: Frozen, pid: int, vmas: list[Vma], fds: list[int]) -> Props:
    """Everything above, for a frozen process (the injected calls need it frozen)."""
    status = _read(f"/proc/{pid}/status", pid)
    timers = read_timers(pid)
    _timer_times(fz, timers)
    try:
        oom = int(_read(f"/proc/{pid}/oom_score_adj", pid))
        loginuid = int(_read(f"/proc/{pid}/loginuid", pid)) if os.path.exists(f"/proc/{pid}/loginuid") else -1
    except ValueError:
        raise TargetError(f"cannot parse oom_score_adj or loginuid of process {pid}") from None
    record = {
        "oom_score_adj": oom,
        "loginuid": loginuid & 0xFFFFFFFF,
        "thp_disabled": _status_int(status, "THP_enabled", 1) == 0,
        "membarrier": _membarrier(fz),
        "itimers": _itimers(fz),
        "timers": timers,
        "locks": read_locks(pid, fds),
        "guards": read_guards(pid, vmas),
        "coredump_filter": int(_read(f"/proc/{pid}/coredump_filter", pid), 16),
    }
    with fz.scratch_region(64) as buf:
        record["pdeathsig"] = _prctl_int(fz, pid, PR_GET_PDEATHSIG, buf, 4, "PR_GET_PDEATHSIG")
        record["subreaper"] = (
            _prctl_int(fz, pid, PR_GET_CHILD_SUBREAPER, buf, 4, "PR_GET_CHILD_SUBREAPER") != 0
        )
        record["prctl"] = _prctl_state(fz, buf)
    threads = {tid: _thread_props(fz, pid, tid) for tid in fz.tids}
    add_thread_state(pid, threads)
    return Props(record, read_vmflags(pid), {tid: rseq_config(tid) for tid in fz.tids}, threads)


PTRACE_PEEKSIGINFO = 0x4209
PEEKSIGINFO_ARGS = struct.Struct("<QIi")  # off, flags, nr
PTRACE_PEEKSIGINFO_SHARED = 1
SIGINFO_SIZE = 128
PEEK_BATCH = 32
MAX_QUEUED = 1 << 16


def queued_signals(tids: list[int]) -> list[dict[str, Any]]:
    """Signals waiting in the kernel's queues (blocked ones, typically), with their siginfo, in queue
    order: each thread's own queue, then the process's shared queue (given to the first thread: a
    restore sends them back to the process, where any thread may take them). PTRACE_PEEKSIGINFO
    reads them without taking them off."""
    out: list[dict[str, Any]] = []
    for tid, flags in [(t, 0) for t in tids] + [(tids[0], PTRACE_PEEKSIGINFO_SHARED)] if tids else []:
        off = 0
        buf = ctypes.create_string_buffer(SIGINFO_SIZE * PEEK_BATCH)
        while off < MAX_QUEUED:
            args = ctypes.create_string_buffer(PEEKSIGINFO_ARGS.pack(off, flags, PEEK_BATCH))
            n = raw.call(PTRACE_PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(buf))
            for i in range(n):
                info = buf.raw[i * SIGINFO_SIZE : (i + 1) * SIGINFO_SIZE]
                sig = int.from_bytes(info[:4], "little")
                shared = flags == PTRACE_PEEKSIGINFO_SHARED
                out.append({"tid": tid, "sig": sig, "info": info, "shared": shared})
            if n < PEEK_BATCH:
                break
            off += n
    return out
