"""Restore a process tree (CRIU's pstree restore): every process forked from its restored parent.

  1. the root's layer names every member's layer and digest (image/tree.py); each member's chain is
     opened and checked, the tree's own checks run (restore/treeplan.py), then each process's plan
  2. the root's helper is started as for one process; every other helper is forked from its
     parent's helper, parents first, by a clone3 injected into it (with the dumped pid in set_tid
     when it is free), so that each restored parent is the real parent of its children and can
     wait() for them. A forked helper runs the stub's pause loop, like the first, and is seized.
  3. right after its fork, a session leader calls setsid() and a group leader setpgid(0, 0), before
     its own children are forked (they inherit them); once all exist, a process in another group of
     its session joins it
  4. zombies: their helper exits with the dumped status (exit_group, or the signal sent to itself)
  5. each live helper becomes its process (restorer.prepare/complete), still stopped; sessions and
     groups are checked against the dump; then all are let go, children first
A failure anywhere kills every helper: there is never a half-restored tree.
"""

from __future__ import annotations

import fcntl
import os
import resource
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt.errors import ChainError, RestoreError, Unsupported
from ckpt.image import Layer, MergedView
from ckpt.image.chain import require_consistent
from ckpt.image.tree import TreeProc, TreeRecord
from ckpt.openas import open_as
from ckpt.proc.pipes import F_SETPIPE_SZ
from ckpt.proc.tree import read_ids
from ckpt.ptrace import raw
from ckpt.ptrace.regs import MASK64
from ckpt.restore import pidheld
from ckpt.restore.helper import (
    ARGS_AT,
    IN_USE,
    SIGACT_AT,
    SITE,
    TID_AT,
    Helper,
    _seize,
    kill_helper,
    spawn_helper,
)
from ckpt.restore.openflags import reopen_flags
from ckpt.restore.pidns import (
    PidNamespace,
    inner,
    inside_pids,
    outer_child,
    refuse_nested,
    require_kept,
    root_helper,
    root_notes,
)
from ckpt.restore.pipes import SETFL_MASK, PipePlan
from ckpt.restore.plan import RestorePlan, make_plan
from ckpt.restore.remote import Remote
from ckpt.restore.restorer import Prepared, RestoredProcess, complete, prepare
from ckpt.restore.resume import let_run
from ckpt.restore.tcp import TcpRestore, finish_all
from ckpt.restore.treeobjects import TreeObjects
from ckpt.restore.treeplan import TreePipe, tree_pipes, tree_refusals

SYS_RT_SIGACTION = 13
SYS_KILL = 62
SYS_SETPGID = 109
SYS_SETSID = 112
SYS_EXIT_GROUP = 231
SYS_CLONE3 = 435
CLONE_ARGS_SIZE_VER1 = 80  # up to set_tid_size
EXIT_TIMEOUT = 10.0


@dataclass
class _Member:
    proc: TreeProc
    helper: Helper
    view: MergedView | None = None
    plan: RestorePlan | None = None
    prep: Prepared | None = None
    restored: RestoredProcess | None = None


def open_members(view: MergedView, tree: TreeRecord) -> dict[int, MergedView]:
    base = Path(view.top.path).parent
    views: dict[int, MergedView] = {}
    try:
        for p in tree.processes[1:]:
            if p.layer is None:
                continue
            path = base / p.layer
            mv = MergedView(Layer.open(path))
            views[p.pid] = mv
            if mv.top.digest != p.digest:
                raise ChainError(
                    f"the layer of pid {p.pid} ({path}) is not the one the tree was dumped with "
                    "(its digest differs)"
                )
            if mv.top.inventory.pid != p.pid:
                raise ChainError(f"{path} is a dump of pid {mv.top.inventory.pid}, not of pid {p.pid}")
            require_consistent(mv, "restore")
    except BaseException:
        for mv in views.values():
            mv.close()
        raise
    return views


