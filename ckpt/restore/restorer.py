"""restore_process(): one restore, from the checks to a running process (CRIU's cr-restore.c).

  1. plan: every check on the image and on this machine; nothing is started before it passes
     (the chunks' checksums excepted: each is checked as the fill reads it, before any of its
     pages is written; a bad one kills the helper like any later failure)
  2. helper: a tiny process, seized, with the dumped pid if it is free
  3. checks against the helper: vdso layout and contents, XSAVE size (still nothing changed)
  4. address space: gadget page, vdso parked, the helper's mappings gone, the dumped ones mapped
     (writable), filled, given their protections; the vdso moved to its dumped address
  5. VmFlags (madvise, mlock), guard regions, then every mapping's VmFlags checked against the dump
  6. with the process's groups, filesystem ids and capabilities (creds.py): every file opened (fds,
     exe, cwd) and file locks, so that a layer gets no file its process could not open; then mm
     fields and name, signal actions, umask and personality; THP disable, membarrier and rseq
     registrations, oom_score_adj, loginuid, interval and POSIX timers
  7. resource limits, then credentials (the last privileged step: a process dumped as an ordinary
     user is not restored as root), capabilities, no_new_privs, seccomp filters
     (every other thread is cloned before them and takes them too: threads.py)
  8. the gadget page unmapped (the last syscall), signal mask, FPU state, registers of every
     thread, pending signals sent again, detach

A failure anywhere kills the helper: there is never a half-restored process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ckpt import idlepoll
from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.image import STATE_DATA, MergedView
from ckpt.image.chain import require_consistent
from ckpt.image.format import PAGE_SIZE
from ckpt.proc import read_maps
from ckpt.proc.maps import Vma
from ckpt.restore import caller, cancel
from ckpt.restore.anonfds import restore_anonfds
from ckpt.restore.creds import Caps, enter_files
from ckpt.restore.files import restore_fds
from ckpt.restore.helper import CODE_OFFSET, PAUSE_SYSCALL, STUB_BASE, Helper, kill_helper, spawn_helper
from ckpt.restore.helperstart import plan_beside_helper
from ckpt.restore.jobstop import stop_as_dumped
from ckpt.restore.lastsched import LastSched
from ckpt.restore.layout import GADGET_PAGES, Areas, check_vdso_layout, choose_areas, vdso_group
from ckpt.restore.mapbatch import MapBatch
from ckpt.restore.memory import (
    FillWork,
    clear_helper,
    fill_pages,
    fill_work,
    install_gadget,
    map_vmas,
    place_vdso,
    protect,
)
from ckpt.restore.objects import Objects, create_objects, finish_objects
from ckpt.restore.pidns import drop_courier, refuse_nested
from ckpt.restore.pipes import restore_pipes
from ckpt.restore.plan import RestorePlan, VmaPlan, make_plan
from ckpt.restore.props import (
    set_after_identity,
    set_from_outside,
    set_loginuid,
    set_oom_score_adj,
    set_prctl_state,
    set_timers,
    set_vma_flags,
    take_locks,
    verify_vmflags,
)
from ckpt.restore.remote import Remote
from ckpt.restore.resume import in_tracer_thread, let_run, tracer_exits
from ckpt.restore.task import check_cpu, load_thread, open_exe, queue_signals, set_identity
from ckpt.restore.taskbatch import set_task_state
from ckpt.restore.tcp import TcpRestore
from ckpt.restore.threads import Threads, create_threads


@dataclass
class RestoredProcess:
    """A running restored process. It is a child of the caller, who must reap it (wait_status)."""

    pid: int
    dumped_pid: int
    pid_kept: bool
    note: str  # why the dumped pid was not kept, or ""
    pages_written: int
    mapped_bytes: int
    syscalls: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # The root of a restored tree: every process of it (dumped_pid, pid, ppid, zombie, note).
    tree: list[dict[str, Any]] = field(default_factory=list)
    # --pidns: the new namespace's init (our pid of it), the process to wait for; pids above are ours,
    # and each process has its dumped pid inside the namespace (restore/pidns.py).
    init_pid: int | None = None
    ns_pid: int | None = None  # --pidns: the root's pid inside the new namespace (1: it is the init)
    stopped: int = 0  # left in a job-control stop by this signal, as dumped (restore/jobstop.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_vdso_contents(remote: Remote, plan: RestorePlan, helper_vdso: list[Any]) -> None:
    """The dumped [vdso] pages the image holds must be the helper's: the same kernel build."""
    dumped = next((v for v in plan.vdso if v.path == "[vdso]"), None)
    mine = next((v for v in helper_vdso if v.path == "[vdso]"), None)
    if dumped is None or mine is None:
        return
    t = plan.table
    lo, hi = t.rows(dumped.start, dumped.end)
    for j in range(lo, hi):
        if t.state[j] != STATE_DATA:
            continue
        a = int(t.addr[j])
        theirs = plan.view.read(a, PAGE_SIZE)
        if remote.read(mine.start + (a - dumped.start), PAGE_SIZE) != theirs:
            raise RestoreError(
                "the vdso of this kernel differs from the dumped one: "
                "restore needs the kernel the process was dumped on"
            )


