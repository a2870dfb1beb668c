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

import contextlib
import ctypes
import errno
import functools
import itertools
import os
import struct
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckpt import sysno as nr
from ckpt.cbuf import char_buffer, warm
from ckpt.errors import TargetError, TargetExited
from ckpt.memory import PagemapScanner
from ckpt.proc import grab, procfs
from ckpt.proc.cwdname import refusal as cwd_refusal
from ckpt.proc.maps import Vma, read_maps
from ckpt.proc.nsid import ids_of
from ckpt.proc.procfs import as_text, read_str, read_text
from ckpt.proc.semundo import refusal as semundo_refusal
from ckpt.proc.stat import read_status
from ckpt.proc.threads import add_thread_state, cloned_of, decoded, main_state
from ckpt.ptrace import raw
from ckpt.ptrace.batch import Call, Plan, Ref, Result
from ckpt.targetrt import recorded, recorded_slack
from ckpt.threadpool import start as start_thread

if TYPE_CHECKING:
    from ckpt.ptrace import Frozen

Answers = Mapping[Hashable, Result]

PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
RSEQ_CONFIG = struct.Struct("<QIIII")  # rseq_abi_pointer, rseq_abi_size, signature, flags, pad
PAGE_IS_GUARD = 1 << 8  # PAGEMAP_SCAN category (Linux 6.15+)
GETITIMER, TIMER_GETTIME, MEMBARRIER = 36, 224, 324
SIGALTSTACK, GET_ROBUST_LIST, IOPRIO_GET, PRCTL = 131, 274, 252, 157
PR_GET_PDEATHSIG, PR_GET_CHILD_SUBREAPER, PR_GET_TID_ADDRESS = 2, 37, 40
PERSONALITY, PERSONALITY_QUERY, PR_GET_TIMERSLACK, PR_GET_NAME = 135, 0xFFFFFFFF, 30, 16
STACK_T = struct.Struct("<Qi4xQ")  # ss_sp, ss_flags, ss_size
SS_DISABLE = 2
IOPRIO_WHO_PROCESS = 1
ITIMERVAL = struct.Struct("<4q")  # interval (sec, usec), value (sec, usec)
ITIMERSPEC = struct.Struct("<4q")  # interval (sec, nsec), value (sec, nsec)
# membarrier: (the command that needs the registration, the registration's command bit)
MEMBARRIER_PRIVATE = ((1 << 3, 1 << 4), (1 << 5, 1 << 6), (1 << 7, 1 << 8))
LOCK_TYPES = ("READ", "WRITE")
MMAP, MINCORE, MADVISE, MUNMAP = 9, 27, 28, 11
MCL_FUTURE, MCL_ONFAULT = 2, 4


@dataclass(frozen=True)
class Props:
    """What a dump records: the props record (a dict for PropsRecord), VmFlags by mapping start, and
    the rseq registration of each thread."""

    record: dict[str, Any]
    vmflags: dict[int, str]
    rseq: dict[int, tuple[int, int, int] | None]
    threads: dict[int, dict[str, Any]]  # tid -> ThreadProps as a dict
    # What is left once the freeze is over, from what it read (no read of the process in it): the
    # record's keys that only parse the batch's answers and the texts read, and where read_props
    # took the other threads' texts from the grab (``cloned_raw``), their names and cloned state.
    # ``record`` is whole only after it is called. None: nothing is left.
    finish: Callable[[], None] | None = None


def _read(path: str, pid: int) -> str:
    return read_str(path, pid, errors="surrogateescape")  # paths in smaps are bytes, not always UTF-8


def read_vmflags(pid: int) -> dict[int, str]:
    """smaps' VmFlags line of each mapping, by its start address."""
    return vmflags_of(_read(f"/proc/{pid}/smaps", pid))


def vmflags_of(text: str) -> dict[int, str]:
    """read_vmflags' answer from smaps' text."""
    out: dict[int, str] = {}
    # Each mapping's block starts with its maps line and ends with "VmFlags:" (the kernel prints it
    # last): jump from one to the next instead of splitting ~25 lines per mapping.
    pos = 0
    while (j := text.find("\nVmFlags:", pos)) >= 0:
        head = text[pos : text.index("-", pos)]
        end = text.find("\n", j + 1)
        end = len(text) if end < 0 else end
        out[int(head, 16)] = " ".join(text[j + 9 : end].split())
        pos = end + 1
    return out


