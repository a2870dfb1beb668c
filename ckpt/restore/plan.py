"""Everything a restore checks before it changes anything: what the image holds, what this machine has.

`make_plan(view)` reads the merged view and the files it names and returns a RestorePlan: one
decision per mapping and per fd. It starts no process and writes nothing. What the restorer cannot
rebuild is collected and refused in one Unsupported error listing it all; an image that does not fit
this machine (another kernel, files changed, pages missing or corrupt) is a RestoreError.
"""

from __future__ import annotations

import itertools
import os
import resource
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ckpt import ranges
from ckpt.errors import CkptError, RestoreError, Unsupported
from ckpt.image import Layer, MergedView, PageTable
from ckpt.image.format import (
    PAGE_SIZE,
    FdRecord,
    FileId,
    LayerMeta,
    MmRecord,
    PropsRecord,
    SigactionRecord,
    TaskRecord,
    ThreadRecord,
    VmaRecord,
)
from ckpt.image.objects import ObjectRecord, check_contents, resolve_objects
from ckpt.image.sockets import InetListenRecord
from ckpt.image.tcp import TcpRecord
from ckpt.image.validate import MetaError, is_numpy
from ckpt.proc.task import RLIMITS, read_security
from ckpt.ptrace.regs import REG_NAMES
from ckpt.ptrace.seccomp import filter_problem
from ckpt.restore import nsmatch, planobjects, plansockets, plantcp
from ckpt.restore.anonfds import AnonPlan, plan_anonfds
from ckpt.restore.openflags import reopen_flags
from ckpt.restore.pipes import PIPE_KINDS, PipePlan, plan_pipes
from ckpt.restore.restarts import resolve_restarts
from ckpt.restore.thread_checks import thread_refusals, thread_warnings

TASK_SIZE = 0x7FFFFFFFF000  # x86_64, 4-level paging: the highest user address + 1
VDSO_NAMES = ("[vvar]", "[vvar_vclock]", "[vdso]")
KERNEL_NAMES = ("[vsyscall]",)  # the kernel's own, the same in every process: nothing to do
# Character devices without state worth keeping: reopened by path.
STATELESS_CHR = frozenset({"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"})
# fdinfo shows f_flags; these only mattered when the file was opened and must not be replayed.
USER_CS, USER_SS = 0x33, 0x2B
PATH_MAX = 4096
RLIM_INFINITY = (1 << 64) - 1
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
# smaps VmFlags a restore gives back: by how it maps (rd wr ex sh mr mw me ms gd nr), by madvise
# (rr sr dc mg hg nh dd wf, and gu: guard regions installed) or mlock (lo lf); restore/props.py.
RESTORED_VMFLAGS = frozenset((
    "rd", "wr", "ex", "sh", "mr", "mw", "me", "ms", "gd", "nr", "lo", "lf", "gu",
    "rr", "sr", "dc", "mg", "hg", "nh", "dd", "wf",
))  # fmt: skip
# Not compared after a restore: VM_ACCOUNT (commit accounting; a read-only mapping made writable for
# its fill keeps it), userfaultfd registrations (ckpt's own tracker's; a process's own userfaultfd is
# refused as an fd), soft-dirty (tracking state).
IGNORED_VMFLAGS = frozenset(["ac", "um", "uw", "ui", "sd"])
VMFLAG_NAMES = {
    "ht": "a hugetlb mapping", "sf": "MAP_SYNC", "ss": "a shadow stack", "sl": "sealed (mseal)",
    "de": "VM_DONTEXPAND", "io": "an I/O mapping", "pf": "a PFN mapping", "mm": "a mixed map",
    "dw": "deny-write", "mt": "memory tagging", "bt": "branch target identification",
}  # fmt: skip
SHARED_ANON_PATHS = ("/dev/zero (deleted)",)  # MAP_SHARED|MAP_ANONYMOUS and MAP_SHARED of /dev/zero
AUXV_MAX = 52 * 8  # sizeof(mm->saved_auxv) on x86_64: 2 * (AT_VECTOR_SIZE_ARCH 3 + BASE 22 + 1) words


