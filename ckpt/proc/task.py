"""The task's own state, read from outside: credentials, umask, personality, rlimits, children.

Everything here comes from /proc and prlimit(2) on another pid, so reading it injects nothing into
the target. One thing /proc cannot always tell: whether the process is dumpable when its effective
ids are root's (see `dumpable`), which the caller then asks the process itself.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ckpt.errors import TargetError, TargetExited
from ckpt.proc.grab import take_limits
from ckpt.proc.procfs import read_str, slurp
from ckpt.proc.stat import read_stat, read_status

U64 = (1 << 64) - 1
# The layer names limits like the kernel's RLIMIT_* without the prefix; the position is the resource
# number (asm-generic/resource.h). Python's resource module lacks some (RLIMIT_LOCKS), not prlimit.
RLIMIT_NAMES = (
    "cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile", "memlock", "as", "locks",
    "sigpending", "msgqueue", "nice", "rtprio", "rttime",
)  # fmt: skip
RLIMITS: dict[str, int] = {name: i for i, name in enumerate(RLIMIT_NAMES)}


@dataclass(frozen=True)
class TaskInfo:
    uid: tuple[int, int, int, int]  # real, effective, saved, filesystem
    gid: tuple[int, int, int, int]
    groups: tuple[int, ...]
    umask: int | None  # None: a kernel before 4.7 has no "Umask:" line
    personality: int
    dumpable: bool | None  # None: /proc cannot tell (effective uid and gid are both 0)
    rlimits: dict[str, tuple[int, int]] = field(default_factory=dict)  # 2**64-1 is RLIM_INFINITY


@dataclass(frozen=True)
class SecurityInfo:
    """/proc/PID/status's view of what limits the process beyond its ids."""

    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: bool
    seccomp_mode: int  # 0 disabled, 1 strict, 2 filter
    seccomp_filters: int  # filters attached (Seccomp_filters:, Linux >= 5.9); -1 when not shown


def read_security(pid: int, status: Mapping[str, str] | None = None) -> SecurityInfo:
    """``status``: read_status(pid), when the caller has it (it is read once per freeze)."""
    status = status if status is not None else read_status(pid)

    def field_(key: str, base: int, default: str | None = None) -> int:
        v = status.get(key, default)
        try:
            return int(v.split()[0], base) if v is not None else -1
        except (ValueError, IndexError):
            raise TargetError(f"cannot parse the {key} line of /proc/{pid}/status") from None

    inh, prm, eff, bnd, amb = (field_(k, 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))
    if min(inh, prm, eff, bnd, amb) < 0:
        raise TargetError(f"/proc/{pid}/status lacks a capability line (a kernel before 4.3?)")
    return SecurityInfo(
        cap_inh=inh,
        cap_prm=prm,
        cap_eff=eff,
        cap_bnd=bnd,
        cap_amb=amb,
        no_new_privs=field_("NoNewPrivs", 10, "0") == 1,
        seccomp_mode=field_("Seccomp", 10, "0"),
        seccomp_filters=field_("Seccomp_filters", 10),
    )


def _ids(status: Mapping[str, str], key: str, pid: int) -> tuple[int, int, int, int]:
    try:
        r, e, s, f = (int(x) for x in status[key].split())
    except (KeyError, ValueError):
        raise TargetError(f"cannot parse the {key} line of /proc/{pid}/status") from None
    return r, e, s, f


def _read_text(path: str, pid: int) -> str:
    return read_str(path, pid)


def _owner(pid: int) -> tuple[int, int]:
    """The uid and gid that own /proc/PID/status (_dumpable_of)."""
    try:
        st = os.stat(f"/proc/{pid}/status")
    except (FileNotFoundError, ProcessLookupError):
        raise TargetExited(f"process {pid} does not exist (or exited)") from None
    return st.st_uid, st.st_gid


def _dumpable_of(owner: tuple[int, int], euid: int, egid: int) -> bool | None:
    """Whether the process's mm is dumpable, from who owns its /proc files (_owner).

    The kernel gives /proc/PID/* (but not the directory itself) to the task's effective uid and gid
    when it is dumpable, and to root otherwise (task_dump_owner). For a process whose effective ids
    are root's that tells nothing: None."""
    if owner == (euid, egid):
        return None if euid == 0 and egid == 0 else True
    return False


