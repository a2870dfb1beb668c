"""The plan's checks for memfds, deleted files, SysV segments, O_PATH fds, namespace handles and a
deleted working directory (called from plan.py; the objects themselves: restore/objects.py)."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from ckpt.image.format import PAGE_SIZE, FdRecord, VmaRecord
from ckpt.image.objects import ObjectRecord, vma_dev
from ckpt.proc.objects import DELETED, SYSV_RE, is_ghost_path, is_memfd_path, read_sysv
from ckpt.proc.tree import children
from ckpt.sysvmap import is_sysv_path

if TYPE_CHECKING:
    from ckpt.restore.plan import FdPlan, VmaPlan

O_PATH = 0o10000000
O_NOFOLLOW = 0o400000
NS_RE = re.compile(r"([a-z_]+):\[(\d+)\]\Z")
# The names of /proc/self/ns/* whose links read TYPE:[INODE] (pid_for_children reads pid:[...]).
NS_TYPES = frozenset({"cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"})


def object_backed(path: str) -> bool:
    return is_memfd_path(path) or is_ghost_path(path) or bool(SYSV_RE.match(path))


def find(c: Any, v: VmaRecord) -> tuple[int, ObjectRecord] | None:
    """The object record of a mapping: a SysV segment's by its path, as its "inode" (its id, 0 for a
    namespace's first) may be a memfd's too (ckpt/sysvmap.py)."""
    dev = vma_dev(v.dev)
    sysv = is_sysv_path(v.path)
    for i, o in enumerate(c.objects):
        if o.dev == dev and o.ino == v.inode and (o.kind == "sysv") == sysv:
            return i, o
    return None


def private_ok(c: Any, v: VmaRecord) -> bool:
    """A private mapping of a memfd or deleted file whose contents the layer holds (else it is
    rebuilt as before: from the image alone, which must then hold every page)."""
    found = find(c, v)
    return found is not None and found[1].stored and found[1].kind != "sysv"


def _find_fd(c: Any, f: FdRecord) -> tuple[int, ObjectRecord] | None:
    for i, o in enumerate(c.objects):
        if o.kind != "sysv" and o.dev == f.dev and o.ino == f.ino:
            return i, o
    return None


def _sane(c: Any, o: ObjectRecord) -> bool:
    """Names a restore creates files or memfds by: a ghost's is an absolute, normalised path (it is
    created there, as root, for an instant); no NUL anywhere."""
    bad = "\0" in o.name
    if o.kind == "ghost":
        bad = bad or not o.name.startswith("/") or os.path.normpath(o.name) != o.name
        bad = bad or len(os.fsencode(o.name)) >= 4096
    if bad:
        c.problems.append(f"{o.kind} object {o.name!r}: not a name a restore can create")
    return not bad


def _not_stored(o: ObjectRecord) -> str:
    return f"{o.label()} of {o.size} bytes: its contents are not in the layer ({o.why})"


def _held_elsewhere(c: Any, o: ObjectRecord, what: str) -> bool:
    """An object a tree dump stored once, in another member's layer (ckpt/treeshare.py): only the
    tree's restore, which makes it once for all its holders, can give it back."""
    if o.held_by and not getattr(c, "in_tree", False):
        c.unsupported.append(
            f"{what} ({o.label()}: its contents are in the layer of pid {o.held_by} of the same tree "
            "dump: restore the tree from its root's layer)"
        )
        return True
    return False


def vma_plan(c: Any, v: VmaRecord, where: str, prot: int) -> VmaPlan | None:
    from ckpt.restore.plan import VmaPlan

    found = find(c, v)
    shared = v.perms[3] == "s"
    if found is None:
        kind = "a deleted file"
        if SYSV_RE.match(v.path) or is_memfd_path(v.path):
            kind = "SysV shared memory" if SYSV_RE.match(v.path) else "a memfd"
        c.unsupported.append(
            f"{where} ({kind} whose contents the layer does not hold: "
            "unreadable at dump time, or an older ckpt)"
        )
        return None
    i, o = found
    if not _sane(c, o):
        return None
    if not o.stored:
        if shared:
            c.unsupported.append(f"{where} ({_not_stored(o)})")
        return None
    if _held_elsewhere(c, o, where):
        return None
    if o.kind == "sysv":
        if not _sysv_ok(c, v, o, where):
            return None
        return VmaPlan(v, "sysv", prot, obj=i)
    return VmaPlan(v, "obj" if shared else "objpriv", prot, obj=i)


