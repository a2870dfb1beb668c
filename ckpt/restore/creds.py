"""Credentials of the restored process, in the order that never lets it (or a crafted layer) use
more than the dumped process had.

1. Before anything is opened (mappings, fds, exe, cwd): the helper takes the process's supplementary
   groups and filesystem ids, and its effective capabilities are narrowed to the dumped ones. Every
   open is then checked by the kernel with the process's rights, not ckpt's (`enter_files`).
2. After the opens, the helper's effective set is raised again for the privileged steps left
   (PR_SET_MM_MAP with an exe fd, setresuid...) (`leave_files`).
3. After setresuid (made with PR_SET_KEEPCAPS, so the permitted set survives it): inheritable set,
   bounding set, ambient set, securebits, no_new_privs, then the seccomp filters, oldest first,
   then the final capability sets (`apply_security`). Filters are installed last but one because
   they would apply to every syscall injected after them: the helper's filters are suspended
   (PTRACE_O_SUSPEND_SECCOMP) until it is detached. The result is read back from /proc and must
   equal the dump.
"""

from __future__ import annotations

import struct

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.image.format import SecurityRecord
from ckpt.proc.task import read_security
from ckpt.ptrace.seccomp import suspend
from ckpt.restore.helper import PTRACE_O_EXITKILL
from ckpt.restore.plan import RestorePlan
from ckpt.restore.remote import Remote

CAP_V3 = 0x20080522
NO_ID = 0xFFFFFFFF
CAP_HDR_OFFSET = 0x1800  # scratch offsets clear of paths (0), auxv, mm map and sigaction (task.py)
CAP_DATA_OFFSET = 0x1810
FPROG_OFFSET = 0x1840
ROOM_OFFSET = 0x1900  # larger arguments: groups, filter programs
SECBIT_KEEP_CAPS = 1 << 4

Caps = tuple[int, int, int]  # effective, permitted, inheritable


def capget(remote: Remote) -> Caps:
    hdr = remote.put(struct.pack("<Ii", CAP_V3, 0), CAP_HDR_OFFSET)
    data = remote.put(bytes(24), CAP_DATA_OFFSET)
    remote.check("reading the capabilities", nr.CAPGET, hdr, data)
    e0, p0, i0, e1, p1, i1 = struct.unpack("<6I", remote.read(data, 24))
    return e0 | e1 << 32, p0 | p1 << 32, i0 | i1 << 32


def capset(remote: Remote, caps: Caps, what: str) -> None:
    eff, prm, inh = caps
    m = 0xFFFFFFFF
    hdr = remote.put(struct.pack("<Ii", CAP_V3, 0), CAP_HDR_OFFSET)
    data = remote.put(
        struct.pack("<6I", eff & m, prm & m, inh & m, eff >> 32 & m, prm >> 32 & m, inh >> 32 & m),
        CAP_DATA_OFFSET,
    )
    remote.check(what, nr.CAPSET, hdr, data)


def _with_room(remote: Remote, data: bytes, what: str) -> tuple[int, int]:
    """Copy `data` into the helper: the scratch area if it fits, else a mapping of its own.
    (address, mapping to unmap afterwards or 0)."""
    if ROOM_OFFSET + len(data) <= remote.scratch_size:
        return remote.put(data, ROOM_OFFSET), 0
    area = remote.check(
        f"mapping room for {what}", nr.MMAP, 0, len(data), nr.PROT_READ | nr.PROT_WRITE,
        nr.MAP_PRIVATE | nr.MAP_ANONYMOUS, -1, 0,
    )  # fmt: skip
    remote.write(area, data)
    return area, area


def set_fs_id(remote: Remote, sysno: int, want: int, what: str) -> None:
    # setfsuid/setfsgid return the previous id whatever happens: ask again to know.
    remote.syscall(sysno, want)
    got = remote.syscall(sysno, NO_ID)
    if got != want:
        raise RestoreError(f"cannot set the restored process's filesystem {what} id to {want} (it is {got})")


def enter_files(remote: Remote, plan: RestorePlan) -> Caps:
    """Take the process's groups, filesystem ids and effective capabilities for the opens that
    follow; returns the helper's capabilities before, for leave_files."""
    t = plan.task
    saved = capget(remote)
    groups = struct.pack(f"<{len(t.groups)}I", *t.groups)
    addr, area = _with_room(remote, groups, "the supplementary groups") if groups else (0, 0)
    try:
        remote.check("setting the supplementary groups", nr.SETGROUPS, len(t.groups), addr)
    finally:
        if area:
            remote.check("unmapping the room for the groups", nr.MUNMAP, area, len(groups))
    set_fs_id(remote, nr.SETFSGID, t.gid[3], "group")
    set_fs_id(remote, nr.SETFSUID, t.uid[3], "user")
    if t.security is not None:
        # setfsuid away from 0 has already dropped the filesystem capabilities from the set.
        eff, prm, inh = capget(remote)
        capset(remote, (eff & t.security.cap_eff, prm, inh), "narrowing the capabilities for opening files")
    return saved


