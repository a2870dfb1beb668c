"""Restoring into a new pid namespace (`--pidns`): every process gets its dumped pid back.

On the machine a process tree was dumped on, its pids are usually still taken (by the original
itself during a migration on one machine, which runs until the commit). Restored beside them, the
copy's processes get new pids while the program keeps the old ones (a pool's worker pids, a shell's
job table): `pool.terminate()` would signal nobody, or a stranger. CRIU's answer, and this module's:
a new pid namespace, in which every pid of the dump is free.

  1. a launcher helper (helper.py, in our namespace) opens a pidfd of ckpt, then clone3()s with
     CLONE_NEWPID|CLONE_PARENT: the child is pid 1 of a new namespace and, like every helper, a child
     of ckpt's long-lived thread (parent.py). The launcher is then killed. The child (the "init") is
     seized and stopped in the stub's pause loop, with every signal blocked. Of the launcher's fds it
     keeps ckpt's pidfd, and 0-2 (ckpt's, which the root's helper takes as any helper does) until it
     starts.
  2. the root's helper is forked from the init (restore/tree.py's injected clone3), with the root's
     pid in set_tid: inside the namespace the pid is free. Every other process of a tree is forked
     from its parent's helper as usual, and threads are cloned with their tids, all now inside.
  3. a pid a process inside the namespace is given back by the kernel (clone3's result) is its pid
     there; ckpt, outside, traces it by its outer pid: `outer_child` and `outer_tid` find it by the
     NSpid lines of /proc. Syscalls injected into a helper that name another process (setpgid, the
     kill that makes a zombie) are given the inner pid (`inner`).
  4. ckpt's own pid means nothing inside, so pidfd_open(ckpt) injected into a helper there (how a
     helper takes fds from ckpt, pipes.fetch_fd) cannot work: the helper opens the init (pid 1) and
     takes ckpt's pidfd from it with pidfd_getfd first (`open_pidfd`).
  5. once everything runs, the init's code (pidinit.S) is written into its own stub page and it is
     let go there: it reaps orphans, passes every signal on to the root, and exits with the root's
     status when the root ends (the kernel then kills what is left of the namespace). Killing the
     init kills the whole tree.

A root that was its namespace's own init (pid 1 inside: `unshare --pid --fork PROGRAM`) is restored
as the new namespace's init instead, as CRIU restores a pid namespace's root task: the clone3 child of
step 1 is the root's helper itself (`PidNamespace.as_root`), its children are forked from it with
their pids inside, and it keeps ckpt's pidfd, above its own fds, until its fds are set
(`kept_fd`, `drop_courier`). No pidinit.S then: the kernel treats the restored root as the init it
was (orphans come to it, its end ends the namespace, signals with no handler that come from inside
are dropped). Pid 1 for any other process of a tree is refused (`refuse_pid_one`).

A process dumped inside a pid namespace below ckpt's (a container's) saw other pids than ckpt's: its
layer records those (image/pidns.py), and here every process and thread is forked with the one it
saw (`inside_pids`, `inside_tid`) instead of its dumped pid. Outside a namespace they cannot be
given: a restore without --pidns refuses such a layer (`refuse_nested`).

/proc: no new mount namespace and no /proc of the namespace's own. /proc/self, /proc/thread-self and
/proc/<pid>/... read through the existing /proc (the caller's namespace), where /proc/self names the
process under its outer pid: it stays readable. /proc/<the pid getpid() returns> would name another
process: a program that builds such paths from getpid() sees the caller's numbering (documented).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import signal
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.proc.pidns import in_our_pidns, nspid
from ckpt.ptrace import raw
from ckpt.ptrace.regs import MASK64
from ckpt.restore.helper import (
    ARGS_AT,
    CLONE_PARENT,
    INIT_AT,
    NAME_AT,
    SITE,
    Helper,
    _seize,
    kill_helper,
    spawn_helper,
)
from ckpt.restore.remote import Remote

if TYPE_CHECKING:
    from ckpt.image import MergedView
    from ckpt.restore.plan import RestorePlan

CLONE_NEWPID = 0x20000000
SYS_CLONE3 = 435
PIDFD_OPEN, PIDFD_GETFD = 434, 438
ALL_SIGNALS = (1 << 64) - 1

# pidinit.S assembled (gcc -c; objcopy -O binary -j .text): the code, then `all`, `root`, `status`.
INIT_CODE = bytes.fromhex(
    "b80e00000031ff488d359200000031d241ba080000000f05b880000000488d3d7c00000031f631d241ba0800"
    "00000f0583f811741585c07edf89c68b3d67000000b83e0000000f05ebceb83d000000bfffffffff488d3551"
    "000000ba010000404531d20f054883f8f6740d4885c07ea83b053200000075d28b3d2e00000089f883e07f74"
    "088db880000000eb09c1ef0881e7ff000000b8e70000000f050f1f00ffffffffffffffff0000000000000000"
)
INIT_ROOT_OFF = 0xA8  # `root`: the restored root's pid inside the namespace

# ns inode -> the fd in that namespace's init that holds a pidfd of ckpt (while a restore runs)
_couriers: dict[int, int] = {}
# init (our pid) -> its courier fd, for an init that is the restored root itself (`as_root`): the
# restore of its own fds must leave that one open until it has taken its last fd from ckpt.
_root_couriers: dict[int, int] = {}


def kept_fd(pid: int) -> int | None:
    """The fd that clearing helper `pid`'s fds must leave open: ckpt's pidfd, when the helper is a
    new namespace's init that becomes the restored root (restore/memory.clear_helper)."""
    return _root_couriers.get(pid) if _root_couriers else None