def _sysv_ok(c: Any, v: VmaRecord, o: ObjectRecord, where: str) -> bool:
    """An attach is one mapping of the whole segment from offset 0 (mprotect may have split it): a
    piece with an offset must follow the piece before it."""
    if v.offset:
        prev = next((x for x in c.top.vmas if x.end == v.start), None)
        same = prev is not None and (prev.inode, prev.path) == (v.inode, v.path)
        if prev is None or not same or prev.offset + (prev.end - prev.start) != v.offset:
            c.unsupported.append(f"{where} (part of a SysV segment whose other parts were unmapped)")
            return False
        return True
    run = v.end - v.start
    nxt = v
    while True:
        want = (v.inode, v.path, run)
        nxt2 = next(
            (x for x in c.top.vmas if x.start == nxt.end and (x.inode, x.path, x.offset) == want), None
        )
        if nxt2 is None:
            break
        run += nxt2.end - nxt2.start
        nxt = nxt2
    if run != -(-o.size // PAGE_SIZE) * PAGE_SIZE:
        c.unsupported.append(f"{where} (part of a SysV segment whose other parts were unmapped)")
        return False
    # At restore time only: at dump time the segment is the process's own, attached by it.
    if c.view is not None and not o.removed and o.key and not getattr(c, "_sysv_checked", {}).get(o.ino):
        c.__dict__.setdefault("_sysv_checked", {})[o.ino] = True
        for seg in read_sysv().values():
            if seg.key == o.key:
                if seg.size != o.size:
                    c.problems.append(f"{o.label()}: the key is in use by a segment of {seg.size} bytes")
                elif seg.nattch - _our_helpers_attaches(seg.shmid):
                    c.problems.append(
                        f"{o.label()}: the segment with its key is attached by {seg.nattch} processes"
                    )
    return True


def _our_helpers_attaches(shmid: int) -> int:
    """How many of the segment's attaches are our own restore helpers' (children we trace): a
    migration's warm restore made and attached it in an earlier round; those are not another
    process's (a copy that runs, a child of `ckpt serve` too, is traced by nobody)."""
    n = 0
    me = os.getpid()
    for kid in children(me):
        try:
            with open(f"/proc/{kid}/status") as f:
                tracer = next((int(ln.split()[1]) for ln in f if ln.startswith("TracerPid:")), 0)
            if not tracer or not os.path.exists(f"/proc/{me}/task/{tracer}"):
                continue
            with open(f"/proc/{kid}/maps") as f:
                n += any(
                    len(w) >= 6 and w[4] == str(shmid) and w[5].startswith("/SYSV") for w in map(str.split, f)
                )
        except (OSError, ValueError):
            continue  # gone meanwhile: not attached any more
    return n


def special_fd(f: FdRecord) -> bool:
    """fds that plan.check_fds leaves to this module."""
    return (
        bool(f.flags & O_PATH)
        or f.kind in ("memfd", "nsfs", "symlink")
        or (f.kind in ("file", "dir") and f.path.endswith(DELETED))
    )


def fd_plan(c: Any, f: FdRecord, what: str, flags: int) -> FdPlan | None:
    from ckpt.restore.plan import FdPlan

    if f.kind == "socket":
        from ckpt.restore.plansockets import listen_plan

        return listen_plan(c, f, what, flags)
    if f.kind == "nsfs" or (f.kind == "file" and NS_RE.match(f.path)):
        return _ns_plan(c, f, what, flags)
    if f.flags & O_PATH:
        # An O_PATH fd holds a place in the tree, nothing of the file: reopened by path, with
        # O_NOFOLLOW when it names a symlink itself.
        if not f.path.startswith("/") or f.path.endswith(DELETED):
            c.unsupported.append(f"{what} (an O_PATH fd of a deleted file)")
            return None
        try:
            st = os.lstat(f.path) if f.flags & O_NOFOLLOW or f.kind == "symlink" else os.stat(f.path)
        except OSError as e:
            c.problems.append(f"{what}: the file cannot be found now ({e.strerror})")
            return None
        if (st.st_dev, st.st_ino) != (f.dev, f.ino):
            c.problems.append(f"{what}: the path now names another file")
            return None
        return FdPlan(f.fd, "open", f, flags)
    if f.kind == "symlink":
        c.unsupported.append(f"{what} (a symlink opened without O_PATH)")
        return None
    if f.kind == "dir":
        c.unsupported.append(f"{what} (a deleted directory)")
        return None
    found = _find_fd(c, f)
    if found is None:
        kind = "a memfd" if f.kind == "memfd" else "a deleted file"
        c.unsupported.append(f"{what} ({kind} whose contents the layer does not hold)")
        return None
    i, o = found
    if not _sane(c, o):
        return None
    if not o.stored:
        c.unsupported.append(f"{what} ({_not_stored(o)})")
        return None
    if _held_elsewhere(c, o, what):
        return None
    return FdPlan(f.fd, "object", f, flags & ~O_NOFOLLOW, obj=i)


def _ns_plan(c: Any, f: FdRecord, what: str, flags: int) -> FdPlan | None:
    from ckpt.restore.plan import FdPlan

    m = NS_RE.match(f.path)
    kind = m.group(1) if m else "?"
    if m is None or kind not in NS_TYPES:
        c.unsupported.append(f"{what} (a namespace handle of an unknown kind)")
        return None
    here = f"/proc/self/ns/{kind}"
    try:
        st = os.stat(here)
    except OSError:
        st = None
    if st is None or st.st_ino != int(m.group(2)):
        c.unsupported.append(
            f"{what} (a handle on a {kind} namespace other than ckpt restore's: namespaces are not restored)"
        )
        return None
    return FdPlan(f.fd, "open", f, flags, path=here)


def check_deleted_cwd(c: Any, cwd: str) -> None:
    """A working directory that was removed: made again under its name (or a free one beside it),
    entered and removed (restore/files.py). Its parent must still be there."""
    parent = os.path.dirname(cwd[: -len(DELETED)])
    if not os.path.isdir(parent):
        c.problems.append(f"the working directory {cwd!r} was removed, and so was its parent {parent}")
