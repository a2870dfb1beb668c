"""Memfds, deleted files and SysV segments that several processes of a tree use (python's
multiprocessing: its POSIX semaphores are /dev/shm files, deleted right after sem_open and mapped
shared by every process of the pool), made once for the whole tree.

Which processes share an object comes from the layers' object records (kind, device, inode:
restore/treeplan.py). ckpt itself makes the object, as a single process's restore makes it in its
helper (restore/objects.py): a memfd with its name, a deleted file under its own name (unlinked at
once; else an O_TMPFILE in its directory), filled with the contents the first holder's layer stored,
given its owner and mode. Every holder's helper then takes that one object from ckpt
(pidfd_getfd) where it would have made its own, and maps it at the dumped addresses with the dumped
flags, and opens its fds of it: the processes share one object again, so the futexes in it
(a semaphore's count and waiters) are one too. Memfd seals go on last, once every process is built.

A futex wait blocked at dump (sem_wait) restarts as any blocked syscall (docs/restore.md): the
kernel keys a shared futex by the object's inode and offset, which all holders share again, and
the semaphore's count and waiter count are in the object's bytes, as they were at the freeze.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from array import array
from collections.abc import Mapping
from typing import Any

from ckpt.errors import RestoreError
from ckpt.image.chain import STATE_ABSENT
from ckpt.image.objects import ObjectRecord
from ckpt.image.tree import TreeRecord
from ckpt.restore.objects import F_ADD_SEALS, F_GET_SEALS, IPC_RMID, Objects, _fill, _sysv, used_objects
from ckpt.restore.objects import _libc as _ipc
from ckpt.restore.plan import RestorePlan
from ckpt.restore.treeplan import TREE_SHARED_OBJECTS, shared_anon, shared_objects

O_TMPFILE = 0o20200000
PROT_RW = 3
MAP_SHARED, MAP_ANONYMOUS = 0x01, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class TreeObjects:
    """ckpt's own fd of each shared object, until every process has taken it."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._seals: list[tuple[int, ObjectRecord]] = []
        self._by_id: dict[tuple[int, int], int] = {}  # (dev, ino) the processes saw -> ckpt's fd
        self._shm = Objects()  # SysV segments made here: removed again if the restore fails (abort)
        self._rmid: list[tuple[int, ObjectRecord]] = []

    def fd_of(self, dev: int, ino: int) -> int | None:
        """ckpt's fd of the shared object an fd record (dev, ino) names, if it is one."""
        return self._by_id.get((dev, ino))

    def make(self, tree: TreeRecord, records: Mapping[int, Any], plans: Mapping[int, RestorePlan]) -> None:
        order = {p.pid: i for i, p in enumerate(tree.processes)}
        used = {p: used_objects(plan) for p, plan in plans.items()}  # once per process, not per object
        for so in shared_objects(records):
            if so.kind not in TREE_SHARED_OBJECTS:
                continue  # refused (treeplan.shared_refusals)
            users = sorted(so.users, key=lambda p: order.get(p, len(order)))
            found = {p: _index(plans[p], used[p], so.key) for p in users if p in plans}
            using = [p for p in users if found.get(p) is not None]
            if not using:
                continue  # none of them maps or opens it after all
            # Its contents: in the layer of the member that stored them for the tree (the others'
            # records name it: held_by, ckpt/treeshare.py), or of any (older dumps stored it in each).
            first = next((p for p in using if not plans[p].objects[found[p] or 0].held_by), None)
            if first is None:
                o = plans[using[0]].objects[found[using[0]] or 0]
                raise RestoreError(
                    f"{o.label()}: its contents are in the layer of pid {o.held_by}, which does not hold it"
                )
            i = found[first]
            assert i is not None
            o = plans[first].objects[i]
            if o.kind == "sysv":
                fd = self._sysv(o, plans[first])
            else:
                fd = self._create(o, plans[first])
                self._by_id[(o.dev, o.ino)] = fd
            for p, j in found.items():
                if j is not None:
                    plans[p].shared_objects[j] = fd
            if o.kind == "memfd" and o.seals:
                self._seals.append((fd, o))

    def make_shm(
        self, records: Mapping[int, Any], plans: Mapping[int, RestorePlan], tree: TreeRecord | None = None
    ) -> None:
        """Shared anonymous memory mapped by several processes: one object made by ckpt (a
        MAP_SHARED|MAP_ANONYMOUS mapping of its own, whose shmem file it keeps open through
        /proc/self/map_files and then unmaps), of the size the largest mapping of it needs. Each
        holder maps it where a lone restore would make its own (memory.py _map_shm), so the maps
        still say `/dev/zero (deleted)`; each fills its own mappings from its own layer (all were
        frozen at one moment: the same bytes), but for the mappings the dump stored once, in
        another holder's layer (the tree record's shared_maps: ckpt/treeshare.py), which that
        holder fills."""
        for key, (size, users) in shared_anon(records).items():
            fd = self._anon(size)
            for p in users:
                if p in plans:
                    plans[p].shared_shm[key] = fd
        for pid, start, end, holder in tree.shared_maps if tree is not None else []:
            for vp in plans[pid].vmas if pid in plans else []:
                if not vp.vma.start <= start < end <= vp.vma.end or vp.kind != "shm":
                    continue  # (memfds and SysV segments: filled from their object anyway)
                key = (vp.vma.dev, vp.vma.inode)
                mapped = holder in plans and key in plans[holder].shared_shm
                if not mapped or key not in plans[pid].shared_shm:
                    raise RestoreError(
                        f"pid {pid}: the pages of its shared memory at [{start:#x}-{end:#x}) are in the "
                        f"layer of pid {holder}, which does not map it"
                    )
                if (vp.vma.start, vp.vma.end) == (start, end):
                    vp.fill = False
                else:  # a piece of it: those pages left out of its fill (an older layer of its
                    _leave_unfilled(plans[pid], start, end)  # chain may hold stale ones there)

    def _sysv(self, o: ObjectRecord, plan: RestorePlan) -> int:
        """One segment for every process that attached it: created (with its key and, where the
        kernel lets ckpt choose, its id) and filled by ckpt as a lone process's restore does; each
        helper attaches it by that id. A removed one (IPC_RMID: IPC_PRIVATE now) is removed again
        once every process has attached it (seal), so that it lives exactly as long as they do."""
        shmid = _sysv(plan, o, self._shm)
        if o.removed:
            self._rmid.append((shmid, o))
        return shmid

    def _anon(self, size: int) -> int:
        what = f"shared anonymous memory of {size} bytes"
        addr = _libc.mmap(None, size, PROT_RW, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if addr in (None, MAP_FAILED):
            raise RestoreError(f"cannot make {what}: {os.strerror(ctypes.get_errno())}")
        try:
            fd = os.open(f"/proc/self/map_files/{addr:x}-{addr + size:x}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise RestoreError(f"cannot open the {what} it made: {e.strerror}") from None
        finally:
            _libc.munmap(addr, size)
        self.fds.append(fd)
        return fd

    def _create(self, o: ObjectRecord, plan: RestorePlan) -> int:
        what = o.label()
        try:
            if o.kind == "memfd":
                fd = os.memfd_create(o.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            else:
                fd = self._ghost(o, plan)
        except OSError as e:
            raise RestoreError(f"cannot recreate {what}: {e.strerror}") from None
        self.fds.append(fd)
        _fill(os.getpid(), fd, o)
        try:
            os.fchown(fd, o.uid, o.gid)
            os.fchmod(fd, o.mode & 0o7777)
        except OSError as e:
            raise RestoreError(f"cannot give {what} its owner and mode: {e.strerror}") from None
        return fd

    @staticmethod
    def _ghost(o: ObjectRecord, plan: RestorePlan) -> int:
        """Under its own name when that is free (its processes' maps show it as before), unlinked at
        once; else an O_TMPFILE in its directory (restore/objects.py does the same in a helper)."""
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(o.name, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            d = os.path.dirname(o.name) or "/"
            plan.warnings.append(f"{o.label()}: its name was taken; recreated unnamed in {d}")
            return os.open(d, os.O_RDWR | os.O_CLOEXEC | O_TMPFILE, 0o600)
        try:
            os.unlink(o.name)
        except OSError:
            os.close(fd)
            raise
        return fd

    def seal(self) -> None:
        """Seals last: a write seal refuses while a writable shared mapping exists (the original
        processes had none, or the seal could not have been added). Removed SysV segments are
        removed again, now that every process holds its attach."""
        for shmid, o in self._rmid:
            if _ipc.shmctl(shmid, IPC_RMID, None) < 0:
                raise RestoreError(f"cannot remove {o.label()} again: {os.strerror(ctypes.get_errno())}")
        self._rmid = []
        for fd, o in self._seals:
            try:
                have = fcntl.fcntl(fd, F_GET_SEALS)
                if o.seals & ~have:
                    fcntl.fcntl(fd, F_ADD_SEALS, o.seals & ~have)
            except OSError as e:
                raise RestoreError(f"sealing {o.label()} ({o.seals:#x}): {e.strerror}") from None

    def abort(self) -> None:
        """A failed restore: the SysV segments made for it go."""
        self._shm.abort()
        self._rmid = []

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self._seals = []
        self._by_id = {}


def _index(plan: RestorePlan, used: set[int], key: tuple[str, int, int]) -> int | None:
    """The object's index in the plan, when the restore maps or opens it (`used`: used_objects(plan))."""
    for i, o in enumerate(plan.objects):
        if (o.kind, o.dev, o.ino) == key and i in used:
            return i
    return None


def _leave_unfilled(plan: RestorePlan, start: int, end: int) -> None:
    """The pages of [start, end) taken as absent from the process's chain: its fill writes none."""
    t = plan.table
    lo, hi = t.rows(start, end)
    if hi <= lo:
        return
    state: Any = t.state
    try:
        state[lo:hi] = STATE_ABSENT  # numpy columns
    except TypeError:  # array.array("B") columns (a small table)
        state[lo:hi] = array("B", bytes([STATE_ABSENT]) * (hi - lo))


__all__ = ["TreeObjects"]