def leave_files(remote: Remote, saved: Caps) -> None:
    capset(remote, saved, "raising the capabilities again after opening files")


def keep_caps(remote: Remote, plan: RestorePlan) -> None:
    """Before setresuid: keep the permitted set across a change away from uid 0, so that
    apply_security can still set what the dumped process had (then it is narrowed)."""
    if plan.task.security is not None:
        remote.check("keeping capabilities across setresuid", nr.PRCTL, nr.PR_SET_KEEPCAPS, 1, 0, 0, 0)


def _bits(mask: int) -> list[int]:
    return [c for c in range(64) if mask >> c & 1]


def apply_security(remote: Remote, pid: int, plan: RestorePlan) -> None:
    """After setresuid and the filesystem ids; see the module docstring for the order."""
    sec = plan.task.security
    if sec is None:
        return
    _, prm, _ = capget(remote)
    capset(remote, (prm, prm, sec.cap_inh), "setting the inheritable capabilities")
    have_bnd = read_security(pid).cap_bnd
    for c in _bits(have_bnd & ~sec.cap_bnd):
        remote.check(
            f"dropping capability {c} from the bounding set", nr.PRCTL, nr.PR_CAPBSET_DROP, c, 0, 0, 0
        )
    clear = nr.PR_CAP_AMBIENT_CLEAR_ALL
    remote.check("clearing the ambient capabilities", nr.PRCTL, nr.PR_CAP_AMBIENT, clear, 0, 0, 0)
    for c in _bits(sec.cap_amb):
        remote.check(f"raising ambient capability {c}", nr.PRCTL, nr.PR_CAP_AMBIENT, nr.PR_CAP_AMBIENT_RAISE,
                     c, 0, 0)  # fmt: skip
    if remote.check("reading the securebits", nr.PRCTL, nr.PR_GET_SECUREBITS, 0, 0, 0, 0) != sec.securebits:
        remote.check("setting the securebits", nr.PRCTL, nr.PR_SET_SECUREBITS, sec.securebits, 0, 0, 0)
    if sec.no_new_privs:
        remote.check("setting no_new_privs", nr.PRCTL, nr.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if sec.filters:
        try:
            suspend(pid, PTRACE_O_EXITKILL)
        except OSError as e:
            raise RestoreError(f"cannot suspend seccomp in the restore helper: {e.strerror}") from None
        for i, f in enumerate(sec.filters):
            _install_filter(remote, i, f.prog, f.flags)
    capset(remote, (sec.cap_eff, sec.cap_prm, sec.cap_inh), "setting the capabilities")
    check_security(pid, sec)


def _install_filter(remote: Remote, i: int, prog: bytes, flags: int) -> None:
    what = f"installing seccomp filter {i}"
    addr, area = _with_room(remote, prog, f"seccomp filter {i}")
    try:
        fprog = remote.put(struct.pack("<HxxxxxxQ", len(prog) // 8, addr), FPROG_OFFSET)
        remote.check(what, nr.SECCOMP, nr.SECCOMP_SET_MODE_FILTER, flags, fprog)
    finally:
        if area:
            remote.check(f"unmapping the room for seccomp filter {i}", nr.MUNMAP, area, len(prog))


def check_security(pid: int, sec: SecurityRecord) -> None:
    """Read back from /proc what the kernel now says: it must be what was dumped."""
    got = read_security(pid)
    diff = [
        name
        for name, a, b in (
            ("inheritable capabilities", got.cap_inh, sec.cap_inh),
            ("permitted capabilities", got.cap_prm, sec.cap_prm),
            ("effective capabilities", got.cap_eff, sec.cap_eff),
            ("bounding set", got.cap_bnd, sec.cap_bnd),
            ("ambient capabilities", got.cap_amb, sec.cap_amb),
            ("no_new_privs", got.no_new_privs, sec.no_new_privs),
            ("seccomp mode", got.seccomp_mode, sec.seccomp_mode),
        )
        if a != b
    ]
    n = len(sec.filters or [])
    if got.seccomp_filters >= 0 and got.seccomp_filters != n:
        diff.append(f"seccomp filters ({got.seccomp_filters}, not {n})")
    if diff:
        raise RestoreError(f"the restored process's {', '.join(diff)} differ from the dump")