def rlimits(pid: int) -> dict[str, tuple[int, int]]:
    """Every resource limit, as unsigned 64-bit values (Python gives RLIM_INFINITY as -1).

    prlimit(2) on another process needs its credentials or CAP_SYS_RESOURCE; without either (a root
    ckpt in a container that dropped CAP_SYS_RESOURCE, dumping an ordinary user's process), the
    same values are read from /proc/PID/limits."""
    got = take_limits(pid)  # (read beside the batch in this freeze: ckpt/proc/grab.py)
    if got is not None and len(got) >= len(RLIMITS) and not any(e for e, _, _ in got):
        return {name: (got[res][1], got[res][2]) for name, res in RLIMITS.items()}
    out = {}
    for name, res in RLIMITS.items():
        try:
            soft, hard = resource.prlimit(pid, res)
        except ProcessLookupError:
            raise TargetExited(f"process {pid} does not exist (or exited)") from None
        except PermissionError:
            return limits_file(pid)
        out[name] = (soft & U64, hard & U64)
    return out


def limits_file(pid: int) -> dict[str, tuple[int, int]]:
    """/proc/PID/limits: a header, then one line per resource in resource-number order, the name in
    25 columns, then the soft and hard limits ("unlimited" or a decimal number)."""
    lines = _read_text(f"/proc/{pid}/limits", pid).splitlines()[1:]
    if len(lines) < len(RLIMIT_NAMES):
        raise TargetError(f"/proc/{pid}/limits has {len(lines)} limits, fewer than {len(RLIMIT_NAMES)}")
    out = {}
    for name, ln in zip(RLIMIT_NAMES, lines, strict=False):
        try:
            soft, hard = (U64 if w == "unlimited" else int(w) for w in ln[25:].split()[:2])
        except ValueError:
            raise TargetError(f"cannot parse /proc/{pid}/limits: {ln.strip()!r}") from None
        out[name] = (soft, hard)
    return out


@dataclass(frozen=True)
class TaskReads:
    """What read_task reads of a process, unparsed: taken while it is frozen, parsed (task_info)
    after the thaw, out of the freeze. Nothing in the parse reads the process again."""

    pid: int
    status: Mapping[str, str]
    personality: str
    owner: tuple[int, int]  # uid and gid of its /proc files (_owner, for _dumpable_of)
    limits: dict[str, tuple[int, int]]  # rlimits' (the grab's answers of this freeze)


def read_task_reads(pid: int, status: Mapping[str, str]) -> TaskReads:
    """read_task's reads alone (``status``: read_status's, of the same freeze)."""
    owner = _owner(pid)
    return TaskReads(pid, status, _read_text(f"/proc/{pid}/personality", pid), owner, rlimits(pid))


def task_info(r: TaskReads) -> TaskInfo:
    """read_task's answer from its reads."""
    pid, status = r.pid, r.status
    uid, gid = _ids(status, "Uid", pid), _ids(status, "Gid", pid)
    um = status.get("Umask")
    try:
        groups = tuple(int(g) for g in status.get("Groups", "").split())
        pers = int(r.personality.strip(), 16)
    except ValueError:
        raise TargetError(f"cannot parse the groups or the personality of process {pid}") from None
    return TaskInfo(
        uid=uid,
        gid=gid,
        groups=groups,
        umask=int(um, 8) if um else None,
        personality=pers,
        dumpable=_dumpable_of(r.owner, uid[1], gid[1]),
        rlimits=r.limits,
    )


def read_task(pid: int, status: Mapping[str, str] | None = None) -> TaskInfo:
    return task_info(read_task_reads(pid, status if status is not None else read_status(pid)))


def list_children(pid: int, tids: Iterable[int]) -> list[int]:
    """The child processes of every given thread of pid (a child belongs to the thread that forked it).

    /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN; without it every process's parent is
    looked up instead (a child's ppid is its parent's thread-group id)."""
    out: set[int] = set()
    for tid in tids:
        try:
            out.update(int(c) for c in slurp(f"/proc/{pid}/task/{tid}/children").split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread is gone
            return _children_by_ppid(pid)
    return sorted(out)


def _children_by_ppid(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if read_stat(int(name)).ppid == pid:
                out.append(int(name))
        except (TargetExited, ValueError):
            continue
    return sorted(out)
