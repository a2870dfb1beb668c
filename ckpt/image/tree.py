"""The tree record (format 3): the processes of a dumped tree, kept in the root process's layer.

A tree dump writes one layer per live process: the root's in the dump directory itself (its chain is
the directory's chain), each other process's in a chain of its own under `tree/PID-STARTTIME/`. The
root's layer is written last and names every other layer with its digest, as a child layer names its
parent: the tree is restored from the root's layer, and damage to any member is found when it is
opened. Zombies have no layer: their wait status is all there is to them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ckpt.image.validate import as_int, as_list, as_map, as_str, fail, get

MAX_TREE = 4096  # processes in one tree
MAX_PID = 1 << 22
MAX_SHARED_MAPS = 1 << 20  # mappings stored once for the tree (a mapping per member and object)
_DIGEST_RE = re.compile(r"[0-9a-f]{32}\Z")
# Where a member's layer may be, relative to the root layer's directory: nowhere else (untrusted).
_LAYER_RE = re.compile(r"tree/\d{1,7}-\d{1,20}/layer-\d{4,}\.ckpt\Z")


@dataclass
class TreeProc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start_time: int = 0
    comm: str = ""
    layer: str | None = None  # relative to the root layer's directory; None: the root, or a zombie
    digest: str | None = None
    exit_status: int | None = None  # a zombie's wait status (as waitpid reports it); None: alive
    exit_signal: int = 17  # what its parent is sent when it ends (SIGCHLD, unless cloned otherwise)

    @property
    def zombie(self) -> bool:
        return self.exit_status is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "ppid": self.ppid,
            "pgid": self.pgid,
            "sid": self.sid,
            "start_time": self.start_time,
            "comm": self.comm,
            "layer": self.layer,
            "digest": self.digest,
            "exit_status": self.exit_status,
            "exit_signal": self.exit_signal,
        }

    @classmethod
    def from_dict(cls, v: Any, where: str) -> TreeProc:
        d = as_map(v, where)

        def w(k: str) -> str:
            return f"{where}.{k}"

        layer = d.get("layer")
        digest = d.get("digest")
        status = d.get("exit_status")
        if layer is not None:
            layer = as_str(layer, w("layer"), 256)
            if not _LAYER_RE.match(layer):
                fail(w("layer"), f"{layer!r} is not a layer under tree/ of the root's directory")
            digest = as_str(digest, w("digest"), 32)
            if not _DIGEST_RE.match(digest):
                fail(w("digest"), f"{digest!r} is not 32 lowercase hex digits")
        elif digest is not None:
            fail(w("digest"), "a digest without a layer")
        return cls(
            pid=as_int(get(d, "pid", where), w("pid"), 1, MAX_PID),
            ppid=as_int(get(d, "ppid", where), w("ppid"), 0, MAX_PID),
            pgid=as_int(get(d, "pgid", where), w("pgid"), 0, MAX_PID),
            sid=as_int(get(d, "sid", where), w("sid"), 0, MAX_PID),
            start_time=as_int(d.get("start_time", 0), w("start_time")),
            comm=as_str(d.get("comm", ""), w("comm"), 256),
            layer=layer,
            digest=digest,
            exit_status=None if status is None else _wait_status(status, w("exit_status")),
            exit_signal=as_int(d.get("exit_signal", 17), w("exit_signal"), 0, 64),
        )


def _wait_status(v: Any, where: str) -> int:
    """A status a zombie can have: exited with a code (low byte 0), or killed by a signal 1..64."""
    s = as_int(v, where, 0, 0xFFFF)
    sig = s & 0x7F
    if (sig == 0 and s & 0xFF) or (sig and (sig > 64 or s >> 8)):
        fail(where, f"{s:#x} is not the status of a process that ended")
    return s


@dataclass
class TreeRecord:
    """The root first, then every process after its parent."""

    processes: list[TreeProc] = field(default_factory=list)
    # Open file descriptions (regular files, directories) that two processes share, as
    # (pid, fd, pid, fd): their offset is one, which separate reopening would not give back.
    shared_files: list[tuple[int, int, int, int]] = field(default_factory=list)
    # Version 5: (pid, start, end, holder): shared memory mappings of `pid` whose pages the dump
    # stored once, in `holder`'s layer (ckpt/treeshare.py); the restore does not fill them in `pid`.
    shared_maps: list[tuple[int, int, int, int]] = field(default_factory=list)
    # Version 6: pid -> (its pid inside its own pid namespace, that namespace's inode), for each
    # process dumped in a pid namespace below ckpt's (zombies too, which have no layer of their own
    # to say it: image/pidns.py). Absent: every process saw ckpt's numbers.
    ns_pids: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def root(self) -> TreeProc:
        return self.processes[0]

    def children_of(self, pid: int) -> list[TreeProc]:
        return [p for p in self.processes[1:] if p.ppid == pid]

    def to_dict(self) -> dict[str, Any]:
        return {
            "processes": [p.to_dict() for p in self.processes],
            "shared_files": [list(s) for s in self.shared_files],
            **({"shared_maps": [list(m) for m in self.shared_maps]} if self.shared_maps else {}),
            **({"ns_pids": [[p, i, n] for p, (i, n) in self.ns_pids.items()]} if self.ns_pids else {}),
        }

    @classmethod
    def from_dict(cls, v: Any, where: str = "tree") -> TreeRecord:
        d = as_map(v, where)
        raw = as_list(get(d, "processes", where), f"{where}.processes", MAX_TREE)
        procs = [TreeProc.from_dict(p, f"{where}.processes[{i}]") for i, p in enumerate(raw)]
        if not procs:
            fail(f"{where}.processes", "an empty tree")
        if procs[0].layer is not None or procs[0].zombie:
            fail(f"{where}.processes[0]", "the root is the layer itself, and alive")
        seen: set[int] = set()
        for i, p in enumerate(procs):
            if p.pid in seen:
                fail(f"{where}.processes[{i}].pid", f"{p.pid} appears twice")
            if i and p.ppid not in seen:
                fail(f"{where}.processes[{i}].ppid", f"{p.ppid} is not a process listed before it")
            if i and (p.layer is None) != p.zombie:
                fail(f"{where}.processes[{i}].layer", "a live process needs a layer, a zombie has none")
            seen.add(p.pid)
        shared = []
        for sw, (p1, f1, p2, f2) in _quads(
            d, "shared_files", where, MAX_TREE, "[pid, fd, pid, fd]", (1 << 31) - 1
        ):
            if p1 not in seen or p2 not in seen or p1 == p2:
                fail(sw, "names a pid that is not in the tree, or one process twice")
            shared.append((p1, f1, p2, f2))
        return cls(procs, shared, _shared_maps(d, procs, where), _ns_pids(d, seen, where))


def _ns_pids(d: dict[Any, Any], pids: set[int], where: str) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for i, e in enumerate(as_list(d.get("ns_pids", []), f"{where}.ns_pids", MAX_TREE)):
        w = f"{where}.ns_pids[{i}]"
        t = as_list(e, w, 3)
        if len(t) != 3:
            fail(w, "expected [pid, pid inside its namespace, namespace inode]")
        pid, inner = (as_int(x, w, 1, MAX_PID) for x in t[:2])
        if pid not in pids or pid in out:
            fail(w, f"{pid} is not a process of the tree, or appears twice")
        out[pid] = (inner, as_int(t[2], w, 1))
    return out


def _shared_maps(d: dict[Any, Any], procs: list[TreeProc], where: str) -> list[tuple[int, int, int, int]]:
    live = {p.pid for p in procs if not p.zombie}
    out = []
    for sw, (pid, start, end, holder) in _quads(
        d, "shared_maps", where, MAX_SHARED_MAPS, "[pid, start, end, holder]", (1 << 64) - 1
    ):
        if pid not in live or holder not in live or pid == holder:
            fail(sw, "names a pid that is not a live process of the tree, or one process twice")
        if start >= end or start % 4096 or end % 4096:
            fail(sw, f"[{start:#x}, {end:#x}) is not a range of whole pages")
        out.append((pid, start, end, holder))
    return out


def _quads(
    d: dict[Any, Any], key: str, where: str, limit: int, shape: str, hi: int
) -> Iterator[tuple[str, tuple[int, int, int, int]]]:
    """Each entry of the list `d[key]` (absent: none) as four ints in [0, hi], with where it is."""
    for i, s in enumerate(as_list(d.get(key, []), f"{where}.{key}", limit)):
        sw = f"{where}.{key}[{i}]"
        q = as_list(s, sw, 4)
        if len(q) != 4:
            fail(sw, f"expected {shape}")
        a, b, c, e = (as_int(x, sw, 0, hi) for x in q)
        yield sw, (a, b, c, e)


__all__ = ["MAX_TREE", "TreeProc", "TreeRecord"]