def _fork(parent: Remote, want: int, exit_signal: int, keep: tuple[int, int] | None = None) -> Helper:
    """A new helper forked from `parent` (a helper still running the stub), seized and stopped.
    `keep` (dumped pid, dumped parent): the pid must be kept, else the restore is refused, naming
    who holds it (restore/pidheld.py); without, another pid is noted."""
    note = ""
    pid = -1
    for set_tid in (want, 0):
        args = struct.pack(
            "<10Q", 0, 0, 0, 0, exit_signal, 0, 0, 0, TID_AT if set_tid else 0, 1 if set_tid else 0
        )
        parent.write(TID_AT, struct.pack("<i", set_tid))
        parent.write(ARGS_AT, args)
        pid = parent.syscall(SYS_CLONE3, ARGS_AT, CLONE_ARGS_SIZE_VER1)
        if pid > 0:
            break
        if set_tid:
            why = {-17: IN_USE, -1: "not allowed (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)"}
            reason = why.get(pid, os.strerror(-pid))
            note = f"pid {want} could not be kept: {reason}"
            if keep is not None:
                held = f"it is in use by {pidheld.holder(want)}" if pid == -17 else reason
                raise Unsupported(pidheld.refusal(keep[0], keep[1], held))
    if pid <= 0:
        raise RestoreError(f"cannot fork the helper of pid {want}: clone3 failed: {os.strerror(-pid)}")
    pid = outer_child(parent.pid, pid)  # clone3 answered with the pid inside a --pidns namespace
    _seize(pid)
    return Helper(pid, want, note)


def _expected(
    tree: TreeRecord, pids: dict[int, int], root_ids: tuple[int, int]
) -> dict[int, tuple[int, int]]:
    """(pgid, sid) each restored process must have: the dumped ones, through the pid map; the root's
    own group and session stand for those it had."""
    root = tree.root
    # Two maps: a root that led its session also led its group (pgid == sid == pid), and the two
    # stand for different ids of `ckpt restore`'s.
    gmap, smap = {root.pgid: root_ids[0]}, {root.sid: root_ids[1]}

    def m(x: int, own: dict[int, int]) -> int:
        return own[x] if x in own else pids.get(x, x)

    out = {root.pid: root_ids}  # the root, even one that led its group, is in ckpt restore's
    for p in tree.processes[1:]:
        own = pids[p.pid]
        out[p.pid] = (own if p.pgid == p.pid else m(p.pgid, gmap), own if p.sid == p.pid else m(p.sid, smap))
    return out


def _make_zombie(remote: Remote, m: _Member) -> None:
    """Let the helper end as the dumped process ended; its parent (a helper) then holds a zombie."""
    status = m.proc.exit_status
    assert status is not None
    pid = m.helper.pid
    regs = raw.getregs(pid)
    regs.rip = SITE
    regs.orig_rax = MASK64
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
        remote.write(SIGACT_AT, bytes(32))
        remote.check("resetting the signal's action", SYS_RT_SIGACTION, sig, SIGACT_AT, 0, 8)
        raw.setsigmask(pid, 0)
        regs.rax, regs.rdi, regs.rsi = SYS_KILL, inner(pid), sig
    else:
        regs.rax, regs.rdi = SYS_EXIT_GROUP, os.WEXITSTATUS(status)
    raw.setregs(pid, regs)
    raw.cont(pid)
    for _ in range(16):
        w = raw.wait(pid, EXIT_TIMEOUT)
        if w is None:
            raise RestoreError(f"the helper of zombie {m.proc.pid} did not exit")
        if w.exited:
            return
        raw.cont(pid, w.sig if w.is_signal_stop else 0)
    raise RestoreError(f"the helper of zombie {m.proc.pid} kept stopping")


