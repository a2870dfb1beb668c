"""The fd table and the working directory (CRIU's files-reg.c, in miniature).

Regular files (and stateless devices such as /dev/null) are reopened by path at their numbers with
their flags (O_APPEND, O_NONBLOCK, O_CLOEXEC... as fdinfo showed them) and their offsets. Terminals
and pipes on fds 0-2 are not reopened: the process gets those of `ckpt restore`, which the helper
inherited (like CRIU's --shell-job). The plan has already refused anything else.
"""

from __future__ import annotations

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.restore.plan import RestorePlan
from ckpt.restore.remote import Remote

SEEK_SET = 0


def restore_fds(remote: Remote, plan: RestorePlan) -> None:
    for fd in plan.close_fds:
        remote.syscall(nr.CLOSE, fd)  # EBADF when ckpt restore had it closed too: the same result
    for f in plan.fds:
        if f.action != "open":
            continue
        rec = f.record
        what = f"reopening fd {rec.fd} ({rec.path})"
        got = remote.check(what, nr.OPENAT, nr.AT_FDCWD & (2**64 - 1), remote.put_str(rec.path), f.flags, 0)
        if got != rec.fd:
            remote.check(what, nr.DUP3, got, rec.fd, f.flags & nr.O_CLOEXEC)
            remote.check(what, nr.CLOSE, got)
        if rec.kind in ("file", "dir") and rec.pos:
            pos = remote.check(f"seeking fd {rec.fd} ({rec.path})", nr.LSEEK, rec.fd, rec.pos, SEEK_SET)
            if pos != rec.pos:
                raise RestoreError(f"fd {rec.fd} ({rec.path}) is at offset {pos}, not {rec.pos}")


def restore_cwd(remote: Remote, plan: RestorePlan) -> None:
    remote.check(f"changing directory to {plan.mm.cwd}", nr.CHDIR, remote.put_str(plan.mm.cwd))