@dataclass
class VmaPlan:
    """How one dumped mapping is rebuilt.

    kind: "anon"   anonymous private memory, filled from the image
          "file"   the original file mapped again (unchanged since the dump); pages the process had
                   changed are written over it
          "shared" the original file mapped again MAP_SHARED; its contents are the file's
          "copy"   a private file mapping whose file changed: anonymous memory holding every page
                   from the image (allowed only when the image has them all)
          "shm"    shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, or /dev/zero shared): a new
                   shared anonymous object per dumped one (inode), each mapping of it at its offset
          "obj"    a shared mapping of a memfd or a deleted file: the object recreated from the layer
                   (restore/objects.py) and mapped MAP_SHARED; its pages are the object's
          "objpriv" a private mapping of one: mapped MAP_PRIVATE, the process's pages written over
          "sysv"   an attached SysV segment: recreated, attached with shmat at its address
    """

    vma: VmaRecord
    kind: str
    prot: int
    growsdown: bool = False
    anon_name: str | None = None  # "[anon:NAME]" given back with PR_SET_VMA_ANON_NAME
    fill: bool = True  # has pages in the image (false for mappings that could not be read)
    # Not readable (PROT_NONE...): filled through /proc/PID/mem as mapped, never made writable for the
    # fill, which would charge commit for every page of a possibly huge reservation.
    direct: bool = False
    noreserve: bool = False  # MAP_NORESERVE (VmFlags "nr")
    obj: int = -1  # kinds obj, objpriv, sysv: the index of its object in RestorePlan.objects


@dataclass
class FdPlan:
    fd: int
    action: str  # "open": reopen path at fd with flags and pos | "inherit": keep ckpt restore's own
    record: FdRecord
    flags: int = 0
    obj: int = -1  # action "object": a new open of object `obj` (restore/objects.py)
    path: str = ""  # opened from this path instead of the record's (a namespace: /proc/self/ns/TYPE)


def _bad_dups(plans: list[FdPlan]) -> list[str]:
    """A dup_of (untrusted) names a lower fd of the same open file, reopened as this one is (the
    restore dup3()s it): anything else would make the fd another file, or a socket, silently."""
    by_fd = {p.fd: p for p in plans}
    out = []
    for p in plans:
        rec = p.record
        if rec.dup_of < 0:
            continue
        src = by_fd.get(rec.dup_of)
        if (
            src is None
            or not rec.dup_of < rec.fd
            or p.action not in ("open", "object")
            or src.action != p.action
            or (src.record.kind, src.record.dev, src.record.ino) != (rec.kind, rec.dev, rec.ino)
        ):
            out.append(
                f"fd {rec.fd} ({rec.path}): a dup of fd {rec.dup_of}, which is not the same file restored"
            )
    return out


@dataclass
class RestorePlan:
    view: MergedView
    pid: int
    comm: str
    kernel: str
    vmas: list[VmaPlan]
    vdso: list[VmaRecord]  # [vvar], [vvar_vclock], [vdso] as dumped, ascending
    fds: list[FdPlan]
    close_fds: list[int]  # of 0..2, those the process did not have open
    thread: ThreadRecord
    sigactions: list[SigactionRecord]
    mm: MmRecord
    task: TaskRecord
    exe_ok: bool  # the executable is the dumped one: /proc/PID/exe may point at it again
    table: PageTable
    props: PropsRecord | None = None  # None: a version-1 layer, which did not record them
    warnings: list[str] = field(default_factory=list)
    threads: list[ThreadRecord] = field(default_factory=list)  # the others than `thread`, by tid

    pipes: list[PipePlan] = field(default_factory=list)  # pipes and FIFOs (restore/pipes.py)
    anon: AnonPlan = field(default_factory=AnonPlan)  # eventfd, timerfd... (restore/anonfds.py)
    objects: list[ObjectRecord] = field(default_factory=list)
    inet_listen: list[InetListenRecord] = field(default_factory=list)
    tcp_established: list[TcpRecord] = field(default_factory=list)  # restore/tcp.py
    # A tree's objects used by several of its processes, made once by ckpt: index in `objects` ->
    # ckpt's fd of it, which the helper takes instead of making its own (restore/treeobjects.py);
    # for a SysV segment, its shmid, which the helper attaches.
    shared_objects: dict[int, int] = field(default_factory=dict)
    # Likewise shared anonymous memory several processes map: (dev, inode) -> ckpt's fd of it.
    shared_shm: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def mapped_bytes(self) -> int:
        return sum(p.vma.end - p.vma.start for p in self.vmas)


def prot_of(perms: str) -> int:
    return (1 if perms[0] == "r" else 0) | (2 if perms[1] == "w" else 0) | (4 if perms[2] == "x" else 0)


def _stat_id(path: str) -> FileId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileId.of(st) if stat.S_ISREG(st.st_mode) else None