def restore_tree(
    view: MergedView,
    *,
    inherit_fds: dict[str, int] | None = None,
    before_run: Callable[[int], None] | None = None,
    pidns: bool = False,
    new_pids: bool = False,
) -> RestoredProcess:
    """Rebuild every process of the tree whose root's layer is `view`'s top; leave them running.
    `new_pids`: a child whose pid is in use gets another, noted (else the restore is refused; the
    root's pid may change either way, as one process's does).
    `inherit_fds`: --inherit-fd, for pipes with an end outside the tree (restore/pipes.py).
    `before_run(root pid)`: the last word once every process is built and still stopped (a
    migration's commit); if it raises, every process is killed instead of let go.
    `pidns`: in a new pid namespace, every process with its dumped pid (restore/pidns.py)."""
    t0 = time.perf_counter()
    tree = view.top.tree
    assert tree is not None
    views = open_members(view, tree)
    members: dict[int, _Member] = {}
    tcps: list[TcpRestore] = []  # every process's established connections, made last, together
    made = _PipeEnds()
    objects = TreeObjects()
    ns: PidNamespace | None = None
    try:
        # The pid each process gets: with --pidns, the one it saw (refused: pid 1 inside); a tree
        # dumped inside a pid namespace below ckpt's is refused without it (restore/pidns.py).
        inside = inside_pids(view) if pidns else {p.pid: p.pid for p in tree.processes}
        if not pidns:
            refuse_nested(view, views)
        records = {tree.root.pid: view.top, **{p: mv.top for p, mv in views.items()}}
        refused = tree_refusals(tree, records)
        inherit = made.make(tree_pipes(records), inherit_fds or {})
        plans: dict[int, RestorePlan] = {}
        for pid, mv in [(tree.root.pid, view), *views.items()]:
            try:
                plans[pid] = make_plan(mv, in_tree=True, inherit_fds=inherit[pid])
            except Unsupported as e:
                refused.append(str(e))
        if not refused:
            objects.make(tree, records, plans)  # before share_files, which turns fds into "pipe"s
            objects.make_shm(records, plans, tree)
            made.share_files(tree, records, plans, objects)
        if refused:
            raise Unsupported(
                f"cannot restore the tree of pid {tree.root.pid}: unsupported: {'; '.join(refused)}"
            )
        root = tree.root
        want = root.pid if root.pid != os.getpid() else None
        if pidns:  # (a root that was its namespace's init is restored as the new one's)
            ns, helper = root_helper(plans[root.pid], inside[root.pid])
        else:
            helper = spawn_helper(want)
        members[root.pid] = _Member(root, helper, view, plans[root.pid])
        remotes: dict[int, Remote] = {}
        try:
            remotes[root.pid] = Remote(members[root.pid].helper.pid, SITE)
            _build(tree, members, remotes, views, plans, inside, keep=ns is None and not new_pids)
            if ns is not None:
                for m in members.values():
                    require_kept(m.helper)
            pids = {p: m.helper.pid for p, m in members.items()}
            root_ids = read_ids(pids[root.pid])
            expected = _expected(tree, pids, (root_ids.pgid, root_ids.sid))
            _join_groups(tree, members, remotes, expected)
            _check_groups(members, expected)
            for p in tree.processes:
                if p.zombie:
                    _make_zombie(remotes[p.pid], members[p.pid])
        finally:
            for r in remotes.values():
                r.close()
        for p in reversed(tree.processes):
            m = members[p.pid]
            if p.zombie:
                _check_zombie(m)
                continue
            assert m.view is not None and m.plan is not None
            m.prep = prepare(m.view, m.plan, helper=m.helper)
            m.restored = complete(m.prep, m.plan, detach=False, tcp_later=tcps)
        objects.seal()
        if ns is not None:  # before the last word (a migration's commit), past which nothing may fail
            ns.start(inside[tree.root.pid])
        if before_run is not None:
            before_run(members[tree.root.pid].helper.pid)
        finish_all(tcps)
        for p in reversed(tree.processes):
            m = members[p.pid]
            if not p.zombie:
                assert m.plan is not None
                let_run(m.helper.pid, m.plan.thread.regs)  # back inside its syscall (resume.py)
    except BaseException:
        for m in reversed(list(members.values())):
            kill_helper(m.helper.pid)
        if ns is not None:
            ns.kill()
        objects.abort()
        raise
    finally:
        for t in tcps:
            t.close()  # (unfinished: in repair mode, so their sockets go silently with the helpers)
        made.close()  # the restored processes hold the ends now
        objects.close()  # and the objects
        for mv in views.values():
            mv.close()
    top = members[tree.root.pid].restored
    assert top is not None
    # The root's own timings cover its prepare and complete; this, the whole tree's.
    top.timings_ms["tree_total"] = round((time.perf_counter() - t0) * 1e3, 3)
    if ns is not None:
        top.init_pid, top.pid_kept, top.note = ns.init, True, ""
        top.ns_pid = inside[tree.root.pid]
        top.warnings.extend(root_notes(view))
    top.tree = [
        {
            "dumped_pid": p.pid,
            "pid": members[p.pid].helper.pid,
            "ppid": members[p.ppid].helper.pid if p.ppid in members and p is not tree.root else None,
            "zombie": p.zombie,
            "note": members[p.pid].helper.pid_note,
            "stopped": getattr(members[p.pid].restored, "stopped", 0),  # (restore/jobstop.py)
        }
        for p in tree.processes
    ]
    for p in tree.processes[1:]:
        m = members[p.pid]
        if m.helper.pid_note:
            top.warnings.append(f"pid {p.pid} restored as pid {m.helper.pid} ({m.helper.pid_note})")
        if m.restored is not None:
            top.warnings.extend(f"pid {p.pid}: {w}" for w in m.restored.warnings)
    return top


