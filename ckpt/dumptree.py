"""One dump of a process tree: freeze every process, dump each into its own chain, thaw together.

1. freeze top-down: the root, then the children of every frozen process (/proc/PID/task/*/children)
   again and again until a walk finds none new. A frozen process cannot fork, and a fork that was
   under way when it stopped has already put its child in the list, so the tree is complete.
   Zombies are not frozen (they cannot be): their wait status is read from /proc.
2. each live process dumped with dump.py's own steps up to its thaw (`_dump(frozen=...)`), into
   DIR for the root and DIR/tree/PID-STARTTIME/ for the others: each its own chain, with its own
   dirty tracking armed and read and its own arm record (ckpt/chainlock.py).
3. thaw all (or, with --kill, keep them frozen until every layer is written, then kill them all)
4. each member's layer published, then the root's, which holds the tree record naming them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt.chainlock import ARMED_NAME, LOCK_NAME
from ckpt.dump import DumpResult, _dump, _remove_new_directory_on_failure, undo_tracking
from ckpt.errors import CkptError, FreezeError, TargetExited
from ckpt.image import Layer, find_layers, tablecache
from ckpt.image.format import LayerMeta
from ckpt.image.tree import MAX_TREE, TreeRecord
from ckpt.image.writer import ensure_dir
from ckpt.proc import check_dumpable, mmshare
from ckpt.proc.pidns import tree_ns_pids
from ckpt.proc.tcp import TcpDump
from ckpt.proc.tree import ProcIds, children, read_ids, shared_descriptions, shared_tables
from ckpt.ptrace import Frozen, deferred_signals, sigchld
from ckpt.ptrace.freeze import thaw_all
from ckpt.ptrace.parting import in_exiting_thread
from ckpt.ptrace.signals import held as signals_held
from ckpt.restore.treeplan import tree_refusals
from ckpt.track.select import get_tracker
from ckpt.track.uffdwp import is_our_uffd
from ckpt.treeshare import TreeShare

MAX_WALKS = 64
TREE_DIR = "tree"


def has_children(pid: int) -> bool:
    return bool(children(pid))


def refuse_children(pid: int, what: str) -> None:
    """Before anything touches `pid`: one that has children is refused, naming them."""
    kids = children(pid)
    if kids:
        shown = ", ".join(map(str, kids[:8])) + (", ..." if len(kids) > 8 else "")
        raise CkptError(f"pid {pid} has children (pid {shown}): {what}; it runs on untouched")


def member_dir(directory: Path, ids: ProcIds) -> Path:
    """A member's chain: named by pid and start time, so that a reused pid starts a new chain."""
    return directory / TREE_DIR / f"{ids.pid}-{ids.start_time}"