class _Checker:
    """The checks, on a layer chain (`view`) or on the metadata of a layer not yet written (`top`
    a LayerMeta, at dump time: then whatever needs the chain's pages is left out)."""

    def __init__(
        self,
        top: Layer | LayerMeta,
        view: MergedView | None = None,
        inherit: dict[str, int] | None = None,
        in_tree: bool = False,
        machine: Machine | None = None,
    ) -> None:
        self.view = view
        self.top = top
        self.machine = machine if machine is not None else Machine()
        self.inherit = inherit or {}
        self.pipes: list[PipePlan] = []
        # A process of a tree dump: its children are restored with it (ckpt/restore/tree.py).
        self.in_tree = in_tree or top.tree is not None
        self.anon = AnonPlan()
        self.unsupported: list[str] = []  # resources the restorer cannot rebuild (Unsupported)
        self.problems: list[str] = []  # the image does not fit this machine (RestoreError)
        self.warnings: list[str] = []
        self._ids: dict[str, FileId | None] = {}
        self.other_threads: list[ThreadRecord] = []  # every thread but the main one, by tid
        self.objects: list[ObjectRecord] = (
            resolve_objects(view.layers) if view is not None else list(getattr(top, "objects", []))
        )
        self.inet_listen = list((top.meta if isinstance(top, Layer) else top).inet_listen)
        self.tcp_established = list((top.meta if isinstance(top, Layer) else top).tcp_established)
        self.live = not (top.meta if isinstance(top, Layer) else top).inventory.consistent

    def file_id(self, path: str) -> FileId | None:
        if path not in self._ids:
            self._ids[path] = _stat_id(path)
        return self._ids[path]

    # -- process ------------------------------------------------------------------------------------
    def check_process(self) -> ThreadRecord | None:
        inv = self.top.inventory
        here = os.uname()
        if inv.arch != here.machine or here.machine != "x86_64":
            self.problems.append(f"the image is of a {inv.arch} process; this machine is {here.machine}")
        if inv.kernel != here.release:
            # The vdso (code the process may be inside of) and its data pages belong to one kernel build.
            self.problems.append(
                f"the image was dumped on kernel {inv.kernel}, this is {here.release}: "
                "restore needs the same kernel (the vdso must match)"
            )
        threads = self.top.threads
        t = next((th for th in threads if th.tid == inv.pid), None)
        if t is None:
            self.unsupported.append(f"the main thread {inv.pid} had exited (other threads ran on)")
            return None
        self.other_threads = sorted((th for th in threads if th.tid != inv.pid), key=lambda th: th.tid)
        for th in [t, *self.other_threads]:
            missing = set(REG_NAMES) - set(th.regs)
            if missing:
                self.problems.append(
                    f"thread {th.tid}: registers missing from the image: {', '.join(sorted(missing))}"
                )
            elif th.regs["cs"] != USER_CS or th.regs["ss"] != USER_SS:
                self.unsupported.append(f"thread {th.tid} runs in 32-bit mode (cs {th.regs['cs']:#x})")
        self.unsupported.extend(thread_refusals(t, self.other_threads))
        self.warnings.extend(thread_warnings(self.other_threads))
        return t

    # -- memory ---------------------------------------------------------------------------------------
    def check_vmas(self, table: PageTable | None, mm: MmRecord) -> tuple[list[VmaPlan], list[VmaRecord]]:
        """`table`: the chain's pages; None at dump time (the layer being written holds them all)."""
        plans: list[VmaPlan] = []
        vdso: list[VmaRecord] = []
        for v in self.top.vmas:
            where = f"mapping {v.path or '[anon]'} [{v.start:#x}-{v.end:#x}) {v.perms}"
            if v.path in VDSO_NAMES:
                vdso.append(v)
                continue
            if v.path in KERNEL_NAMES:
                continue
            if v.status == "skipped":
                self.unsupported.append(f"{where} (a special mapping)")
                continue
            if v.end > TASK_SIZE:
                self.problems.append(f"{where} is above user space")
                continue
            readable = v.perms[0] == "r"
            if v.status == "unreadable" and readable:
                self.problems.append(f"{where}: its pages could not be read at dump time")
                continue
            self.check_vmflags(v, where)
            plan = self._vma_plan(v, where, table, mm)
            if plan is not None:
                plan.fill = v.status == "dumped" and plan.kind not in ("obj", "sysv")
                # Shared anonymous memory is filled through a writable mapping of its object.
                plan.direct = plan.fill and not readable and plan.kind not in ("shared", "shm")
                plan.noreserve = "nr" in v.flag_set
                plans.append(plan)
        return plans, vdso

    def check_vmflags(self, v: VmaRecord, where: str) -> None:
        other = v.flag_set - RESTORED_VMFLAGS - IGNORED_VMFLAGS
        if other:
            what = ", ".join(VMFLAG_NAMES.get(f, f"VmFlags {f!r}") for f in sorted(other))
            self.unsupported.append(f"{where} ({what})")

    def _vma_plan(self, v: VmaRecord, where: str, table: PageTable | None, mm: MmRecord) -> VmaPlan | None:
        prot = prot_of(v.perms)
        path = v.path
        if v.perms[3] == "s":
            if path in SHARED_ANON_PATHS:
                return VmaPlan(v, "shm", prot)
            if planobjects.object_backed(path):
                return planobjects.vma_plan(self, v, where, prot)
            if v.anonymous or not path.startswith("/"):
                self.unsupported.append(f"{where} (shared anonymous memory)")
            elif path.startswith("/memfd:"):
                self.unsupported.append(f"{where} (shared memfd)")
            elif v.file is None or self.file_id(path) != v.file:
                self.unsupported.append(f"{where} (a shared mapping of a file that changed since the dump)")
            else:
                return VmaPlan(v, "shared", prot)
            return None
        if v.anonymous:
            name = None
            if path.startswith("[anon:") and path.endswith("]"):
                name = path[6:-1]
            elif path not in ("", "[heap]", "[stack]") and not path.startswith("/dev/zero"):
                self.unsupported.append(f"{where} (a special mapping)")
                return None
            if v.flags is not None:
                grows = "gd" in v.flag_set
            else:  # a version-1 layer: only the stack can be known to grow down
                grows = v.start <= mm.start_stack < v.end or path == "[stack]"
            return VmaPlan(v, "anon", prot, growsdown=grows, anon_name=name)
        if path.startswith("/") and v.file is not None and self.file_id(path) == v.file:
            return VmaPlan(v, "file", prot)
        if planobjects.object_backed(path) and planobjects.private_ok(self, v):
            return planobjects.vma_plan(self, v, where, prot)
        # The file is gone or changed: only the image can give the pages, so it must have them all.
        # (Not for a mapping the process cannot read, such as the PROT_NONE gap the loader leaves
        # inside a library: its untouched pages become zeros, which nothing could read anyway without
        # an mprotect first.)
        if table is not None and v.status == "dumped" and v.perms[0] == "r":
            missing = v.npages - table.present_in(v.start, v.end)
            if missing:
                self.problems.append(
                    f"{where}: its file changed since the dump and {missing} of its pages are missing"
                )
                return None
        return VmaPlan(v, "copy", prot)

    def check_vdso(self, vdso: list[VmaRecord]) -> None:
        names = [v.path for v in vdso]
        if names and ("[vdso]" not in names or "[vvar]" not in names):
            self.unsupported.append(f"a partial vdso ({', '.join(names)})")
        for a, b in itertools.pairwise(vdso):
            if a.end != b.start:
                self.unsupported.append("a vdso whose parts are not contiguous")
                break

    # -- mm fields ------------------------------------------------------------------------------------
    def check_mm(self, mm: MmRecord) -> bool:
        pairs = (
            ("start_code", mm.start_code, "end_code", mm.end_code, False),
            ("start_data", mm.start_data, "end_data", mm.end_data, True),
            ("start_brk", mm.start_brk, "brk", mm.brk, True),
            ("arg_start", mm.arg_start, "arg_end", mm.arg_end, True),
            ("env_start", mm.env_start, "env_end", mm.env_end, True),
        )
        for n1, a, n2, b, eq in pairs:
            if not (a <= b if eq else a < b):
                self.problems.append(f"mm: {n1} {a:#x} is not below {n2} {b:#x}")
        for name in (
            "start_code",
            "end_code",
            "start_data",
            "end_data",
            "start_brk",
            "brk",
            "start_stack",
            "arg_start",
            "arg_end",
            "env_start",
            "env_end",
        ):
            val = getattr(mm, name)
            if not PAGE_SIZE <= val < TASK_SIZE:
                self.problems.append(f"mm: {name} {val:#x} is outside user space")
        if len(mm.auxv) % 16 or len(mm.auxv) > AUXV_MAX:
            self.problems.append(f"mm: auxv of {len(mm.auxv)} bytes (at most {AUXV_MAX}, in 16-byte pairs)")
        if mm.root not in ("/", ""):
            self.unsupported.append(f"a changed root directory ({mm.root})")
        # (From format 8 the dump refuses a literal name itself: ckpt/proc/cwdname.py.)
        judged = self.top.inventory.version >= 8
        if mm.cwd.startswith("/") and mm.cwd.endswith(" (deleted)") and not judged and os.path.isdir(mm.cwd):
            self.unsupported.append(
                f"a working directory whose name ends in ' (deleted)' ({mm.cwd}): "
                "ckpt cannot tell it from a removed one"
            )
        elif mm.cwd.startswith("/") and mm.cwd.endswith(" (deleted)"):
            planobjects.check_deleted_cwd(self, mm.cwd)
        elif not mm.cwd.startswith("/"):
            self.problems.append(f"the working directory {mm.cwd!r} no longer exists")
        elif not os.path.isdir(mm.cwd):
            self.problems.append(f"the working directory {mm.cwd} no longer exists")
        exe_ok = bool(mm.exe) and mm.exe_file is not None and self.file_id(mm.exe) == mm.exe_file
        if not exe_ok:
            self.warnings.append(
                f"the executable {mm.exe or '?'} changed since the dump; /proc/PID/exe is not set"
            )
        return exe_ok

    # -- the task -------------------------------------------------------------------------------------
    def check_task(self, task: TaskRecord) -> None:
        if task.children and not self.in_tree:
            n = len(task.children)
            pids = ", ".join(str(c) for c in task.children[:8]) + (", ..." if n > 8 else "")
            what = f"{n} child processes (pids {pids})" if n > 1 else f"a child process (pid {pids})"
            self.unsupported.append(what)
        r, e, s, fs = task.uid
        if fs not in (r, e, s) and e != 0:
            # setresuid() sets the filesystem uid to the effective one and drops the capability that
            # setfsuid() would need to change it to anything else.
            self.unsupported.append(f"a filesystem uid ({fs}) that is not its real, effective or saved uid")
        nr_open = self.machine.sysctl("fs/nr_open", 1 << 20)
        nofile = task.rlimits.get("nofile")
        if nofile is not None and nofile[1] > nr_open:
            self.problems.append(
                f"its hard limit on open files ({_limit(nofile[1])}) is above fs.nr_open ({nr_open})"
            )
        if not self.machine.has_cap(CAP_SYS_RESOURCE):
            # A hard limit can only go up with CAP_SYS_RESOURCE; the helper starts with ours.
            for name, (_, hard) in sorted(task.rlimits.items()):
                mine = resource.getrlimit(RLIMITS[name])[1] & RLIM_INFINITY
                if hard > mine:
                    self.problems.append(
                        f"its hard limit on {name} ({_limit(hard)}) is above ckpt's ({_limit(mine)}), and "
                        "raising it needs CAP_SYS_RESOURCE"
                    )

    def check_security(self, task: TaskRecord) -> None:
        """Capabilities, no_new_privs, seccomp: given back exactly (restore/creds.py), or refused.
        Never more: a set this ckpt cannot reproduce (beyond its own) is a problem, not a warning."""
        sec = task.security
        if sec is None:
            if task.uid[1] == 0 or task.uid[3] == 0:
                self.unsupported.append(
                    "a root process in a format 1 layer, which does not record its capabilities, "
                    "no_new_privs or seccomp filters (restoring it could give it more than it had)"
                )
            else:
                self.warnings.append(
                    "a format 1 layer records no no_new_privs or seccomp state: restored without them"
                )
            return
        if sec.seccomp_mode == 1:
            self.unsupported.append("seccomp strict mode (SECCOMP_MODE_STRICT)")
        elif sec.seccomp_mode == 2 and sec.filters is None:
            self.unsupported.append(
                "seccomp filters that could not be read at dump time (needs CAP_SYS_ADMIN)"
            )
        for i, f in enumerate(sec.filters or []):
            why = filter_problem(f.prog, f.flags)
            if why:
                self.unsupported.append(
                    f"seccomp filter {i} (of {len(sec.filters or [])}, oldest first) {why}"
                )
        if sec.filters and not self.machine.has_cap(CAP_SYS_ADMIN):
            self.problems.append(
                "restoring seccomp filters needs CAP_SYS_ADMIN (to suspend them while restoring)"
            )
        last = self.machine.sysctl("kernel/cap_last_cap", 40)
        valid = (1 << (last + 1)) - 1
        named = {"permitted": sec.cap_prm, "effective": sec.cap_eff, "inheritable": sec.cap_inh,
                 "bounding": sec.cap_bnd, "ambient": sec.cap_amb}  # fmt: skip
        for name, mask in named.items():
            if mask & ~valid:
                self.problems.append(f"{name} capabilities {mask:#x} name capabilities this kernel lacks")
        if sec.cap_eff & ~sec.cap_prm or sec.cap_amb & ~(sec.cap_prm & sec.cap_inh):
            self.problems.append("its capability sets are inconsistent (effective or ambient not permitted)")
        mine = self.machine.own_caps()
        for name, theirs, ours in (
            ("permitted", sec.cap_prm, mine[0]),
            ("bounding", sec.cap_bnd, mine[1]),
        ):
            if theirs & ~ours:
                self.problems.append(
                    f"its {name} capabilities ({theirs:#x}) include some ckpt lacks ({theirs & ~ours:#x})"
                )

    # -- properties (ckpt/restore/props.py) ----------------------------------------------------------
    def check_props(self, props: PropsRecord | None, threads: list[ThreadRecord]) -> None:
        if props is None:
            self.warnings.append(
                "a version-1 layer: VmFlags, rseq, timers, locks, oom_score_adj, loginuid, THP and "
                "membarrier state were not recorded and are not restored"
            )
            return
        if props.pdeathsig:
            self.warnings.append(
                f"it has a parent-death signal ({props.pdeathsig}); its parent is now `ckpt restore`, "
                "so it gets that signal when ckpt restore --detach exits"
            )
        for lk in props.locks:
            if lk.kind in ("LEASE", "DELEG"):
                self.unsupported.append(f"a file lease on fd {lk.fd}")
        self.unsupported += props.refused
        ns_ids = dict(props.namespace_ids)
        for kind, ino in props.namespaces:
            if not nsmatch.restored_inside(kind, ns_ids.get(kind)):
                self.unsupported.append(nsmatch.refusal(kind, ino))
        pid = self.top.inventory.pid
        for t in props.timers:
            if t.notify == "thread":
                self.unsupported.append(f"POSIX timer {t.id} (SIGEV_THREAD)")
            elif t.tid and t.tid not in {th.tid for th in threads}:
                self.unsupported.append(f"POSIX timer {t.id} (signals thread {t.tid}, not of process {pid})")
            if t.clock < 0 and (~t.clock >> 3) not in (0, pid):
                self.unsupported.append(f"POSIX timer {t.id} (on another process's CPU clock)")
        if props.timers and not self.machine.timer_ids():
            self.problems.append(
                "POSIX timers need their ids back (prctl PR_TIMER_CREATE_RESTORE_IDS, Linux 6.17+)"
            )

    # -- fds ------------------------------------------------------------------------------------------
    def check_fds(self, fds: Iterable[FdRecord]) -> tuple[list[FdPlan], list[int]]:
        plans: list[FdPlan] = []
        seen: set[int] = set()
        fds = list(fds)
        pp = plan_pipes(fds, self.top.pipes, self.inherit, dumping=self.view is None)
        self.unsupported += pp.unsupported
        self.problems += pp.problems
        self.warnings += pp.warnings
        self.pipes = pp.pipes
        piped = pp.fds
        self.anon = plan_anonfds(
            fds, self.top.anonfds, dumping=self.view is None, dumped_boot=self.top.inventory.boot_id
        )
        self.unsupported += self.anon.unsupported
        self.problems += self.anon.problems
        made = self.anon.fds
        refused = self.anon.refused
        for f in sorted(fds, key=lambda f: f.fd):
            seen.add(f.fd)
            what = f"fd {f.fd} ({f.path})"
            if f.fd in piped:  # made by restore/pipes.py
                plans.append(FdPlan(f.fd, "pipe", f, reopen_flags(f.flags)))
            elif f.kind in PIPE_KINDS and (f.fd > 2 or f.kind == "fifo"):
                continue  # refused by plan_pipes, which said why
            elif f.fd in made:  # made by restore/anonfds.py
                plans.append(FdPlan(f.fd, "anon", f, reopen_flags(f.flags)))
            elif f.fd in refused:  # plan_anonfds said why
                continue
            elif f.kind in ("tty", "pipe") and f.fd <= 2:
                plans.append(FdPlan(f.fd, "inherit", f))
            elif plantcp.is_tcp(self, f):
                plans.append(plantcp.tcp_plan(self, f, reopen_flags(f.flags)))
            elif plantcp.left_to_final(self, f):
                continue
            elif planobjects.special_fd(f) or plansockets.is_listener(self, f):
                p = planobjects.fd_plan(self, f, what, reopen_flags(f.flags))
                if p is not None:
                    plans.append(p)
            elif f.kind in ("file", "dir"):
                if not f.path.startswith("/") or f.path.endswith(" (deleted)"):
                    self.unsupported.append(f"{what} (a deleted file)")
                    continue
                try:
                    st = os.stat(f.path)
                except OSError as e:
                    self.problems.append(f"{what}: the file cannot be found now ({e.strerror})")
                    continue
                if (st.st_dev, st.st_ino) != (f.dev, f.ino):
                    self.problems.append(f"{what}: the path now names another file")
                    continue
                plans.append(FdPlan(f.fd, "open", f, reopen_flags(f.flags)))
            elif f.kind == "chr" and f.path in STATELESS_CHR:
                plans.append(FdPlan(f.fd, "open", f, reopen_flags(f.flags)))
            else:
                kind = {
                    "tty": "a terminal",
                    "pipe": "a pipe",
                    "fifo": "a FIFO",
                    "socket": "a socket",
                    "anon": "an anonymous inode",
                    "memfd": "a memfd",
                    "chr": "a device",
                    "blk": "a block device",
                    "mqueue": f"a POSIX message queue {f.path}: queues and their messages are not restored",
                }.get(f.kind, f.kind)
                self.unsupported.append(
                    f"{what} ({kind}{' beyond stdin/stdout/stderr' if f.kind in ('tty', 'pipe') else ''})"
                )
        self.problems += _bad_dups(plans)
        return plans, [fd for fd in (0, 1, 2) if fd not in seen]

    # -- this machine's limits -----------------------------------------------------------------------
    def check_limits(self, plans: list[VmaPlan], fds: list[FdPlan], table: PageTable | None) -> None:
        """What would otherwise fail half-way: too many mappings, fd numbers, memory, long paths."""
        max_maps = self.machine.sysctl("vm/max_map_count", 65530)
        if len(plans) + 8 > max_maps:
            self.problems.append(f"{len(plans)} mappings, more than vm.max_map_count ({max_maps}) allows")
        min_addr = max(self.machine.sysctl("vm/mmap_min_addr", 65536), PAGE_SIZE)
        low = [p.vma for p in plans if p.vma.start < min_addr]
        if low:
            self.problems.append(f"a mapping at {low[0].start:#x}, below vm.mmap_min_addr ({min_addr:#x})")
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        high = [f.fd for f in fds if f.fd >= nofile]
        if high:
            self.problems.append(f"fd {high[0]} is above this process's limit on open files ({nofile})")
        for path in [p.vma.path for p in plans if p.kind in ("file", "shared")] + [
            f.record.path for f in fds
        ]:
            if len(os.fsencode(path)) >= PATH_MAX:
                self.problems.append(f"a path of {len(os.fsencode(path))} bytes (PATH_MAX is {PATH_MAX})")
                break
        if table is None:
            return
        # Filling more than the machine has would end in the OOM killer, perhaps not in our process.
        need = table.counts()["data"] * PAGE_SIZE
        avail = self.machine.mem_available()
        if avail is not None and need > avail:
            self.problems.append(
                f"the image holds {need / 2**30:.1f} GiB of pages, "
                f"but only {avail / 2**30:.1f} GiB of memory is available"
            )

    # -- page data ------------------------------------------------------------------------------------
    def check_chunks(self, table: PageTable) -> None:
        """Every chunk the restore will read: present, and its checksum right (decompression and the
        per-page digests are checked again as the pages are read)."""
        assert self.view is not None
        for k, layer in enumerate(self.view.layers):
            idx = table.data_indexes(k)
            if not len(idx):
                continue
            try:
                ch = layer.chunk_of(idx)
                # A big table's columns are numpy's: unique() there, not a Python loop per page. (A
                # small table's are lists or arrays: ranges.is_small() takes only an array, and
                # ranges.unique() of a list would import numpy into every small restore.)
                big = is_numpy(ch)
                layer.check_chunks([int(c) for c in ranges.unique(ch)] if big else sorted(set(ch)))
            finally:
                if k >= 64:  # MergedView keeps only the top 64 layers open; give the fd back
                    layer.close()


