"""The fd table and the working directory (CRIU's files-reg.c, in miniature).

Regular files (and stateless devices such as /dev/null) are reopened by path at their numbers with
their flags (O_APPEND, O_NONBLOCK, O_CLOEXEC... as fdinfo showed them) and their offsets. Terminals
and pipes on fds 0-2 are not reopened: the process gets those of `ckpt restore`, which the helper
inherited (like CRIU's --shell-job). The plan has already refused anything else.
"""

from __future__ import annotations

import errno
import os

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.restore.listenshare import take_over
from ckpt.restore.objects import Objects, object_path
from ckpt.restore.plan import RestorePlan
from ckpt.restore.remote import Remote
from ckpt.restore.sockets import open_listener
from ckpt.restore.tcp import TcpRestore

SEEK_SET = 0
MKDIR, RMDIR = 83, 84
DELETED = " (deleted)"


def restore_fds(
    remote: Remote, plan: RestorePlan, objs: Objects | None = None, tcp: TcpRestore | None = None
) -> None:
    for fd in plan.close_fds:
        remote.syscall(nr.CLOSE, fd)  # EBADF when ckpt restore had it closed too: the same result
    if tcp is not None:  # connections bound beside the listener they came from, taken over live
        tcp.handed_over = {plan.inet_listen[f.obj].port for f in plan.fds if f.action == "handover"}
    # Connections first: one accepted from a listener of the process shares its port, which can be
    # bound beside established sockets (SO_REUSEADDR), not beside a listener.
    placed: set[int] = set()  # fds reopened here, in ascending order: a dup's source comes first
    for f in sorted(plan.fds, key=lambda f: f.action != "tcp"):
        if f.action not in ("open", "object", "listen", "tcp", "handover"):
            continue
        rec = f.record
        what = f"reopening fd {rec.fd} ({rec.path})"
        if rec.dup_of >= 0:
            # One open file description, as dumped: a dup shares the offset and status flags.
            if rec.dup_of not in placed:  # (the plan checked it: _bad_dups)
                raise RestoreError(f"fd {rec.fd}: a dup of fd {rec.dup_of}, which is not restored")
            remote.check(what, nr.DUP3, rec.dup_of, rec.fd, f.flags & nr.O_CLOEXEC)
            continue
        path = f.path or rec.path
        if f.action == "object":
            assert objs is not None
            path = object_path(objs, f.obj)  # a new open of the recreated object, with the fd's flags
        if f.action == "listen":
            got = open_listener(remote, plan.inet_listen[f.obj], f.flags)
        elif f.action == "handover":
            got = take_over(remote, plan.pid, rec.fd, plan.inet_listen[f.obj], f.flags)
        elif f.action == "tcp":
            if tcp is None:
                raise RestoreError(f"fd {rec.fd}: an established TCP connection where none is expected")
            if f.obj in tcp.placed:  # another fd of the same connection (a dup): the same socket
                got = remote.check(what, nr.FCNTL, tcp.placed[f.obj], nr.F_DUPFD_CLOEXEC, 0)
            else:
                got = tcp.open(remote, plan.tcp_established[f.obj], f.flags)
                tcp.placed[f.obj] = rec.fd
        else:
            got = remote.check(what, nr.OPENAT, nr.AT_FDCWD & (2**64 - 1), remote.put_str(path), f.flags, 0)
        if got != rec.fd:
            remote.check(what, nr.DUP3, got, rec.fd, f.flags & nr.O_CLOEXEC)
            remote.check(what, nr.CLOSE, got)
        placed.add(rec.fd)
        if rec.kind in ("file", "dir", "memfd") and rec.pos:
            pos = remote.check(f"seeking fd {rec.fd} ({rec.path})", nr.LSEEK, rec.fd, rec.pos, SEEK_SET)
            if pos != rec.pos:
                raise RestoreError(f"fd {rec.fd} ({rec.path}) is at offset {pos}, not {rec.pos}")
    if tcp is not None:
        tcp.lock_here()


def restore_cwd(remote: Remote, plan: RestorePlan) -> None:
    if plan.mm.cwd.endswith(DELETED):
        made = _deleted_cwd(remote, plan.mm.cwd[: -len(DELETED)])
        if made != plan.mm.cwd[: -len(DELETED)]:
            plan.warnings.append(f"the removed working directory was recreated as {made} (its name is taken)")
        return
    remote.check(f"changing directory to {plan.mm.cwd}", nr.CHDIR, remote.put_str(plan.mm.cwd))


def _deleted_cwd(remote: Remote, name: str) -> str:
    """A working directory that was removed (CRIU does the same): a directory made under its name,
    or a free name beside it, entered, and removed. The process sees it as deleted, as before."""
    for cand in [name, *(f"{name}.ckpt-{os.getpid()}-{i}" for i in range(8))]:
        r = remote.syscall(MKDIR, remote.put_str(cand), 0o700)
        if r == -errno.EEXIST:
            continue
        if r < 0:
            raise RestoreError(f"cannot recreate the removed working directory {name}: {os.strerror(-r)}")
        try:
            remote.check(f"changing directory to the recreated {cand}", nr.CHDIR, remote.put_str(cand))
        finally:
            remote.check(f"removing the recreated working directory {cand}", RMDIR, remote.put_str(cand))
        return cand
    raise RestoreError(f"cannot recreate the removed working directory {name}: every name tried is taken")