class _Tree:
    """The frozen tree: parents before children."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.ids: dict[int, ProcIds] = {}
        self.frozen: dict[int, Frozen] = {}

    def _add(self, pid: int) -> None:
        ids = read_ids(pid)
        if not ids.zombie:
            fz = Frozen(pid)
            try:
                fz.freeze()
            except TargetExited:
                with contextlib.suppress(TargetExited):
                    ids = read_ids(pid)
                if not ids.zombie:
                    return  # gone (reaped by a parent that ignores SIGCHLD)
            else:
                self.frozen[pid] = fz
                ids = read_ids(pid)  # ids of a frozen process no longer change
        self.ids[pid] = ids
        self.order.append(pid)

    def freeze(self, root: int) -> None:
        self._add(root)
        if root not in self.frozen:
            raise TargetExited(f"process {root} exited")
        for _ in range(MAX_WALKS):
            new = False
            i = 0
            while i < len(self.order):
                p = self.order[i]
                i += 1
                if p not in self.frozen:
                    continue
                for c in children(p):
                    if c in self.ids:
                        continue
                    if c in (os.getpid(), os.getppid()):
                        raise CkptError(
                            f"the tree of pid {root} holds this ckpt process (or its parent): "
                            "it cannot dump itself"
                        )
                    if len(self.order) >= MAX_TREE:
                        raise CkptError(f"the tree of pid {root} has more than {MAX_TREE} processes")
                    with contextlib.suppress(TargetExited):
                        self._add(c)
                        new = True
            if not new:
                return
        raise FreezeError(f"the tree of pid {root} keeps growing faster than it can be frozen")

    def thaw(
        self, leave_stopped: bool = False, before_stop: Callable[[list[int]], None] | None = None
    ) -> None:
        # Those the thaw stops with ckpt's SIGSTOP told first: not those in a stop of someone else's.
        thaw_all(self.frozen, leave_stopped, before_stop)

    def kill(self) -> None:
        for p in self.order:
            if p in self.frozen:
                self.frozen[p].kill()
        self.thaw()


def _finish(gen: Any, value: Any) -> DumpResult:
    try:
        gen.send(value)
    except StopIteration as e:
        return e.value
    raise AssertionError("a tree member's dump stopped twice")


def _remove_new_members_on_failure(fn: Callable[..., DumpResult]) -> Callable[..., DumpResult]:
    """A failed tree dump that had to create DIR/tree/ leaves no member chain holding only ckpt's
    bookkeeping (the lock, the arm record), so that _remove_new_directory_on_failure can take DIR."""

    @functools.wraps(fn)
    def wrapper(pid: int, directory: str | Path, *args: Any, **kw: Any) -> DumpResult:
        top = Path(directory) / TREE_DIR
        existed = os.path.lexists(top)
        try:
            return fn(pid, directory, *args, **kw)
        except BaseException:
            if not existed:
                with contextlib.suppress(OSError):
                    for c in top.iterdir():
                        if set(os.listdir(c)) <= {LOCK_NAME, ARMED_NAME}:
                            for n in (LOCK_NAME, ARMED_NAME):
                                (c / n).unlink(missing_ok=True)
                            c.rmdir()
                    top.rmdir()
            raise

    return wrapper


@_remove_new_directory_on_failure
@_remove_new_members_on_failure
@sigchld.blocking
def dump_tree(
    pid: int,
    directory: str | Path,
    *,
    incremental: bool = False,
    parent: str | Path | None = None,
    kill: bool = False,
    force: bool = False,
    leave_stopped: bool = False,
    fallback_full: bool = False,
    pre_dump: bool = False,
    tcp_handover: Any = None,
    before_stop: Callable[[list[int]], None] | None = None,
    **options: Any,
) -> DumpResult:
    """Dump `pid` and every descendant; the root's layer (in `directory`) holds the tree record.
    `tcp_handover` (a migration's, migrate/tcpmove.py): its member() gives each process's TcpDump,
    which it owns afterwards (the connections stay locked and in repair mode). `before_stop`: told,
    before a leave_stopped thaw, the pids it stops (a migration's guard continues only those)."""
    if pre_dump:
        raise CkptError("--pre-dump copies one running process; a tree is dumped frozen (--no-tree)")
    if leave_stopped and kill:
        raise CkptError("--leave-stopped and --kill contradict each other")
    check_dumpable(pid)
    mmshare.refuse(pid, with_children=False)  # (its children are members: shared_tables)
    # The CLI's early buffer holds one process's pages: shared by several dumps that all copy before
    # any writes, the last one's pages would be stored in every layer. The root's alone, then.
    early = options.pop("early_buffer", None)
    directory = Path(directory)
    ensure_dir(directory)
    t0 = time.perf_counter()
    tree = _Tree()
    gens: dict[int, Any] = {}
    done: dict[int, DumpResult] = {}
    share = TreeShare()  # shared memory stored once, by its first holder (parents first)
    tcps: list[TcpDump] = []  # each member's established connections, held until the thaw or kill
    shared_kept: list[tuple[int, int, int, int, str]] = []  # fds shared between members
    ns_pids: list[list[int]] = []  # members in a pid namespace below ckpt's (proc/pidns.py)
    freeze_ms = 0.0
    with contextlib.ExitStack() as locks, deferred_signals():

        def frozen_part() -> tuple[DumpResult, list[str]] | None:
            """Freeze to thaw (with --kill: to the kill), in a thread that ends right after, so that
            the thaw lets each member's threads go straight back into their syscalls
            (ptrace/parting.py); ptrace needs every call from the thread that froze."""
            nonlocal freeze_ms
            try:
                tree.freeze(pid)
                ns_pids[:] = tree_ns_pids(tree.order)  # zombies' too: read while they are sure to be
                tables = shared_tables(tree.frozen)
                if tables:  # (a restore would make each its own, silently apart)
                    raise CkptError(
                        f"cannot dump the tree of pid {pid}: {'; '.join(tables)}, which ckpt does not restore"
                    )
                shared = shared_descriptions({p: [(int(n), "") for n in _fd_names(p)] for p in tree.frozen})
                # A child forked after its parent's tracking was armed holds a copy of the parent's
                # userfaultfd (fork copies even O_CLOEXEC fds): ckpt's, not the process's.
                ours = {(p, f) for a, b, c, e, _ in shared for p, f in ((a, b), (c, e)) if is_our_uffd(p, f)}
                shared_kept[:] = [x for x in shared if (x[0], x[1]) not in ours]
                for p in tree.order:
                    if p not in tree.frozen:
                        continue
                    root = p == pid
                    d = directory if root else member_dir(directory, tree.ids[p])
                    if not root:
                        ensure_dir(directory / TREE_DIR)
                    if tcp_handover is not None:
                        tcp = tcp_handover.member()
                    else:
                        tcp = locks.enter_context(
                            TcpDump(
                                bool(options.get("tcp_established")),
                                keep=kill,
                                in_tree=True,
                                force=kill and force,
                                hold=True,
                            )
                        )
                        tcps.append(tcp)
                    gen = _dump(
                        p,
                        d,
                        incremental=incremental if root else incremental and bool(find_layers(d)),
                        parent=parent if root else None,
                        # A member whose chain cannot go on (its tracking was lost) starts a new one.
                        fallback_full=fallback_full if root else True,
                        kill=kill,
                        force=force,
                        leave_stopped=leave_stopped,
                        locks=locks,
                        frozen=tree.frozen[p],
                        ignore_fds=frozenset(f for q, f in ours if q == p),
                        tree_share=share,
                        tcp_dump=tcp,
                        **({"early_buffer": early} if root else {}),
                        **options,
                    )
                    gens[p] = gen
                    next(gen)  # up to its thaw
                if not kill:
                    _release(tcps)
                    tree.thaw(leave_stopped, before_stop)
                    freeze_ms = (time.perf_counter() - t0) * 1e3
                    return None
                freeze_ms = (time.perf_counter() - t0) * 1e3
                return publish()  # the tree stays frozen until its layers are written, then dies
            except BaseException:
                _abandon()
                tree.thaw(leave_stopped, before_stop)
                raise

        def publish() -> tuple[DumpResult, list[str]]:
            try:
                for p in reversed(tree.order):
                    if p in gens and p != pid:
                        if signals_held():
                            raise KeyboardInterrupt  # a Ctrl-C between two members' layers
                        done[p] = _finish(gens[p], None)
                record = _record(pid, directory, tree, done, shared_kept)
                record["shared_maps"] = [list(m) for m in share.maps]
                if ns_pids:
                    record["ns_pids"] = ns_pids
                result = _finish(gens[pid], record)
            except KeyboardInterrupt:
                _withdraw(tree, done, directory)
                raise
            metas = {p: _meta(r.layer) for p, r in [*done.items(), (pid, result)]}
            refusals = tree_refusals(TreeRecord.from_dict(record), metas)
            problems = [
                *refusals,
                *result.not_restorable,
                *(f"pid {p}: {w}" for p, r in done.items() for w in r.not_restorable),
            ]
            if kill:
                if problems and not force:
                    raise CkptError(
                        f"not killing the tree of pid {pid}: it could not be restored "
                        f"({'; '.join(problems)}); its layers were written, and it runs on "
                        "(--force kills it anyway)"
                    )
                tree.kill()
                for t in tcps:
                    t.killed()  # their sockets close in repair mode; the locks wait for the restore
            return result, problems

        def _abandon() -> None:
            for g in gens.values():
                with contextlib.suppress(Exception):
                    g.close()
            _release(tcps)

        out = in_exiting_thread(frozen_part)
        if out is None:
            try:
                out = publish()
            except BaseException:
                _abandon()  # thawed already: the tree runs on (or stays stopped)
                raise
        result, problems = out
    result.restorable = not problems
    result.not_restorable = problems
    result.freeze_ms = round(freeze_ms, 3)
    result.elapsed_ms = round((time.perf_counter() - t0) * 1e3, 3)
    result.tree = [
        {
            "pid": p,
            "ppid": tree.ids[p].ppid,
            "start_time": tree.ids[p].start_time,  # (read in the freeze: with the pid, who it is)
            "zombie": tree.ids[p].zombie,
            "layer": done[p].layer if p in done else None,
            "incremental": done[p].incremental if p in done else False,
            "pages_dumped": done[p].pages_dumped if p in done else 0,
            "bytes_written": done[p].bytes_written if p in done else 0,
        }
        for p in tree.order[1:]
    ]
    for p, r in done.items():
        result.warnings.extend(f"pid {p}: {w}" for w in r.warnings)
    cont = [p for p, fz in tree.frozen.items() if fz.continued_meanwhile]  # (Frozen._drop_sigcont)
    if cont:
        result.warnings.append(
            f"process(es) {', '.join(map(str, cont))} had a SIGCONT not yet taken when the dump ended; "
            "discarded, left stopped as --leave-stopped asks"
        )
    return result


def _withdraw(tree: _Tree, done: dict[int, DumpResult], directory: Path) -> None:
    """A Ctrl-C in a tree dump leaves no layer of it: each member's already published one goes,
    and with it the tracking armed (or reset) for it, as a failing member's own dump does."""
    for p, r in done.items():
        d = Path(r.layer).parent
        with contextlib.suppress(CkptError, OSError):
            state = _meta(r.layer).inventory.tracker_state
            Path(r.layer).unlink()
            tablecache.remove(Path(r.layer))  # its chain's table (ckpt/image/tablecache.py) with it
            if r.tracker is not None:
                undo_tracking(p, tree.frozen[p], get_tracker(r.tracker), state, d, r.incremental, [])
    done.clear()


def _release(tcps: list[TcpDump]) -> None:
    """Every member's connections out of repair mode and their locks lifted (before the thaw)."""
    for t in tcps:
        with contextlib.suppress(CkptError):
            t.release()


def _meta(path: str) -> LayerMeta:
    """A layer's records, read back and its file closed again (a tree of many members would
    otherwise hold one open file per member until the garbage collector came by)."""
    with Layer.open(path) as lay:
        return lay.meta


def _fd_names(pid: int) -> list[str]:
    try:
        return [n for n in os.listdir(f"/proc/{pid}/fd") if n.isdigit()]
    except OSError:
        return []


def _record(
    root: int,
    directory: Path,
    tree: _Tree,
    done: dict[int, DumpResult],
    shared: list[tuple[int, int, int, int, str]],
) -> dict[str, Any]:
    procs = []
    for p in tree.order:
        i = tree.ids[p]
        layer = digest = None
        if p in done:
            layer = os.path.relpath(done[p].layer, directory)
            with Layer.open(done[p].layer) as lay:
                digest = lay.digest
        procs.append(
            {
                "pid": p,
                "ppid": i.ppid,
                "pgid": i.pgid,
                "sid": i.sid,
                "start_time": i.start_time,
                "comm": i.comm,
                "layer": layer,
                "digest": digest,
                "exit_status": i.exit_code if i.zombie else None,
                "exit_signal": i.exit_signal,
            }
        )
    return {"processes": procs, "shared_files": [[a, b, c, d] for a, b, c, d, _ in shared]}


__all__ = ["dump_tree", "has_children", "member_dir", "refuse_children"]