class PageTableReads:
    """What makes the kernel walk every page-table entry of the process, in a thread of its own:
    smaps' VmFlags (~18 ms for 1 GiB present, here) and the guard regions (a PAGEMAP_SCAN of the
    whole span). Nothing in the freeze needs them before it ends: read beside the rest (the copy),
    they cost the freeze only what outlasts it. Start it once no injected call that needs the mm's
    write lock (mmap, munmap, UFFDIO_REGISTER) is left: the walk holds the lock (read) throughout,
    and such a call would wait for it. Still read while frozen: a flag that madvise() set over a
    whole mapping shows nowhere else, so no reading taken before the freeze could be trusted."""

    def __init__(self, pid: int, background: bool = True, vmas: list[Vma] | None = None) -> None:
        """``background`` False: parsed in result() instead, in the caller's thread, where a
        Python thread costs more in start-up and GIL contention than a small process's walks; its
        smaps text (the kernel's walk: ~0.3 ms for 25 mappings, 0.6 for 40, here) can still be read
        beside the freeze, from begin() on.
        ``vmas``: the mappings read in this freeze (else read again here, ~0.2 ms for a small
        process). The guard scan takes only their lowest start and highest end, which a frozen
        process cannot move; the injected code's mapping, gone by now, is not among them."""
        self._pid = pid
        self._vmas = vmas
        self._out: tuple[dict[int, str], list[list[int]]] | None = None
        self._err: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._smaps: grab.PendingFile | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="ckpt-pagetables", daemon=True)
            start_thread(self._thread)

    def begin(self) -> None:
        """Without ``background``: smaps read from now on, on a thread of C's own (ckpt/proc/grab.py
        file_start), for result() to parse. Called once the freezing thread's own page-table walks
        (a small process's dirty scans) are done: side by side, each slowed the other."""
        if self._thread is None and self._smaps is None and self._out is None:
            self._smaps = grab.file_start(f"/proc/{self._pid}/smaps")
            if self._smaps is not None:  # (joined on every path: result(), or when dropped)
                weakref.finalize(self, self._smaps.result)

    def _run(self) -> None:
        try:
            got = self._smaps.result() if self._smaps is not None else None
            text = None if got is None else as_text(got, "surrogateescape")
            flags = read_vmflags(self._pid) if text is None else vmflags_of(text)
            vmas = self._vmas if self._vmas is not None else read_maps(self._pid)
            self._out = (flags, read_guards(self._pid, vmas, flags))
        except BaseException as e:  # handed to the caller of result()
            self._err = e

    def result(self) -> tuple[dict[int, str], list[list[int]]]:
        """(VmFlags by mapping start, guard regions)."""
        if self._thread is None:
            self._run()
        else:
            self._thread.join()
        if self._err is not None:
            raise self._err
        assert self._out is not None
        return self._out


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


