"""Shared objects recreated before the mappings and fds that use them (ckpt/image/objects.py):
memfds (memfd_create with their name), deleted files (CRIU's ghost files: created under their own
name when it is free, or with O_TMPFILE in their directory, and unlinked at once) and SysV shared
memory segments (shmget, with their id when /proc/sys/kernel/shm_next_id lets us choose it).

Each is created once by a syscall injected into the helper, while it still has ckpt's credentials
(so that its owner and mode can be given back), and filled by ckpt itself through
/proc/HELPER/fd/N (memfds, ghosts) or its own attach (SysV: a segment has no write()). The helper's
fd of each object sits above every fd number of the process until every mapping and fd of it is in
place: mappings are made from it, the process's fds are new opens of /proc/self/fd/N with the
dumped flags. Seals go on last (a write seal refuses while a writable shared mapping exists, and the
original had none), then the helper's fds are closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass, field
from typing import Any

from ckpt import sysno as nr
from ckpt.errors import CkptError, RestoreError
from ckpt.image.objects import ObjectRecord
from ckpt.restore.pipes import fetch_fd
from ckpt.restore.plan import RestorePlan, VmaPlan
from ckpt.restore.remote import Remote

SHMGET, SHMAT, SHMCTL = 29, 30, 31
FCHMOD, FCHOWN = 91, 93
UNLINK = 87
MKDIR, RMDIR = 83, 84
MEMFD_CREATE = 319
MFD_CLOEXEC, MFD_ALLOW_SEALING = 1, 2
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW = 0o1, 0o100, 0o200, 0o400000
O_TMPFILE = 0o20200000
IPC_CREAT, IPC_EXCL, IPC_RMID, IPC_SET, IPC_STAT = 0o1000, 0o2000, 0, 1, 2
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
SHM_NEXT_ID = "/proc/sys/kernel/shm_next_id"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmdt.argtypes = [ctypes.c_void_p]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]


@dataclass
class Objects:
    """The helper's fd of each object (by its index in plan.objects) and the new SysV ids."""

    fds: dict[int, int] = field(default_factory=dict)
    ro: dict[int, int] = field(default_factory=dict)  # read-only reopens, for shared read-only mappings
    shmids: dict[int, int] = field(default_factory=dict)
    created_shm: list[int] = field(default_factory=list)  # removed again if the restore fails

    def abort(self) -> None:
        """A failed restore: segments it created go (the helper's death closes everything else)."""
        for shmid in self.created_shm:
            _libc.shmctl(shmid, IPC_RMID, None)
        self.created_shm.clear()


def objects_key(plan: RestorePlan) -> tuple[Any, ...]:
    """For a warm restore (ckpt/migrate/warm.py): objects are made and filled once, in prepare, so
    any change to one between rounds makes the final restore a cold one."""
    return tuple(
        (o.kind, o.dev, o.ino, o.size, o.seals, o.digest or tuple(e.data for e in o.extents))
        for o in plan.objects
    )


def used_objects(plan: RestorePlan) -> set[int]:
    return {p.obj for p in plan.vmas if p.obj >= 0} | {f.obj for f in plan.fds if f.action == "object"}


def create_objects(remote: Remote, plan: RestorePlan) -> Objects:
    objs = Objects()
    used = sorted(used_objects(plan))
    if not used:
        return objs
    base = max([f.fd for f in plan.fds] + [2]) + 1
    limit = os.sysconf("SC_OPEN_MAX")
    if base + 2 * len(used) >= limit:
        raise RestoreError(
            f"the process's {len(used)} shared objects need fds {base}..{base + 2 * len(used)}, "
            f"above the limit on open files ({limit})"
        )
    need = sum(plan.objects[i].stored_bytes for i in used if plan.objects[i].kind != "ghost")
    avail = _available()
    if avail is not None and need > avail:
        raise RestoreError(
            f"the layer's memfds and SysV segments hold {need} bytes, more than the {avail} available"
        )
    nxt = base
    try:
        for i in used:
            o = plan.objects[i]
            what = o.label()
            if o.held_by and i not in plan.shared_objects:  # (the tree restore makes those)
                raise RestoreError(f"{what}: its contents are in the layer of pid {o.held_by}, not here")
            if o.kind == "sysv":
                # One segment several processes of a tree attach: made once (restore/treeobjects.py).
                shared = plan.shared_objects.get(i)
                objs.shmids[i] = _sysv(plan, o, objs) if shared is None else shared
                continue
            if i in plan.shared_objects:  # made once for the whole tree, filled (restore/treeobjects.py)
                fd = fetch_fd(remote, os.getpid(), plan.shared_objects[i], f"taking {what} from ckpt")
            else:
                fd = _memfd(remote, o) if o.kind == "memfd" else _ghost(remote, o, plan)
                _fill(remote.pid, fd, o)
                remote.check(f"giving {what} its owner", FCHOWN, fd, o.uid, o.gid)
                remote.check(f"giving {what} its mode", FCHMOD, fd, o.mode & 0o7777)
            high = remote.check(f"moving the fd of {what}", nr.FCNTL, fd, nr.F_DUPFD_CLOEXEC, nxt)
            remote.check(f"moving the fd of {what}", nr.CLOSE, fd)
            objs.fds[i] = high
            nxt = high + 1
    except BaseException:
        objs.abort()
        raise
    return objs