def _timer_ids_supported() -> bool:
    """Whether prctl(PR_TIMER_CREATE_RESTORE_IDS, GET) works here."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(77, 2, 0, 0, 0)) >= 0


def _limit(v: int) -> str:
    return "unlimited" if v == RLIM_INFINITY else str(v)


def _has_cap(cap: int) -> bool:
    """Whether this process has capability `cap` in its effective set."""
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("CapEff:"):
                    return bool(int(ln.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _own_caps() -> tuple[int, int]:
    """This process's permitted and bounding sets: what a helper it starts can hand on, at most."""
    try:
        s = read_security(os.getpid())
    except CkptError:
        return 0, 0
    return s.cap_prm, s.cap_bnd


class Machine:
    """What make_plan checks an image against besides the image: this machine's limits (sysctls,
    memory available, the kernel's last capability, timer ids) and this process's capabilities.
    Each is read on first use and kept. A migration's warm restore reads them all before the final
    round (`prefetch`, ~0.5 ms of /proc reads and parsing) and its final plan uses those, not a
    reading in the downtime: they are this machine's and ckpt's own, which the final layer does not
    change, taken a round earlier (a sysctl changed in between is the same race as one changed just
    after any check)."""

    SYSCTLS = (
        ("fs/nr_open", 1 << 20),
        ("kernel/cap_last_cap", 40),
        ("vm/max_map_count", 65530),
        ("vm/mmap_min_addr", 65536),
    )

    def __init__(self) -> None:
        self._got: dict[Any, Any] = {}

    def _get(self, key: Any, read: Callable[[], Any]) -> Any:
        if key not in self._got:
            self._got[key] = read()
        return self._got[key]

    def sysctl(self, name: str, default: int) -> int:
        return int(self._get(name, lambda: _read_int(f"/proc/sys/{name}", default)))

    def has_cap(self, cap: int) -> bool:
        return bool(self._get(("cap", cap), lambda: _has_cap(cap)))

    def own_caps(self) -> tuple[int, int]:
        return tuple(self._get("own_caps", lambda: _own_caps()))

    def mem_available(self) -> int | None:
        return self._get("mem", _meminfo_available)

    def timer_ids(self) -> bool:
        return bool(self._get("timer_ids", _timer_ids_supported))

    def prefetch(self) -> Machine:
        """Everything read now (what a plan may ask)."""
        for name, default in self.SYSCTLS:
            self.sysctl(name, default)
        for cap in (CAP_SYS_RESOURCE, CAP_SYS_ADMIN):
            self.has_cap(cap)
        self.own_caps()
        self.mem_available()
        self.timer_ids()
        return self