@dataclass
class Prepared:
    """A helper whose address space holds the dumped mappings and pages, still ptrace-stopped: the
    first half of a restore. A live migration keeps one between rounds (warm restore) and writes
    only the pages each round changed; `complete` makes it the process."""

    pid: int
    pid_note: str
    remote: Remote
    areas: Areas
    parked: list[Vma]
    writable: list[VmaPlan]
    pages_written: int
    timings: dict[str, float]
    t0: float
    caps: Caps  # the helper's own capabilities, given back by leave_files once every file is open
    objects: Objects = field(default_factory=Objects)  # memfds, deleted files, SysV segments made again

    def abandon(self) -> None:
        self.remote.close()
        kill_helper(self.pid)
        self.objects.abort()


def prepare(
    view: MergedView, plan: RestorePlan, *, helper: Helper | None = None, work: FillWork | None = None
) -> Prepared:
    """Helper, checks, mappings, pages: everything up to the first change of protection.
    `helper`: one already started (a process of a tree, forked from its parent's: restore/tree.py).
    `work`: the fill's work made beside the helper's start (memory.fill_work), else made here."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round((now - since) * 1e3, 3)
        return now

    if helper is None:
        refuse_nested(view)  # (a warm migration's helper: always in ckpt's pid namespace)
        helper = spawn_helper(plan.pid if plan.pid != caller.pid() else None)
    pid = helper.pid
    remote: Remote | None = None
    objs = Objects()
    try:
        remote = Remote(pid, STUB_BASE + CODE_OFFSET + PAUSE_SYSCALL)
        maps = read_maps(pid)
        hv = vdso_group(maps)
        check_vdso_layout(hv, plan.vdso)
        _check_vdso_contents(remote, plan, hv)
        check_cpu(pid, plan)
        areas = choose_areas(maps, list(view.vmas))
        t = lap("helper", t0)

        install_gadget(remote, areas)
        parked = clear_helper(remote, areas, hv)
        objs = create_objects(remote, plan)  # with ckpt's rights: owners and modes given back
        caps = enter_files(remote, plan)
        writable = map_vmas(remote, plan, objs)
        t = lap("map", t)
        fill = fill_pages(remote, view, plan, work)
        lap("fill", t)
        timings["fill_setup"] = fill.setup_ms  # (part of "fill")
    except BaseException as e:
        if remote is not None:
            remote.close()
        kill_helper(pid)
        objs.abort()
        if isinstance(e, OSError):
            raise RestoreError(f"restore failed: {e}") from None
        raise
    return Prepared(
        pid, helper.pid_note, remote, areas, parked, writable, fill.pages, timings, t0, caps, objs
    )


def complete(
    prep: Prepared,
    plan: RestorePlan,
    before_run: Callable[[int], None] | None = None,
    *,
    detach: bool = True,
    vmflags_done: bool = False,
    tcp_later: list[TcpRestore] | None = None,
    raised: bool = False,
) -> RestoredProcess:
    """Protections, vdso, mm, fds, signals, identity, registers; then let it run (unless `detach` is
    False: a tree lets all its processes go together). The helper is killed on any failure: there
    is never a half-restored process. `before_run(pid)` is the last word (a migration's commit): if
    it raises, the process is killed instead of let go. `raised`: the helper runs real-time (a
    migration's downtime): it stays so up to its last stop (restore/lastsched.py)."""
    remote, pid, timings = prep.remote, prep.pid, prep.timings
    last = LastSched(pid, plan.thread.props if raised else None)
    t = time.perf_counter()
    done = False
    threads: Threads | None = None
    tcp = TcpRestore(pid)
    try:
        batch = MapBatch(remote)  # the protections and the vdso's place: one run of injected code
        protect(batch, prep.writable)
        place_vdso(batch, prep.parked, plan, prep.areas)
        batch.run()
        if not vmflags_done:  # a warm helper had them set and checked before the downtime
            set_vma_flags(remote, plan)
            verify_vmflags(pid, plan)

        restore_fds(remote, plan, prep.objects, tcp)
        finish_objects(remote, plan, prep.objects)
        restore_pipes(remote, plan.pipes, {f.fd for f in plan.fds})
        restore_anonfds(remote, plan.anon, {f.fd: f.record for f in plan.fds}, {f.fd for f in plan.fds})
        exe_fd = open_exe(remote, plan)  # after the fds: its number must not be one of theirs
        take_locks(remote, plan)  # (on the fds, before the chdir as well as after)
        # The chdir, leave_files' capset, mm, signal actions, umask, personality, the task's
        # props and the main thread's own state: one run of injected code (taskbatch.py).
        set_task_state(remote, plan, exe_fd, prep.caps)
        set_prctl_state(remote, plan)
        if plan.props is not None:
            set_oom_score_adj(pid, plan.props)
            set_loginuid(remote, pid, plan.props)
        threads = create_threads(remote, pid, plan)
        set_timers(remote, pid, plan, threads.tids)
        set_identity(remote, pid, plan)
        threads.set_identity(plan)
        set_after_identity(remote, plan)
        drop_courier(remote)  # (--pidns, a namespace's init restored as the root: restore/pidns.py)
        remote.check(
            "unmapping the restore's own page", nr.MUNMAP, prep.areas.gadget, GADGET_PAGES * PAGE_SIZE
        )
        load_thread(pid, plan)
        threads.load()
        queue_signals(pid, plan, threads.tids)
        stopped, stop_notes = stop_as_dumped(pid, plan)  # a job-control stop (restore/jobstop.py)
        set_from_outside(pid, plan)
        threads.set_from_outside()
        last.raise_again()
        cancel.check()  # a Ctrl-C meanwhile: killed below, never let go (restore/cancel.py)
        if before_run is not None:
            before_run(pid)
        if tcp_later is not None:  # a tree: finished with every other process's (restore/tree.py)
            tcp_later.append(tcp.later())
        else:
            tcp.finish()  # out of repair mode, and the network lock lifted
        threads.detach()
        if detach:
            let_run(pid, plan.thread.regs, last.give_back)  # back inside its syscall, if it was in one
        done = True
        timings["finish"] = round((time.perf_counter() - t) * 1e3, 3)
        timings["total"] = round((time.perf_counter() - prep.t0) * 1e3, 3)
        if last.note:
            plan.warnings.append(last.note)
    except OSError as e:
        raise RestoreError(f"restore failed: {e}") from None
    finally:
        remote.close()
        if threads is not None:
            threads.close()
        if not done:
            kill_helper(pid)
            prep.objects.abort()
        tcp.close()
    stop_notes += tcp.notes  # (printed with the rest of the warnings)
    return RestoredProcess(
        pid=pid,
        dumped_pid=plan.pid,
        pid_kept=pid == plan.pid,
        note=prep.pid_note,
        pages_written=prep.pages_written,
        mapped_bytes=plan.mapped_bytes,
        syscalls=remote.count + (threads.syscalls if threads is not None else 0),
        timings_ms=timings,
        warnings=list(plan.warnings) + (threads.notes if threads is not None else []) + stop_notes,
        stopped=stopped,
    )


def restore_process(
    view: MergedView,
    *,
    plan: RestorePlan | None = None,
    inherit_fds: dict[str, int] | None = None,
    before_run: Callable[[int], None] | None = None,
    pidns: bool = False,
    new_pids: bool = False,
) -> RestoredProcess:
    """Rebuild the process of `view` and leave it running; raises Unsupported / RestoreError.
    Run in a thread that ends before this returns: its threads are let go inside their syscalls.
    `pidns`: into a new pid namespace, with the dumped pids (restore/pidns.py). `new_pids`: a tree
    child whose pid is in use gets another (else refused: restore/pidheld.py)."""
    if not tracer_exits():
        return in_tracer_thread(
            lambda: restore_process(
                view, plan=plan, inherit_fds=inherit_fds, before_run=before_run, pidns=pidns,
                new_pids=new_pids,
            )
        )
    t0 = time.perf_counter()
    # The restore's hand-offs (forks, ptrace stops, the helper's replies) each wake a CPU: idle
    # ones poll meanwhile instead of halting (idlepoll.py; measured in docs/benchmarks.md).
    with idlepoll.polling():
        return _restore_process(view, t0, plan, inherit_fds, before_run, pidns, new_pids)


def _restore_process(
    view: MergedView,
    t0: float,
    plan: RestorePlan | None,
    inherit_fds: dict[str, int] | None,
    before_run: Callable[[int], None] | None,
    pidns: bool,
    new_pids: bool,
) -> RestoredProcess:
    require_consistent(view, "restore")
    tree = view.top.tree
    if tree is not None and len(tree.processes) > 1:
        # (a `ckpt service`: each process of a tree is forked from its parent's, in the service)
        caller.not_served("a process tree")
        from ckpt.restore.tree import restore_tree

        return restore_tree(
            view, inherit_fds=inherit_fds, before_run=before_run, pidns=pidns, new_pids=new_pids
        )
    if pidns:
        caller.not_served("--pidns")  # (the service sends it back before: service.py served())
        from ckpt.restore.pidrestore import restore_alone

        return restore_alone(view, t0, plan=plan, inherit_fds=inherit_fds, before_run=before_run)
    refuse_nested(view)
    return restore_one(view, t0, plan=plan, inherit_fds=inherit_fds, before_run=before_run)


def restore_one(
    view: MergedView,
    t0: float,
    *,
    plan: RestorePlan | None = None,
    inherit_fds: dict[str, int] | None = None,
    before_run: Callable[[int], None] | None = None,
    start_helper: Callable[[RestorePlan], Helper] | None = None,
) -> RestoredProcess:
    """One process (not a tree), from its plan to running: restore_process's tail, and --pidns's
    (pidrestore.py), whose `start_helper(plan)` gives the helper once the plan passed (forked in a
    new pid namespace); else the helper starts beside the plan (helperstart.py)."""
    for lay in view.layers[:64]:  # the layers MergedView keeps open (a deeper one would keep its fd)
        lay.prefetch()
    helper: Helper | None = None
    works: list[FillWork] = []
    if plan is None:
        # Not a pass over every chunk's checksum first: the fill checks each chunk (its stored
        # bytes and its pages) before writing any of its pages, and a failure there kills the
        # helper, so the result is the same refusal, for one read of the data instead of two
        # (the check pass was a quarter of a 1 GiB restore). Object contents are still checked.
        # The helper starts meanwhile (helperstart.py).
        # small: a small process's table in array.array columns, so that no numpy is imported.
        # The fill's work too (its file digests, the trusted pages' check, the jobs): it needs the
        # plan alone, and the helper's start is the longer of the two (~20 ms against ~10).
        def planned() -> RestorePlan:
            p = make_plan(view, check_data=False, inherit_fds=inherit_fds, small=True)
            works.append(fill_work(view, p))
            return p

        if start_helper is None:
            plan, helper = plan_beside_helper(planned, view.top.inventory.pid)
        else:
            plan = planned()
    check_ms = round((time.perf_counter() - t0) * 1e3, 3)
    if start_helper is not None:
        helper = start_helper(plan)
    work = works[0] if works else None
    prep = prepare(view, plan, helper=helper, work=work)
    prep.timings = {"check": check_ms, **prep.timings}
    if work is not None:
        prep.timings["fill_ahead"] = work.ms  # (part of "check": beside the helper's start)
    prep.t0 = t0
    return complete(prep, plan, before_run)