def _available() -> int | None:
    from ckpt.proc.meminfo import available

    return available()


def _memfd(remote: Remote, o: ObjectRecord) -> int:
    name = os.fsencode(o.name)
    if len(name) > 249:
        raise RestoreError(f"{o.label()}: a memfd name of {len(name)} bytes (at most 249)")
    return remote.check(
        f"creating {o.label()}", MEMFD_CREATE, remote.put(name + b"\0"), MFD_CLOEXEC | MFD_ALLOW_SEALING
    )


def _ghost(remote: Remote, o: ObjectRecord, plan: RestorePlan) -> int:
    """Under its own name when that is free (so that /proc/PID/fd shows it as it was), unlinked at
    once; else an O_TMPFILE in its directory."""
    flags = nr.O_RDWR | nr.O_CLOEXEC | O_NOFOLLOW
    at = nr.AT_FDCWD & (2**64 - 1)
    fd = remote.syscall(nr.OPENAT, at, remote.put_str(o.name), flags | O_CREAT | O_EXCL, 0o600)
    if fd >= 0:
        r = remote.syscall(UNLINK, remote.put_str(o.name))
        if r < 0:
            remote.syscall(nr.CLOSE, fd)
            raise RestoreError(f"recreating {o.label()}: cannot unlink it again: {os.strerror(-r)}")
        return fd
    d = os.path.dirname(o.name) or "/"
    fd = remote.syscall(nr.OPENAT, at, remote.put_str(d), nr.O_RDWR | nr.O_CLOEXEC | O_TMPFILE, 0o600)
    if fd < 0:
        raise RestoreError(f"cannot recreate {o.label()} in {d}: {os.strerror(-fd)}")
    plan.warnings.append(f"{o.label()}: its name was taken; recreated unnamed in {d}")
    return fd