def drop_courier(remote: Remote) -> None:
    """Close ckpt's pidfd in a root that is its namespace's init, once its fds are all taken
    (restorer.complete, before the restore's own page goes): the process must not see it. Its
    children, restored before it, took theirs already."""
    fd = _root_couriers.pop(remote.pid, None) if _root_couriers else None
    if fd is not None:
        remote.check("closing ckpt's pidfd in the init", nr.CLOSE, fd)


def _ns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/pid").st_ino


def inner(pid: int) -> int:
    """Process `pid` (ours) as its own namespace numbers it: what a syscall injected into a helper
    of that namespace must be given. `pid` itself when it is in ours, or gone."""
    try:
        ids = nspid(f"/proc/{pid}/status")
    except OSError:
        return pid
    return ids[-1] if ids else pid


def _in_other_ns(pid: int) -> bool:
    return bool(_couriers) and not in_our_pidns(pid)  # (no namespace made: none to be in)


def outer_child(parent: int, child: int) -> int:
    """The pid (ours) of the process that `parent`'s clone3 returned as `child` (its namespace's)."""
    if not _in_other_ns(parent):
        return child
    try:  # the parent is a helper, one thread (CONFIG_PROC_CHILDREN)
        with open(f"/proc/{parent}/task/{parent}/children", "rb") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = sorted((int(n) for n in os.listdir("/proc") if n.isdigit()), reverse=True)
    for kid in kids:
        try:
            text = Path(f"/proc/{kid}/status").read_bytes()
        except OSError:
            continue
        ppid = next((int(x.split()[1]) for x in text.splitlines() if x.startswith(b"PPid:")), 0)
        ids = next((x.split()[1:] for x in text.splitlines() if x.startswith(b"NSpid:")), [])
        if ppid == parent and ids and int(ids[-1]) == child:
            return kid
    raise RestoreError(f"the process forked as pid {child} in the new pid namespace cannot be found")


def outer_tid(pid: int, tid: int) -> int:
    """The tid (ours) of the thread of process `pid` that its namespace numbers `tid`."""
    if not _in_other_ns(pid):
        return tid
    for name in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            ids = nspid(f"/proc/{pid}/task/{name}/status")
            if ids and ids[-1] == tid:
                return int(name)
    raise RestoreError(f"thread {tid} of the new pid namespace cannot be found")