def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _meminfo_available() -> int | None:
    from ckpt.proc.meminfo import available

    return available(swap=True)


def make_plan(
    view: MergedView,
    *,
    check_data: bool = True,
    table: PageTable | None = None,
    inherit_fds: dict[str, int] | None = None,
    in_tree: bool = False,
    small: bool = False,
    machine: Machine | None = None,
) -> RestorePlan:
    """Check the image against this machine and decide how each part is rebuilt; no side effects.
    `table`: the view's page table when the caller has it already (a migration's warm restore keeps
    it up to date round by round; building it walks every page of the chain). `inherit_fds`:
    {"pipe:[INO]": fd of ours} (--inherit-fd) for pipes whose other end was outside the process.
    `small`: a small table may have array.array columns (chain.PageTable), which only a restore's
    fill reads; a caller that works on the table's columns with numpy leaves it false. `machine`:
    this machine's limits as read earlier (Machine), else read now."""
    c = _Checker(view.top, view, inherit_fds, in_tree, machine)
    top = view.top
    thread = c.check_process()
    if thread is not None:
        older = [layer.threads for layer in view.layers[1:]]
        fixed, notes = resolve_restarts([thread, *c.other_threads], older)
        thread, c.other_threads = fixed[0], fixed[1:]
        c.warnings.extend(notes)
    mm = top.mm
    if table is None:
        # The table kept beside the top layer, if it is this chain's: no walk of every layer.
        table = view.cached_table(small=small) or view.page_table(small=small)
    vmas, vdso = c.check_vmas(table, mm)
    c.check_vdso(vdso)
    exe_ok = c.check_mm(mm)
    c.check_task(top.task)
    c.check_security(top.task)
    c.check_props(top.props, top.threads)
    fds, close = c.check_fds(top.fds)
    c.check_limits(vmas, fds, table)
    pid = top.inventory.pid
    if c.unsupported:
        raise Unsupported(f"cannot restore pid {pid}: unsupported: {'; '.join(c.unsupported)}")
    if c.problems:
        raise RestoreError(f"cannot restore pid {pid}: {'; '.join(c.problems)}")
    try:
        for o in c.objects:  # not left to the fill as chunks are (check_data): objects are made first
            check_contents(o)
        if check_data:
            c.check_chunks(table)
    except (CkptError, MetaError) as e:
        raise RestoreError(f"cannot restore pid {pid}: {e}") from None
    assert thread is not None
    return RestorePlan(
        view=view,
        pid=pid,
        comm=top.inventory.comm,
        kernel=top.inventory.kernel,
        vmas=vmas,
        vdso=vdso,
        fds=fds,
        close_fds=close,
        thread=thread,
        sigactions=list(top.sigactions),
        mm=mm,
        task=top.task,
        exe_ok=exe_ok,
        table=table,
        props=top.props,
        warnings=c.warnings,
        threads=c.other_threads,
        pipes=c.pipes,
        anon=c.anon,
        objects=c.objects,
        inet_listen=list(top.meta.inet_listen),
        tcp_established=list(top.meta.tcp_established),
    )


def restore_refusals(meta: LayerMeta, *, in_tree: bool = False) -> list[str]:
    """Why a layer with this metadata could not be restored on this machine, from the checks of
    make_plan that need no pages: run by `dump` before it writes (and before --kill)."""
    c = _Checker(meta, in_tree=in_tree)
    c.check_process()
    vmas, vdso = c.check_vmas(None, meta.mm)
    c.check_vdso(vdso)
    c.check_mm(meta.mm)
    c.check_task(meta.task)
    c.check_security(meta.task)
    c.check_props(meta.props, meta.threads)
    fds, _ = c.check_fds(meta.fds)
    c.check_limits(vmas, fds, None)
    return [*(f"unsupported: {u}" for u in c.unsupported), *c.problems]
