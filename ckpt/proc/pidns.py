"""A process's ids in its own pid namespace (NSpid, NStgid, NSpgid, NSsid of /proc/PID/status).

Each NS* line lists the id in every namespace from the one of the /proc read (ckpt's) down to the
task's own: one entry when the process is in ckpt's namespace, the common case, for which nothing
more is read. For a process in a namespace below (a container's), its own ids are the last entries,
and each thread's tid inside is read from its task's status (a few reads, in the freeze: threads
cannot come or go while it lasts). A group or session whose leader is outside the namespace reads 0
there, as getpgrp() and getsid() answer inside.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ckpt.errors import TargetError
from ckpt.proc.procfs import read_text, slurp


def _last(status: Mapping[str, str], key: str) -> int | None:
    words = status.get(key, "").split()
    return int(words[-1]) if words else None


def _depth(status: Mapping[str, str]) -> int:
    return len(status.get("NSpid", "").split()) - 1


def nspid_of(text: str) -> list[int]:
    """The NSpid line of a /proc status file's text: the id in each pid namespace, /proc's first."""
    for ln in text.splitlines():
        if ln.startswith("NSpid:"):
            return [int(x) for x in ln.split()[1:]]
    return []


def nspid(path: str) -> list[int]:
    """nspid_of of the status file at `path` (OSError if it is gone)."""
    return nspid_of(slurp(path).decode("utf-8", "replace"))


def _thread_inner(pid: int, tid: int) -> int:
    text = (
        read_text(f"/proc/{pid}/task/{tid}/status", pid, gone=f"thread {tid} of process {pid} exited") or ""
    )
    ids = nspid_of(text)
    if not ids:
        raise TargetError(f"/proc/{pid}/task/{tid}/status has no NSpid line")
    return ids[-1]


def _inner_ppid(ppid: int, depth: int) -> int:
    """The parent's pid as the child's namespace numbers it: 0 when the parent is outside it."""
    if ppid <= 0:
        return 0
    try:
        ids = nspid(f"/proc/{ppid}/status")
    except OSError:
        return 0
    return ids[-1] if ids and len(ids) - 1 == depth else 0


def read_ns_ids(pid: int, tids: Iterable[int], status: Mapping[str, str]) -> dict[str, Any] | None:
    """The pidns record (image/pidns.py) of a frozen process whose /proc status is `status`; None
    when it is in the namespace of ckpt's /proc (its ids there are those it sees)."""
    depth = _depth(status)
    if depth < 1:
        return None
    inner = _last(status, "NSpid")
    assert inner is not None
    ppid = int(status.get("PPid", "0") or 0)
    return {
        "ino": os.stat(f"/proc/{pid}/ns/pid").st_ino,
        "depth": depth,
        "pid": inner,
        "ppid": _inner_ppid(ppid, depth),
        "pgid": _last(status, "NSpgid") or 0,
        "sid": _last(status, "NSsid") or 0,
        "tids": [[t, _thread_inner(pid, t)] for t in sorted(tids) if t != pid],
    }


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def in_our_pidns(pid: int) -> bool:
    """Whether process `pid` is in ckpt's own pid namespace (two stats, no file read): then every id
    it sees is the one ckpt sees, and nothing of this module needs reading. OSError if it is gone."""
    return _ns_id(f"/proc/{pid}/ns/pid") == _ns_id("/proc/self/ns/pid")


def own_tids(pid: int, tids: Iterable[int]) -> dict[int, int]:
    """Each thread's tid (ckpt's) -> the tid its own pid namespace gives it: what a syscall made by
    the process itself must name (tgkill in an injected blob). One status read when the process is
    in ckpt's namespace, the common case."""
    ids = nspid(f"/proc/{pid}/status")
    if len(ids) <= 1:
        return {t: t for t in tids}
    return {t: ids[-1] if t == pid else _thread_inner(pid, t) for t in tids}


def tree_ns_pids(pids: Iterable[int]) -> list[list[int]]:
    """[pid, pid inside, namespace inode] of each process of a frozen tree (zombies too) that is in
    a pid namespace below ckpt's (the tree record's `ns_pids`)."""
    out = []
    for pid in pids:
        try:
            if in_our_pidns(pid):
                continue  # the common case: no status read
            ids = nspid(f"/proc/{pid}/status")
            ino = os.stat(f"/proc/{pid}/ns/pid").st_ino
        except OSError:
            continue  # gone: not part of the tree any more (its record says so)
        if len(ids) > 1:
            out.append([pid, ids[-1], ino])
    return out


__all__ = ["in_our_pidns", "nspid", "nspid_of", "own_tids", "read_ns_ids", "tree_ns_pids"]