def open_pidfd(remote: Remote, pid: int, what: str) -> int:
    """A pidfd of process `pid` (ours) in the helper: pidfd_open, or, for ckpt itself seen from a
    helper inside a new namespace, ckpt's pidfd taken from that namespace's init (module docstring)."""
    courier = _couriers.get(_ns(remote.pid)) if pid == os.getpid() and _couriers else None
    if courier is None:
        return remote.check(what, PIDFD_OPEN, pid, 0)
    init = remote.check(what, PIDFD_OPEN, 1, 0)
    try:
        return remote.check(what, PIDFD_GETFD, init, courier, 0)
    finally:
        remote.check(what, nr.CLOSE, init)


def refuse_pid_one(pids: Mapping[int, int], root: int) -> None:
    """`pids`: the pid each process (by dumped pid) is to get inside the new namespace. Pid 1 is
    the namespace's init: the root may have it (it is restored as that init, `PidNamespace.as_root`),
    no other process can (it would have to be the root's ancestor)."""
    other = next((p for p, v in pids.items() if v == 1 and p != root), None)
    if other is not None:
        raise RestoreError(
            f"--pidns: pid {other} of the dump is to be pid 1, its pid namespace's init, but it is "
            f"not the root of the tree (pid {root}): a namespace's init is restored only as the root"
        )


def root_helper(plan: RestorePlan, want: int) -> tuple[PidNamespace, Helper]:
    """--pidns: a new namespace and the root's helper in it: the namespace's init itself when the
    root was its own namespace's init (`want` 1: `as_root`, ckpt's pidfd placed by courier_at),
    else forked from ckpt's init at `want`. A failure leaves no namespace behind."""
    ns = PidNamespace.make(courier_at(plan) if want == 1 else 3)
    try:
        return ns, ns.as_root() if want == 1 else ns.fork(want)
    except BaseException:
        ns.kill()
        raise


def courier_at(plan: RestorePlan) -> int:
    """The fd ckpt's pidfd takes in an init that becomes the root: one none of the root's fds has,
    which the restore places by number (a dup over it would close it). Above them all when that is
    below ckpt's RLIMIT_NOFILE (the launcher's: dup3 beyond it fails); else the lowest gap between
    them; none at all is refused, named."""
    used = sorted({f.fd for f in plan.fds} | {0, 1, 2})
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if used[-1] + 1 < soft:
        return used[-1] + 1
    gap = next((n + 1 for n, m in itertools.pairwise(used) if m > n + 1), None)
    if gap is None or gap >= soft:
        raise RestoreError(
            f"--pidns: the restored init would use every fd below ckpt's RLIMIT_NOFILE ({soft}), "
            "leaving none for ckpt's pidfd while its fds are placed"
        )
    return gap


def refuse_nested(view: MergedView, members: Mapping[int, MergedView] | None = None) -> None:
    """Without --pidns: a process dumped inside a pid namespace below ckpt's saw other pids than
    ckpt's, which no restore outside a namespace can give it back (image/pidns.py)."""
    tree = view.top.tree
    seen = [(p, i) for p, (i, _) in tree.ns_pids.items()] if tree is not None else []
    for pid, mv in [(view.top.inventory.pid, view), *(members or {}).items()]:
        if mv.top.meta.pidns is not None:
            seen.append((pid, mv.top.meta.pidns.pid))
    if seen:
        pid, inside = seen[0]
        raise RestoreError(
            f"pid {pid} was dumped inside a pid namespace below ckpt's, where it was pid {inside}: "
            "outside one it cannot get back the pids it saw (its own, its parent's, its children's, "
            "its threads'); restore it with --pidns"
        )


def inside_pids(view: MergedView) -> dict[int, int]:
    """--pidns: the pid each process of `view` (the root's layer) gets inside the new namespace, by
    its dumped pid: the one it saw in its own namespace (image/pidns.py), else its dumped pid. The
    processes of one namespace only: a new namespace cannot give the pids of two."""
    tree = view.top.tree
    procs = [p.pid for p in tree.processes] if tree is not None and len(tree.processes) > 1 else []
    if not procs:
        rec = view.top.meta.pidns
        pid = view.top.inventory.pid
        out = {pid: rec.pid if rec is not None else pid}
        refuse_pid_one(out, pid)
        return out
    assert tree is not None
    ns = {p: tree.ns_pids.get(p) for p in procs}
    where = {p: None if v is None else v[1] for p, v in ns.items()}  # the namespace's inode
    kinds = set(where.values())
    if len(kinds) > 1:
        a = procs[0]
        b = next(p for p in procs if where[p] != where[a])
        raise RestoreError(
            f"--pidns: pids {a} and {b} of the tree were dumped in different pid namespaces: one new "
            "namespace cannot give both the pids they saw"
        )
    out = {p: v[0] if v is not None else p for p, v in ns.items()}
    refuse_pid_one(out, tree.root.pid)
    return out


