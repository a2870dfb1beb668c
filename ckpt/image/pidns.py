"""The pidns record (format 6): a process's ids in its own pid namespace, when that is not ckpt's.

A dump records pids as ckpt sees them (its /proc's numbering): the layer's pid, its threads' tids,
the tree's pids and groups. A process dumped inside a pid namespace below ckpt's (a container's)
saw other numbers: `getpid()`, `gettid()`, `getppid()`, the pids `fork()` returned to it. This
record keeps those (the last entry of each NSpid/NStgid/NSpgid/NSsid line of /proc/PID/status) and
the namespace's inode, so that `restore --pidns` can give the process exactly what it saw. It is
written only for such a process: its absence (and every layer before version 6) means the process
saw ckpt's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckpt.image.validate import as_int, as_list, as_map, fail, get

MAX_PID = 1 << 22  # PID_MAX_LIMIT
MAX_DEPTH = 32  # MAX_PID_NS_LEVEL
MAX_THREADS = 1 << 22


@dataclass
class PidNsRecord:
    ino: int  # the namespace's inode (/proc/PID/ns/pid): processes of one namespace share it
    depth: int  # how many namespaces below ckpt's /proc it is (1: a child namespace of ckpt's)
    pid: int  # getpid() as the process saw it
    ppid: int  # getppid(): 0 when its parent was outside the namespace (it was the namespace's init)
    pgid: int  # getpgrp(): 0 when the group's leader was outside the namespace
    sid: int  # getsid(0), likewise
    tids: dict[int, int] = field(default_factory=dict)  # the layer's tid (ckpt's) -> gettid() inside

    def inner_tid(self, tid: int) -> int:
        return self.pid if tid == self.pid else self.tids.get(tid, tid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ino": self.ino,
            "depth": self.depth,
            "pid": self.pid,
            "ppid": self.ppid,
            "pgid": self.pgid,
            "sid": self.sid,
            "tids": [[t, i] for t, i in sorted(self.tids.items())],
        }

    @classmethod
    def from_dict(cls, v: Any, where: str = "pidns") -> PidNsRecord:
        d = as_map(v, where)

        def num(k: str, lo: int = 0, hi: int = MAX_PID) -> int:
            return as_int(get(d, k, where), f"{where}.{k}", lo, hi)

        tids: dict[int, int] = {}
        inners: set[int] = set()  # (a set: a hostile list of 4M pairs must not cost 4M**2 compares)
        for i, pair in enumerate(as_list(d.get("tids", []), f"{where}.tids", MAX_THREADS)):
            w = f"{where}.tids[{i}]"
            q = as_list(pair, w, 2)
            if len(q) != 2:
                fail(w, "expected [tid, tid inside]")
            outer, inner = (as_int(x, w, 1, MAX_PID) for x in q)
            if outer in tids or inner in inners:
                fail(w, f"tid {outer} or {inner} appears twice")
            tids[outer] = inner
            inners.add(inner)
        rec = cls(
            ino=num("ino", 1, (1 << 64) - 1),
            depth=num("depth", 1, MAX_DEPTH),
            pid=num("pid", 1),
            ppid=num("ppid"),
            pgid=num("pgid"),
            sid=num("sid"),
            tids=tids,
        )
        if rec.pid in inners:
            fail(f"{where}.tids", f"a thread has the process's own id {rec.pid}")
        return rec


def check_threads(rec: PidNsRecord, pid: int, tids: set[int]) -> None:
    """Every tid the record maps is one of the layer's threads, and each other thread has one."""
    others = tids - {pid}
    if set(rec.tids) != others:
        fail("pidns.tids", "does not name exactly the layer's threads other than the main one")


__all__ = ["PidNsRecord", "check_threads"]