def read_locks(pid: int, fds: list[int], texts: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
    """Locks the process holds, from each fd's fdinfo "lock:" lines, one per lock.

    A POSIX lock belongs to the process and shows on every fd of its file; a flock or OFD lock on
    each fd sharing its open file description: the first fd that shows it is where it is taken again.
    Lines with "->" are requests the process waits for, not locks it holds. ``texts``: fdinfo texts
    read in this same freeze (list_fds'), by fd: a frozen process can neither take nor drop a lock,
    so they are what a second read would find."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for fd in sorted(fds):
        try:
            text = texts[fd] if texts is not None and fd in texts else _read(f"/proc/{pid}/fdinfo/{fd}", pid)
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


GUARD_PROBE_AT = 0x10000  # the probe's page: below any executable, so smaps' first record


@functools.cache
def guard_flag() -> str:
    """How this kernel tells which mappings may hold guard regions (MADV_GUARD_INSTALL):
    - "none": it has none (the advice is refused): there is nothing to look for;
    - "gu": smaps' VmFlags marks each such mapping "gu" (VM_MAYBE_GUARD, Linux 6.19 and 6.18.y: set
      by the install, sticky through splits and merges; a mapping without it holds no guard);
    - "scan": it has guards but no such flag: every mapping is scanned (PAGEMAP_SCAN's category).
    Probed once per process, on a page of ckpt's own at a low address, so that only the first
    record of /proc/self/smaps is made (~0.2 ms, not a walk of all of ckpt's own mappings). Call it
    before a freeze (dump.py does): inside one, read_guards would probe there."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    int_ = ctypes.c_int
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, int_, int_, int_, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    flags = nr.MAP_PRIVATE | nr.MAP_ANONYMOUS | nr.MAP_FIXED_NOREPLACE
    at = libc.mmap(GUARD_PROBE_AT, 2 * page, nr.PROT_READ | nr.PROT_WRITE, flags, -1, 0)
    if at is None or at == ctypes.c_void_p(-1).value:
        return "scan"  # (the address is taken: no cheap probe)
    try:
        if at != GUARD_PROBE_AT:
            return "scan"  # a kernel that took MAP_FIXED_NOREPLACE for a hint
        if libc.madvise(at, page, nr.MADV_GUARD_INSTALL) != 0:
            return "none" if ctypes.get_errno() == errno.EINVAL else "scan"
        fd = os.open("/proc/self/smaps", os.O_RDONLY | os.O_CLOEXEC)
        try:
            first = os.read(fd, 4096).decode("ascii", "replace")
        finally:
            os.close(fd)
        head, _, rest = first.partition("-")
        if not head or int(head, 16) != at:
            return "scan"
        line = rest[rest.find("\nVmFlags:") :].split("\n", 2)[1:2]
        return "gu" if line and "gu" in line[0].split() else "scan"
    except (OSError, ValueError):
        return "scan"
    finally:
        libc.munmap(at, 2 * page)


def _may_guard(flags: str | None) -> bool:
    """A mapping smaps marks "gu", or one it did not show (scanned rather than trusted)."""
    return flags is None or ("gu" in flags and "gu" in flags.split())  # (the substring first: ~0.5 us)


def read_guards(pid: int, vmas: list[Vma], flags: Mapping[int, str] | None = None) -> list[list[int]]:
    """Guard regions (MADV_GUARD_INSTALL) in the mappings; none found on a kernel without the
    PAGEMAP_SCAN category, which also has no way to show them. ``flags``: smaps' VmFlags of the
    same mappings, read in the same freeze: where the kernel marks the mappings that may hold
    guards (guard_flag), only those are scanned, which most processes have none of (a walk of every
    page table less in the freeze: ~0.1 ms for a small process, ~0.4 ms at 256 MiB)."""
    kind = guard_flag() if flags is not None else "scan"
    if kind == "none":
        return []
    ours = [v for v in vmas if not v.is_special]
    if kind == "gu" and flags is not None:
        ours = [v for v in ours if _may_guard(flags.get(v.start))]
        spans = [(v.start, v.end) for v in ours]
    else:
        spans = [(ours[0].start, ours[-1].end)] if ours else []  # one walk over all
    if not spans:
        return []
    try:
        with PagemapScanner(pid) as s:
            r = [g for a, b in spans for g in s.regions(a, b, category_anyof_mask=PAGE_IS_GUARD)]
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTTY):  # no PAGEMAP_SCAN (< 6.7) or no guard category
            return []
        raise
    out: list[list[int]] = []
    for a, b, _ in r:
        if out and out[-1][1] == a:
            out[-1][1] = b  # (adjacent mappings' runs as one, as the whole walk reports them)
        else:
            out.append([a, b])
    return out


def rseq_config(tid: int) -> tuple[int, int, int] | None:
    known = raw.known_rseq(tid)  # (Frozen.read_threads')
    if isinstance(known, bytes):
        data = known
    elif known in (errno.EIO, errno.EINVAL):  # a kernel before 5.13: no rseq to see
        return None
    else:  # (not read there, or failed otherwise: asked here, where the error is told)
        buf = char_buffer(RSEQ_CONFIG.size)
        try:
            raw.call(PTRACE_GET_RSEQ_CONFIGURATION, tid, RSEQ_CONFIG.size, ctypes.addressof(buf))
        except OSError as e:
            if e.errno in (errno.EIO, errno.EINVAL):
                return None
            raise
        data = buf.raw
    addr, size, sig, _, _ = RSEQ_CONFIG.unpack(data)
    return (addr, size, sig) if addr else None


def _failed(what: str, where: str, r: int) -> TargetError:
    return TargetError(f"{what} in {where} failed: {os.strerror(-r)}")


def _itimers(pid: int, ans: Answers) -> list[list[int]]:
    out = []
    for which in range(3):
        r = ans[("getitimer", which)]
        if r.ret < 0:
            raise _failed(f"getitimer({which})", f"process {pid}", r.ret)
        isec, iusec, vsec, vusec = ITIMERVAL.unpack(r.data)
        out.append([vsec * 1_000_000 + vusec, isec * 1_000_000 + iusec])
    return out


def _timer_times(pid: int, timers: list[dict[str, Any]], ans: Answers) -> None:
    for t in timers:
        r = ans[("timer_gettime", t["id"])]
        if r.ret < 0:
            raise _failed(f"timer_gettime({t['id']})", f"process {pid}", r.ret)
        isec, insec, vsec, vnsec = ITIMERSPEC.unpack(r.data)
        t["value_ns"] = vsec * 1_000_000_000 + vnsec
        t["interval_ns"] = isec * 1_000_000_000 + insec


def _membarrier(ans: Answers) -> int:
    return sum(register for cmd, register in MEMBARRIER_PRIVATE if ans[("membarrier", cmd)].ret == 0)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _robust_list(tid: int) -> list[int]:
    head, length = ctypes.c_void_p(), ctypes.c_size_t()
    r = _libc.syscall(GET_ROBUST_LIST, tid, ctypes.byref(head), ctypes.byref(length))
    if r < 0:
        raise TargetError(f"get_robust_list of thread {tid} failed: {os.strerror(ctypes.get_errno())}")
    return [head.value or 0, length.value]


def _prctl_int(ans: Answers, key: Hashable, where: str, what: str) -> int:
    r = ans[key]
    if r.ret < 0:
        raise _failed(f"prctl({what})", where, r.ret)
    return int.from_bytes(r.data, "little")


def _timerslack(pid: int, tid: int, ans: Answers) -> int:
    """The thread's timer slack as PR_GET_TIMERSLACK answered it; a negative answer (an error, or
    a slack above 2^63 that the long return cannot carry) is read from /proc instead."""
    r = ans.get(("timerslack", tid))
    return r.ret if r is not None and r.ret >= 0 else int(_read(f"/proc/{tid}/timerslack_ns", pid))


def _personalities(ans: Answers, tids: Sequence[int]) -> dict[int, int]:
    """personality() of each thread that answered it (the others: read from /proc)."""
    got = {tid: ans.get(("personality", tid)) for tid in tids}
    return {tid: r.ret for tid, r in got.items() if r is not None and r.ret >= 0}


def _thread_props(pid: int, tid: int, ans: Answers) -> dict[str, Any]:
    """sigaltstack, robust list, clear_child_tid, scheduling, timer slack, I/O priority."""
    r = ans[("sigaltstack", tid)]
    if r.ret < 0:
        raise _failed("sigaltstack", f"thread {tid}", r.ret)
    sp, flags, size = STACK_T.unpack(r.data)
    tid_address = _prctl_int(ans, ("tid_address", tid), f"thread {tid}", "PR_GET_TID_ADDRESS")
    # Per thread in the kernel; the main thread's is the process's (read_props).
    pdeath = 0 if tid == pid else _prctl_int(ans, ("pdeathsig", tid), f"thread {tid}", "PR_GET_PDEATHSIG")
    # The scheduling's and the robust list's syscalls as the freeze's grab made them (procgrab.c
    # 'T', beside the batch); made here where it has none.
    got = grab.take_sched(tid)
    try:
        slack = recorded_slack(tid, _timerslack(pid, tid, ans))
        if got is None:
            prio = _libc.syscall(IOPRIO_GET, IOPRIO_WHO_PROCESS, tid)
            policy, rt = os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority
            nice = os.getpriority(os.PRIO_PROCESS, tid)
            cpus = sorted(os.sched_getaffinity(tid))
            robust = _robust_list(tid)
        else:
            policy, rt, nice, prio, robust, cpus = got
        # Its own, not a migration's raise for the final freeze (ckpt/targetrt.py).
        policy, rt = recorded(tid, policy, rt)
    except ProcessLookupError:
        raise TargetExited(f"process {pid} exited") from None
    return {
        "sigaltstack": None if flags & SS_DISABLE else [sp, flags, size],
        "robust_list": robust,
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


def _prctl_state(ans: Answers) -> dict[str, int]:
    """Each PRCTL_STATE the kernel answers (a kernel or CPU without one: left out)."""
    out = {}
    for name, (_, _, _, by_ptr, _) in PRCTL_STATE.items():
        r = ans[("prctl", name)]
        if r.ret >= 0:
            out[name] = int.from_bytes(r.data[:4], "little", signed=True) if by_ptr else r.ret
    return out


KEYCTL, KEY_SPEC_THREAD_KEYRING, KEY_SPEC_PROCESS_KEYRING = 250, -1, -2


def _unrestorable(pid: int, tids: list[int], ans: Answers) -> list[str]:
    """What the process has that no restore gives back, found at dump (a restore would come back
    without it, silently): keyrings of its own."""
    out = []
    if ans[("keyring", "process")].ret >= 0:
        out.append(f"a process keyring (key {ans[('keyring', 'process')].ret}; keys are not dumped)")
    own = [t for t in tids if ans[("keyring", t)].ret >= 0]
    if own:  # one entry for them all: a layer keeps 64 (a process of many threads would fail the dump)
        more = f" and {len(own) - 8} more" if len(own) > 8 else ""
        out.append(f"a thread keyring in thread {', '.join(map(str, own[:8]))}{more} (keys are not dumped)")
    return out


# Namespaces a restore would silently replace by its own (the pid namespace: restore/pidns.py).
NS_TYPES = ("cgroup", "ipc", "mnt", "net", "time", "time_for_children", "user", "uts")


def _environment() -> list[int]:
    """ckpt, its ancestors and /proc/1 as ckpt sees it (the init of its pid namespace): the
    processes whose namespaces are the environment's. (An init of another user namespace, a VM's
    agent, may not let /proc/1/ns be read: ckpt's ancestors still tell where it was started from.)"""
    out, pid = [], os.getpid()
    for _ in range(64):  # bounded: a chain of parents is never that deep here
        out.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
    return [*out, 1]


def ns_inodes(pid: int) -> dict[str, int]:
    """The inode of each of the process's namespaces (NS_TYPES) by type; a kind the kernel lacks
    is left out. Read once per freeze: own_namespaces and the SEM_UNDO check (semundo.py) both
    compare them."""
    out = {}
    for t in NS_TYPES:
        # The link's text, "net:[4026531840]", names the inode stat() gives: at half its price (stat
        # finds the namespace's nsfs dentry; ~4 us against ~8 a kind here, nine kinds a freeze).
        with contextlib.suppress(FileNotFoundError):
            out[t] = int(procfs.readlink(f"/proc/{pid}/ns/{t}").rsplit("[", 1)[1].rstrip("]"))
    return out


def own_namespaces(pid: int, inodes: Mapping[str, int] | None = None) -> list[list[Any]]:
    """[type, inode] of each namespace of the process that is not the environment's (those of
    the dumping ckpt, its ancestors and /proc/1 as ckpt sees it): one it made (unshare, setns) or
    was put in (a container's), even when its parent shares it (a restore would silently come back
    in ckpt's). The environment's a restore elsewhere rightly replaces: a migration to another host
    or network namespace, from a ckpt run in the process's namespace (`nsenter --net ... ckpt
    migrate`) or from one run elsewhere (`ip netns exec ... ckpt migrate` of a process of the host's)."""
    env = environment_namespaces()
    inodes = ns_inodes(pid) if inodes is None else inodes
    out: list[list[Any]] = []
    for t in NS_TYPES:
        theirs = inodes.get(t)
        if theirs is None:
            continue  # a kernel without that kind
        if theirs not in env.get(t, ()):
            out.append([t, theirs])
    return out


@functools.cache
def environment_namespaces() -> dict[str, frozenset[int]]:
    """The environment's namespace inodes by type (_environment), read once per ckpt process:
    ckpt never changes its own namespaces, and the walk (~80 stats) stays out of every freeze
    (dump.py asks for it before freezing)."""
    env = _environment()
    out: dict[str, frozenset[int]] = {}
    for t in NS_TYPES:
        refs = set()
        for p in ("self", *env):
            with contextlib.suppress(OSError):
                refs.add(os.stat(f"/proc/{p}/ns/{t}").st_ino)
        out[t] = frozenset(refs)
    return out


def _mlockall(pid: int, ans: Answers) -> int:
    """MCL_FUTURE (and MCL_ONFAULT) as the probe page of ask() found them, 0, or -1: cannot tell."""
    mapped = ans[("mlockall", "mmap")].ret
    if mapped < 0:
        # Cannot tell: read_props makes that a refusal. (EAGAIN: over RLIMIT_MEMLOCK, which a
        # locked page would be, but so is a full mm; EEXIST: the spot was taken; a filter?)
        return -1
    if ans[("mlockall", "munmap")].ret < 0:
        raise _failed("munmap of the probe page", f"process {pid}", ans[("mlockall", "munmap")].ret)
    if ans[("mlockall", "madvise")].ret != -errno.EINVAL:
        return 0
    resident = ans[("mlockall", "mincore")].data[:1] not in (b"", b"\x00")
    return MCL_FUTURE | (0 if resident else MCL_ONFAULT)


MAP_FIXED_NOREPLACE, PAGE = 0x100000, 4096


def _probe_spot(vmas: Sequence[Vma] | None) -> int:
    """A page with a free page on either side (0: none found, or no maps), in the lowest gap: the
    probe cannot merge into a neighbour (whose flags and lock it would then share), nor meet
    batch()'s code mapping, placed at the top of the highest gap (freeze._lonely_spot)."""
    vs = sorted(vmas or (), key=lambda v: v.start)
    for lo, hi in itertools.pairwise(vs):
        if hi.start - lo.end >= 3 * PAGE and hi.path != "[stack]":  # not in its guard gap
            return lo.end + PAGE
    return 0


# ask()'s last questions and what they were made from: a process's dumps ask the same (the same
# threads, timers and probe spot), and ~30 calls made anew cost ~0.1 ms inside every freeze. The
# calls are frozen records: the same ones are safely added to each plan.
_asked: tuple[tuple[Any, ...], list[tuple[Hashable, Call, int | None]]] | None = None


def ask(plan: Plan, tids: list[int], timers: list[dict[str, Any]], vmas: Sequence[Vma] | None = None) -> None:
    """The questions read_props needs the process itself to answer, added to ``plan``. ``vmas``:
    the process's mappings, where the mlockall probe's page may go."""
    global _asked
    spot = _probe_spot(vmas)
    # (the leader's calls already in the plan: a Ref counts from the first of them)
    key = (tuple(tids), tuple(t["id"] for t in timers), spot, plan.count(None))
    last = _asked
    if last is None or last[0] != key:
        last = _asked = (key, _questions(tids, timers, spot, plan.count(None)))
    for k, call, tid in last[1]:
        plan.add(k, call, tid)


def _questions(
    tids: list[int], timers: list[dict[str, Any]], spot: int, base: int
) -> list[tuple[Hashable, Call, int | None]]:
    """ask()'s calls, in order, as (key, call, tid); ``base``: the leader's calls before them."""
    out: list[tuple[Hashable, Call, int | None]] = []
    n_lead = [0]

    def add(k: Hashable, call: Call, tid: int | None = None) -> None:
        out.append((k, call, tid))
        n_lead[0] += tid is None

    for t in timers:
        call = Call(TIMER_GETTIME, (t["id"], 0), out=ITIMERSPEC.size, out_arg=1)
        add(("timer_gettime", t["id"]), call)
    for cmd, _ in MEMBARRIER_PRIVATE:
        add(("membarrier", cmd), Call(MEMBARRIER, (cmd, 0, 0)))
    for which in range(3):
        add(("getitimer", which), Call(GETITIMER, (which, 0), out=ITIMERVAL.size, out_arg=1))
    add("pdeathsig", Call(PRCTL, (PR_GET_PDEATHSIG, 0), out=4, out_arg=1))
    add("subreaper", Call(PRCTL, (PR_GET_CHILD_SUBREAPER, 0), out=4, out_arg=1))
    for name, (sysno, opt, extra, by_ptr, _) in PRCTL_STATE.items():
        if by_ptr:
            add(("prctl", name), Call(sysno, (opt, 0, 0, 0, 0), out=4, out_arg=1))
        else:
            add(("prctl", name), Call(sysno, (opt, extra or 0, 0, 0, 0)))
    # mlockall(MCL_FUTURE) shows nowhere in /proc (it is the mm's def_flags): a page mapped now
    # tells. A locked mapping refuses MADV_DONTNEED (EINVAL), and is populated at once unless
    # MCL_ONFAULT; the page goes again in the same run. (A Ref counts the leader's calls: those
    # without a tid come first, see uffdwp's.)
    flags = 0x22 | (MAP_FIXED_NOREPLACE if spot else 0)  # PRIVATE|ANONYMOUS
    page = base + n_lead[0]
    add(("mlockall", "mmap"), Call(MMAP, (spot, 4096, 3, flags, -1, 0)))  # RW
    add(("mlockall", "mincore"), Call(MINCORE, (Ref(page), 4096, 0), out=1, out_arg=2))
    add(("mlockall", "madvise"), Call(MADVISE, (Ref(page), 4096, 4)))  # MADV_DONTNEED
    add(("mlockall", "munmap"), Call(MUNMAP, (Ref(page), 4096)))
    # Keyrings of its own (keyctl KEYCTL_GET_KEYRING_ID without creating: ENOKEY when none).
    add(("keyring", "process"), Call(KEYCTL, (0, KEY_SPEC_PROCESS_KEYRING, 0)))
    keyring = Call(KEYCTL, (0, KEY_SPEC_THREAD_KEYRING, 0))
    for tid in tids:
        add(("keyring", tid), keyring, tid)
    # Every thread asks the same calls, the very same objects: Frozen.batch compares the threads'
    # lists to write one copy of their code, and equal lists of the same objects compare at once.
    per_thread = (
        ("sigaltstack", Call(SIGALTSTACK, (0, 0), out=STACK_T.size, out_arg=1)),
        ("tid_address", Call(PRCTL, (PR_GET_TID_ADDRESS, 0), out=8, out_arg=1)),
        # Per thread in the kernel (the main thread's is the process's "pdeathsig" too).
        ("pdeathsig", Call(PRCTL, (PR_GET_PDEATHSIG, 0), out=4, out_arg=1)),
        # What /proc/PID/task/TID/personality and timerslack_ns show (the same fields of the
        # task), asked here: a file open less for each per thread in the freeze.
        ("personality", Call(PERSONALITY, (PERSONALITY_QUERY,))),
        # Its name (TASK_COMM_LEN bytes, NUL-padded): what its comm file and stat show.
        ("comm", Call(PRCTL, (PR_GET_NAME, 0), out=16, out_arg=1)),
        ("timerslack", Call(PRCTL, (PR_GET_TIMERSLACK,))),
    )
    for tid in tids:
        for name, call in per_thread:
            add((name, tid), call, tid)
    return out


def _loginuid(pid: int) -> int:
    """/proc/PID/loginuid, or -1 where the kernel has none (no audit support)."""
    text = read_text(f"/proc/{pid}/loginuid", pid, missing_ok=True)
    return -1 if text is None else int(text)


def read_props(
    fz: Frozen,
    pid: int,
    vmas: list[Vma],
    fds: list[int],
    ans: Answers | None = None,
    timers: list[dict[str, Any]] | None = None,
    status: Mapping[str, str] | None = None,
    vmflags: bool = True,
    fdinfo: Mapping[int, str] | None = None,
    cwd: str | None = None,
    comms: Mapping[int, str] | None = None,
    early: Mapping[int, Mapping[str, str | None]] | None = None,
    cloned_raw: Mapping[int, tuple[bytes, bytes]] | None = None,
) -> Props:
    """Everything above, for a frozen process. ``ans``: the answers to ask()'s questions, when the
    caller asked them together with its own (with the ``timers`` it asked about); else asked here.
    ``status``: read_status's, when the caller has it. ``vmflags`` False: the caller reads the
    VmFlags and guard regions itself (PageTableReads, beside the freeze); Props.vmflags and the
    record's "guards" are left empty for it. ``fdinfo``: list_fds' fdinfo texts of this freeze.
    ``cwd``: /proc/PID/cwd's link as the caller read it this freeze. ``comms``: each thread's name
    as the caller read it this freeze (proc.stat.read_state_comm). ``early``: the other threads'
    cloned state as proc.threads.read_cloned read it in this freeze. ``cloned_raw``: instead, their
    status and loginuid bytes as the grab read them in this freeze (proc.threads.take_cloned): where
    every other thread has them, a name and a personality answer, their parse and compare with the
    main thread's wait for the thaw (Props.finish: no /proc read is left in it). The record's keys
    that only parse the batch's answers and the texts read are added by Props.finish too: call it
    (after the thaw, or at once) before the record is used."""
    if status is None:
        status = read_status(pid)
    if ans is None or timers is None:
        timers = read_timers(pid)
        plan = Plan()
        ask(plan, fz.tids, timers, vmas)
        ans = plan.run(fz, vmas)
    try:
        oom = int(_read(f"/proc/{pid}/oom_score_adj", pid))
        loginuid = _loginuid(pid)
    except ValueError:
        raise TargetError(f"cannot parse oom_score_adj or loginuid of process {pid}") from None
    coredump = _read(f"/proc/{pid}/coredump_filter", pid)
    flags = read_vmflags(pid) if vmflags else {}
    # What is read of the process goes in now; what only parses the batch's answers and these
    # texts goes in at parse(), after the thaw where the caller thaws before calling Props.finish.
    record: dict[str, Any] = {
        "oom_score_adj": oom,
        "loginuid": loginuid & 0xFFFFFFFF,
        "thp_disabled": status.get("THP_enabled", "1").split()[:1] == ["0"],
        "locks": read_locks(pid, fds, fdinfo),
        "guards": read_guards(pid, vmas, flags) if vmflags else [],
    }
    ns = ns_inodes(pid)
    read_refusals = [r for r in (semundo_refusal(pid, ns.get("ipc")), cwd_refusal(pid, cwd)) if r]
    own = own_namespaces(pid, ns)
    own_ids = ids_of(pid, [t for t, _ in own]) if own else []  # (a restore inside them: nsid.py)
    tids = list(fz.tids)
    threads = {tid: _thread_props(pid, tid, ans) for tid in tids}
    personality = _personalities(ans, tids)
    rseq = {tid: rseq_config(tid) for tid in tids}
    answers, timed = ans, timers

    def parse() -> None:
        where = f"process {pid}"
        _timer_times(pid, timed, answers)
        prctl = _prctl_state(answers)
        mcl = _mlockall(pid, answers)
        if mcl > 0:
            prctl["mlockall"] = mcl  # (absent when unset: layers stay as they were)
        try:
            dump_filter = int(coredump, 16)
        except ValueError:
            raise TargetError(f"cannot parse coredump_filter of process {pid}") from None
        record.update(
            {
                "membarrier": _membarrier(answers),
                "itimers": _itimers(pid, answers),
                "timers": timed,
                "coredump_filter": dump_filter,
                "pdeathsig": _prctl_int(answers, "pdeathsig", where, "PR_GET_PDEATHSIG"),
                "subreaper": _prctl_int(answers, "subreaper", where, "PR_GET_CHILD_SUBREAPER") != 0,
                "prctl": prctl,
            }
        )
        refused = _unrestorable(pid, tids, answers)
        if mcl < 0:
            err = os.strerror(-answers[("mlockall", "mmap")].ret)
            refused.append(f"whether mlockall(MCL_FUTURE) is set cannot be told (a probe mmap failed: {err})")
        refused += read_refusals
        if refused:
            record["refused"] = refused
        if own:
            record["namespaces"] = own
            record["namespace_ids"] = own_ids

    others = [t for t in tids if t != pid]
    if (
        cloned_raw is not None
        and others
        and comms is not None
        and all(t in cloned_raw and t in personality and t in comms for t in others)
        and pid in comms
    ):
        # The main thread's own state read now (its loginuid file, frozen); the others' from the
        # grab's bytes after the thaw (~20 us a thread of the freeze less).
        main = main_state(pid, personality, status)
        raw, names = cloned_raw, comms

        def finish() -> None:
            parse()
            add_thread_state(pid, threads, names, personality, status, cloned_of(decoded(raw)), main=main)

        return Props(record, flags, rseq, threads, finish)
    add_thread_state(pid, threads, comms, personality, status, early)
    return Props(record, flags, rseq, threads, parse)


PTRACE_PEEKSIGINFO = 0x4209
PEEKSIGINFO_ARGS = struct.Struct("<QIi")  # off, flags, nr
PTRACE_PEEKSIGINFO_SHARED = 1
SIGINFO_SIZE = 128
PEEK_BATCH = 32
MAX_QUEUED = 1 << 16
# The buffers of rseq_config and queued_signals, made at import, not in a freeze (ckpt/cbuf.py).
warm(ctypes.c_char, RSEQ_CONFIG.size, SIGINFO_SIZE * PEEK_BATCH, PEEKSIGINFO_ARGS.size)


def queued_signals(tids: list[int]) -> list[dict[str, Any]]:
    """Signals waiting in the kernel's queues (blocked ones, typically), with their siginfo, in queue
    order: each thread's own queue, then the process's shared queue (given to the first thread: a
    restore sends them back to the process, where any thread may take them). PTRACE_PEEKSIGINFO
    reads them without taking them off."""
    out: list[dict[str, Any]] = []
    # One pair of buffers for every thread's queue (this runs inside every freeze).
    buf = char_buffer(SIGINFO_SIZE * PEEK_BATCH)
    args = char_buffer(PEEKSIGINFO_ARGS.size)
    for tid, flags in [(t, 0) for t in tids] + [(tids[0], PTRACE_PEEKSIGINFO_SHARED)] if tids else []:
        off = 0
        while off < MAX_QUEUED:
            PEEKSIGINFO_ARGS.pack_into(args, 0, off, flags, PEEK_BATCH)
            n = raw.call(PTRACE_PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(buf))
            got = buf.raw[: n * SIGINFO_SIZE] if n > 0 else b""
            for i in range(n):
                info = got[i * SIGINFO_SIZE : (i + 1) * SIGINFO_SIZE]
                sig = int.from_bytes(info[:4], "little")
                shared = flags == PTRACE_PEEKSIGINFO_SHARED
                out.append({"tid": tid, "sig": sig, "info": info, "shared": shared})
            if n < PEEK_BATCH:
                break
            off += n
    return out