def inside_tid(plan: RestorePlan, pid: int, tid: int) -> int:
    """The tid to ask clone3 for, for the thread dumped as `tid`, in helper `pid`: inside a new
    namespace, the tid the thread saw (image/pidns.py); elsewhere the dumped one."""
    rec = plan.view.top.meta.pidns
    return rec.inner_tid(tid) if rec is not None and _in_other_ns(pid) else tid


def root_notes(view: MergedView) -> list[str]:
    """What the restored root sees differently from what it saw in its own namespace: its parent is
    the new namespace's init (1), its group and session are ckpt's, outside (0 inside)."""
    rec = view.top.meta.pidns
    if rec is None:
        return []
    pid = view.top.inventory.pid
    notes = []
    if rec.ppid not in (0, 1):
        notes.append(
            f"pid {pid}: its parent was pid {rec.ppid} inside its pid namespace (not dumped); "
            "restored, it is the namespace's init, pid 1"
        )
    for what, was in (("process group", rec.pgid), ("session", rec.sid)):
        if was:
            notes.append(
                f"pid {pid}: its {what} was {was} inside its pid namespace; restored, it is "
                "ckpt restore's, outside the namespace (0 inside)"
            )
    return notes


@dataclass
class PidNamespace:
    """A new pid namespace whose init (`init`: its pid in ours) is seized and stopped."""

    init: int
    remote: Remote
    ino: int
    courier: int  # the fd in the init holding a pidfd of ckpt
    is_root: bool = False  # the init is the restored root itself (`as_root`), not ckpt's pidinit.S

    @classmethod
    def make(cls, courier_at: int = 3) -> PidNamespace:
        """`courier_at`: the lowest fd ckpt's pidfd may take in the init; above every fd of the root
        when the init is to become the root (`as_root`), so that none of its own lands on it."""
        launcher = spawn_helper(None)
        lr: Remote | None = None
        try:
            lr = Remote(launcher.pid, SITE)
            courier = lr.check("opening a pidfd of ckpt in the launcher", PIDFD_OPEN, os.getpid(), 0)
            # Above 0-2 (ckpt may run without one of them: that one stays free, as in any helper).
            # Exactly there (dup3): a gap between the root's fds may be below an fd the launcher has.
            at = max(courier_at, 3)
            if courier != at:
                lr.check("moving ckpt's pidfd", nr.DUP3, courier, at, 0)
                lr.check("moving ckpt's pidfd", nr.CLOSE, courier)
                courier = at
            # exit_signal 0: with CLONE_PARENT the child takes the launcher's own (SIGCHLD).
            lr.write(ARGS_AT, struct.pack("<10Q", CLONE_NEWPID | CLONE_PARENT, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            pid = lr.syscall(SYS_CLONE3, ARGS_AT, 80)
            if pid <= 0:
                why = "needs CAP_SYS_ADMIN" if pid == -1 else os.strerror(-pid)
                raise RestoreError(f"--pidns: cannot make a new pid namespace: clone3 failed: {why}")
            _seize(pid)
        finally:
            if lr is not None:
                lr.close()
            kill_helper(launcher.pid)
        r: Remote | None = None
        try:
            # Before anything can reach it: a SIGCHLD taken while stopped would be lost to the init.
            raw.setsigmask(pid, ALL_SIGNALS)
            r = Remote(pid, SITE)
            # 0-2 stay until start(): the root's helper, forked from the init, takes them as any
            # helper takes ckpt's (a dumped fd 0-2 on a pipe to outside becomes ckpt's, pipes.py).
            if courier > 3:
                r.check("closing the init's fds", nr.CLOSE_RANGE, 3, courier - 1, 0)
            r.check("closing the init's fds", nr.CLOSE_RANGE, courier + 1, 0xFFFFFFFF, 0)
            ns = cls(pid, r, _ns(pid), courier)
        except BaseException as e:
            if r is not None:  # its /proc/PID/mem fd: a `ckpt serve` would keep one per failure
                r.close()
            kill_helper(pid)
            if isinstance(e, OSError):
                raise RestoreError(f"--pidns: cannot set up the new pid namespace's init: {e}") from None
            raise
        _couriers[ns.ino] = courier
        return ns

    def as_root(self) -> Helper:
        """The init itself as the root's helper: the dumped process was its namespace's init (pid 1
        inside: `unshare --pid --fork PROGRAM`), and is restored as this one's, as CRIU restores a
        pid namespace's root task. Its children are forked from it with their pids inside; it keeps
        ckpt's pidfd for them (and for itself) until its own fds are set (`drop_courier`); the
        kernel then treats it as the init it was (it reaps orphans, its end ends the namespace)."""
        self.is_root = True
        self.remote.close()  # (the restore drives it through its own Remote)
        raw.setsigmask(self.init, 0)  # as any helper: signals that reach it are ptrace stops
        _root_couriers[self.init] = self.courier
        return Helper(self.init, 1, "")

    def fork(self, want: int) -> Helper:
        """The root's helper: a child of the init, with pid `want` inside the namespace."""
        from ckpt.restore.tree import _fork

        h = _fork(self.remote, want, signal.SIGCHLD)
        require_kept(h)
        raw.setsigmask(h.pid, 0)  # not the init's all-blocked mask it was forked with
        return h

    def start(self, root: int) -> None:
        """Let the init run its code (pidinit.S) for the root, pid `root` inside the namespace. An
        init that is the root (`as_root`) runs as the root, let go with the tree."""
        if self.is_root:
            _couriers.pop(self.ino, None)
            if _root_couriers.pop(self.init, None) is not None:
                raise RestoreError("internal: ckpt's pidfd was left open in the restored init")
            return
        r = self.remote
        r.write(INIT_AT, INIT_CODE[:INIT_ROOT_OFF] + struct.pack("<ii", root, 0))
        # ckpt's pidfd and stdio: the init holds nothing (a pipe it kept open would hold off its
        # reader's end of file until the root ends).
        r.check("closing the init's fds", nr.CLOSE_RANGE, 0, 0xFFFFFFFF, 0)
        r.write(NAME_AT, b"ckpt-init\0")  # its name in ps (its command line stays the stub's)
        r.check("naming the init", nr.PRCTL, nr.PR_SET_NAME, NAME_AT)
        _couriers.pop(self.ino, None)
        regs = raw.getregs(self.init)
        regs.rip, regs.orig_rax = INIT_AT, MASK64
        raw.setregs(self.init, regs)
        r.close()
        if os.environ.get("CKPT_RESTORE_TEST_FAIL_INIT_START") == "1":
            # Tests: its last step fails, every process of the namespace built and still stopped.
            raise RestoreError("test: the init of the new pid namespace could not be let go")
        try:
            raw.detach(self.init, 0)
        except OSError as e:
            raise RestoreError(f"cannot let the init of the new pid namespace run: {e.strerror}") from None

    def kill(self) -> None:
        """Kill the init, hence every process of the namespace (idempotent)."""
        _couriers.pop(self.ino, None)
        _root_couriers.pop(self.init, None)
        self.remote.close()
        kill_helper(self.init)


def require_kept(h: Helper) -> None:
    if h.pid_note:
        raise RestoreError(f"--pidns: {h.pid_note}")


__all__ = [
    "PidNamespace",
    "courier_at",
    "drop_courier",
    "inner",
    "inside_pids",
    "inside_tid",
    "kept_fd",
    "open_pidfd",
    "outer_child",
    "outer_tid",
    "refuse_nested",
    "refuse_pid_one",
    "root_notes",
]