def _fill(helper: int, fd: int, o: ObjectRecord) -> None:
    try:
        w = os.open(f"/proc/{helper}/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise RestoreError(f"cannot fill {o.label()}: {e.strerror}") from None
    try:
        os.ftruncate(w, o.size)
        for ext in o.extents:
            data = ext.bytes(o.label())
            done = 0
            while done < len(data):
                done += os.pwrite(w, data[done:], ext.offset + done)
    except CkptError as e:
        raise RestoreError(f"cannot restore: {e}") from None
    except OSError as e:
        raise RestoreError(f"cannot fill {o.label()}: {e.strerror}") from None
    finally:
        os.close(w)


# -- SysV ------------------------------------------------------------------------------------------
def _sysv(plan: RestorePlan, o: ObjectRecord, objs: Objects) -> int:
    """The segment, created with its key (or private) in ckpt's IPC namespace, which the helper
    shares; filled through an attach of ckpt's own. One left behind by the dumped process (same key
    and size, attached by nobody) is taken over and overwritten."""
    key = 0 if o.removed else o.key
    mode = o.mode & 0o777
    shmid = -1
    if key:
        shmid = _libc.shmget(key, 0, 0)
    new = shmid < 0
    if new:
        kept = _choose_next_id(o.ino)
        shmid = _libc.shmget(key, o.size, IPC_CREAT | IPC_EXCL | mode)
        if shmid < 0:
            err = ctypes.get_errno()
            if kept:
                with contextlib.suppress(OSError):
                    _write(SHM_NEXT_ID, "-1")
            raise RestoreError(f"cannot create {o.label()}: {os.strerror(err)}")
        objs.created_shm.append(shmid)
        if shmid != o.ino:
            plan.warnings.append(
                f"{o.label()} was restored with id {shmid}: a process that kept its id would not find it"
            )
    _set_owner(shmid, o)
    addr = _libc.shmat(shmid, None, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise RestoreError(f"cannot attach {o.label()} to fill it: {os.strerror(ctypes.get_errno())}")
    try:
        if not new:
            ctypes.memset(addr, 0, o.size)
        for ext in o.extents:
            data = ext.bytes(o.label())
            ctypes.memmove(addr + ext.offset, data, len(data))
    except CkptError as e:
        raise RestoreError(f"cannot restore: {e}") from None
    finally:
        _libc.shmdt(addr)
    return shmid


def _choose_next_id(shmid: int) -> bool:
    """Ask for the dumped id (CRIU does the same; root only, and racy with others creating
    segments at this moment: the id obtained is checked)."""
    try:
        _write(SHM_NEXT_ID, str(shmid))
        return True
    except OSError:
        return False


def _write(path: str, s: str) -> None:
    with open(path, "w") as f:
        f.write(s)


def _set_owner(shmid: int, o: ObjectRecord) -> None:
    buf = ctypes.create_string_buffer(256)  # struct shmid_ds (112 bytes on x86_64)
    if _libc.shmctl(shmid, IPC_STAT, buf) < 0:
        raise RestoreError(f"cannot read {o.label()}: {os.strerror(ctypes.get_errno())}")
    uid, gid = int.from_bytes(buf.raw[4:8], "little"), int.from_bytes(buf.raw[8:12], "little")
    mode = int.from_bytes(buf.raw[20:22], "little")
    if (uid, gid, mode & 0o777) == (o.uid, o.gid, o.mode & 0o777):
        return
    ctypes.memmove(ctypes.addressof(buf) + 4, o.uid.to_bytes(4, "little"), 4)
    ctypes.memmove(ctypes.addressof(buf) + 8, o.gid.to_bytes(4, "little"), 4)
    ctypes.memmove(ctypes.addressof(buf) + 20, ((mode & ~0o777) | (o.mode & 0o777)).to_bytes(2, "little"), 2)
    if _libc.shmctl(shmid, IPC_SET, buf) < 0:
        raise RestoreError(f"cannot give {o.label()} its owner: {os.strerror(ctypes.get_errno())}")


# -- mappings --------------------------------------------------------------------------------------
def map_object(remote: Remote, objs: Objects, plan: RestorePlan, p: VmaPlan) -> bool:
    """Map one mapping of an object; True if it was made writable only to be filled."""
    v = p.vma
    o = plan.objects[p.obj]
    size = v.end - v.start
    what = f"mapping {v.path} [{v.start:#x}-{v.end:#x})"
    if p.kind == "sysv":
        if v.offset:
            return False  # made by the attach at the start of the segment
        flags = 0 if "w" in v.perms or "mw" in v.flag_set else SHM_RDONLY
        flags |= SHM_EXEC if "x" in v.perms else 0
        got = remote.check(what, SHMAT, objs.shmids[p.obj], v.start, flags)
        if got != v.start:
            raise RestoreError(f"{what} landed at {got:#x}")
        return False
    later = False
    prot = p.prot
    if p.kind == "obj":
        writable = v.perms[1] == "w" or "mw" in v.flag_set
        fd = objs.fds[p.obj] if writable else _read_only(remote, objs, p.obj, o)
        flags = nr.MAP_SHARED
    else:  # objpriv: the object's pages, with the process's own changes written over them
        fd = objs.fds[p.obj]
        flags = nr.MAP_PRIVATE | (nr.MAP_NORESERVE if p.noreserve else 0)
        later = p.fill and not prot & nr.PROT_WRITE
        if later:
            prot |= nr.PROT_WRITE
    got = remote.check(what, nr.MMAP, v.start, size, prot, flags | nr.MAP_FIXED_NOREPLACE, fd, v.offset)
    if got != v.start:
        raise RestoreError(f"{what} landed at {got:#x}")
    return later


def sysv_pieces(plan: RestorePlan) -> list[VmaPlan]:
    """Mappings of an attach that mprotect split: given their own protection with the others."""
    return [p for p in plan.vmas if p.kind == "sysv"]


def _read_only(remote: Remote, objs: Objects, i: int, o: ObjectRecord) -> int:
    if i not in objs.ro:
        path = remote.put_str(f"/proc/self/fd/{objs.fds[i]}")
        fd = remote.check(f"opening {o.label()} read-only", nr.OPENAT, nr.AT_FDCWD & (2**64 - 1), path,
                          nr.O_RDONLY | nr.O_CLOEXEC, 0)  # fmt: skip
        objs.ro[i] = remote.check(f"moving the fd of {o.label()}", nr.FCNTL, fd, nr.F_DUPFD_CLOEXEC,
                                  max([*objs.fds.values(), *objs.ro.values()]) + 1)  # fmt: skip
        remote.check(f"moving the fd of {o.label()}", nr.CLOSE, fd)
    return objs.ro[i]


def object_path(objs: Objects, i: int) -> str:
    """What the process's own fd of object `i` is opened from."""
    return f"/proc/self/fd/{objs.fds[i]}"


# -- last ------------------------------------------------------------------------------------------
def finish_objects(remote: Remote, plan: RestorePlan, objs: Objects) -> None:
    """Seals, removals (IPC_RMID of segments the process had removed), and the helper's fds closed."""
    for i, fd in objs.fds.items():
        o = plan.objects[i]
        if o.kind == "memfd" and o.seals and i not in plan.shared_objects:  # (those: by ckpt, last)
            remote.check(f"sealing {o.label()} ({o.seals:#x})", nr.FCNTL, fd, F_ADD_SEALS, o.seals)
    for fd in [*objs.ro.values(), *objs.fds.values()]:
        remote.syscall(nr.CLOSE, fd)
    objs.ro.clear()
    objs.fds.clear()
    for i, shmid in objs.shmids.items():
        o = plan.objects[i]
        if o.removed and i not in plan.shared_objects and _libc.shmctl(shmid, IPC_RMID, None) < 0:
            raise RestoreError(f"cannot remove {o.label()} again: {os.strerror(ctypes.get_errno())}")