class _PipeEnds:
    """The pipes between processes of the tree, made once by ckpt with their size and bytes. Each
    holder takes its ends from ckpt's fds as an --inherit-fd (restore/pipes.py: pidfd_getfd), so the
    processes share one pipe, as they did: the read end, the write end, or a read-write description
    (the pipe opened again through /proc) for a process that held both."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def make(self, pipes: list[TreePipe], given: dict[str, int]) -> dict[int, dict[str, int]]:
        inherit: dict[int, dict[str, int]] = defaultdict(lambda: dict(given))
        for tp in pipes:
            assert tp.record is not None  # refused otherwise (treeplan.shared_refusals)
            r, w = (self._keep(x) for x in os.pipe2(os.O_CLOEXEC))
            try:
                if fcntl.fcntl(w, F_SETPIPE_SZ, tp.record.size) < len(tp.record.data):
                    raise RestoreError(f"pipe:[{tp.ino}]: a pipe of {tp.record.size} bytes cannot be made")
                view = memoryview(tp.record.data)
                while view:
                    view = view[os.write(w, view) :]
                rw = self._keep(os.open(f"/proc/self/fd/{r}", os.O_RDWR | os.O_CLOEXEC))
                # The flags of each end's description are its first holder's (they shared it).
                for fd, first in ((r, next(iter(tp.readers.values()))), (w, next(iter(tp.writers.values())))):
                    fcntl.fcntl(fd, fcntl.F_SETFL, first.flags & SETFL_MASK)
            except OSError as e:
                raise RestoreError(f"cannot make pipe:[{tp.ino}] again: {e.strerror}") from None
            for pid in tp.holders:
                both = pid in tp.readers and pid in tp.writers
                inherit[pid][f"pipe:[{tp.ino}]"] = rw if both else r if pid in tp.readers else w
        return inherit

    def share_files(
        self, tree: TreeRecord, records: dict[int, Any], plans: dict[int, RestorePlan], objects: TreeObjects
    ) -> None:
        """Open files two processes shared (one offset: a shell's `> log` and its job): ckpt opens
        each once, with the rights of its first holder, at the dumped offset, and every fd of it in
        every process becomes that description (taken like an inherited pipe, restore/pipes.py).
        A memfd or deleted file made once for the tree is opened anew from ckpt's fd of it."""
        for group in _groups(tree.shared_files):
            pid, fd = group[0]
            rec = next((f for f in records[pid].fds if f.fd == fd), None)
            obj = None if rec is None else objects.fd_of(rec.dev, rec.ino)
            if rec is None or (rec.kind not in ("file", "dir") and obj is None):
                raise RestoreError(f"fd {fd} of pid {pid}: the tree record names an fd its layer lacks")
            flags = reopen_flags(rec.flags) | os.O_CLOEXEC
            try:
                if obj is not None:
                    n = self._keep(os.open(f"/proc/self/fd/{obj}", flags & ~os.O_NOFOLLOW))
                else:
                    n = self._keep(open_as(records[pid].task, rec.path, flags))
                st = os.fstat(n)
                if obj is None and (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
                    raise RestoreError(f"fd {fd} of pid {pid} ({rec.path}): the path now names another file")
                if rec.pos:
                    os.lseek(n, rec.pos, os.SEEK_SET)
            except OSError as e:
                raise RestoreError(
                    f"reopening fd {fd} of pid {pid} ({rec.path}) failed: {e.strerror}"
                ) from None
            for holder in sorted({p for p, _ in group}):
                plan = plans[holder]
                fds = {f for p, f in group if p == holder}
                mine = [f.record for f in plan.fds if f.fd in fds]
                for f in plan.fds:
                    if f.fd in fds:
                        f.action = "pipe"  # placed by restore_pipes, not reopened by restore_fds
                plan.pipes.append(PipePlan("inherit", rec.ino, mine, source=n))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _groups(pairs: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int]]]:
    """The (pid, fd)s that are one open file description, from the pairs found at dump."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(x: tuple[int, int]) -> tuple[int, int]:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for p1, f1, p2, f2 in pairs:
        parent[find((p1, f1))] = find((p2, f2))
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for x in list(parent):
        out.setdefault(find(x), []).append(x)
    return [sorted(g) for g in out.values()]


def _build(
    tree: TreeRecord,
    members: dict[int, _Member],
    remotes: dict[int, Remote],
    views: dict[int, MergedView],
    plans: dict[int, RestorePlan],
    inside: dict[int, int],
    keep: bool = False,
) -> None:
    """Fork every helper from its parent's, parents first; leaders make their session or group.
    `inside`: the pid each is forked with (--pidns: the pid it saw in its namespace). `keep`: a pid
    that cannot be kept is refused (else noted)."""
    for p in tree.processes[1:]:
        parent = remotes[p.ppid]
        h = _fork(parent, inside[p.pid], p.exit_signal, (p.pid, p.ppid) if keep else None)
        members[p.pid] = _Member(p, h, views.get(p.pid), plans.get(p.pid))
        r = remotes[p.pid] = Remote(h.pid, SITE)
        # Signals reach a stopped helper as ptrace stops, which the restore drops; a blocked one
        # would stay pending for the restored process (a zombie's SIGCHLD, long taken by the original).
        raw.setsigmask(h.pid, 0)
        if p.sid == p.pid:
            r.check(f"setsid() for pid {p.pid}", SYS_SETSID)
        elif p.pgid == p.pid:
            r.check(f"setpgid(0, 0) for pid {p.pid}", SYS_SETPGID, 0, 0)
    raw.setsigmask(members[tree.root.pid].helper.pid, 0)


def _join_groups(
    tree: TreeRecord,
    members: dict[int, _Member],
    remotes: dict[int, Remote],
    expected: dict[int, tuple[int, int]],
) -> None:
    for p in tree.processes[1:]:
        pid = members[p.pid].helper.pid
        want = expected[p.pid][0]
        if read_ids(pid).pgid != want:
            remotes[p.pid].check(f"joining process group {want} (pid {p.pid})", SYS_SETPGID, 0, inner(want))


def _check_groups(members: dict[int, _Member], expected: dict[int, tuple[int, int]]) -> None:
    for dumped, m in members.items():
        ids = read_ids(m.helper.pid)
        if (ids.pgid, ids.sid) != expected[dumped]:
            raise RestoreError(
                f"pid {dumped} came out in process group {ids.pgid} and session {ids.sid}, "
                f"not {expected[dumped][0]} and {expected[dumped][1]}"
            )


def _check_zombie(m: _Member) -> None:
    ids = read_ids(m.helper.pid)
    if not ids.zombie or ids.exit_code != m.proc.exit_status:
        raise RestoreError(
            f"zombie {m.proc.pid} came out as state {ids.state} with status {ids.exit_code:#x}, "
            f"not {m.proc.exit_status:#x}"
        )


__all__ = ["open_members", "restore_tree"]
