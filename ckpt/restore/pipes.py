"""Pipes and FIFOs at restore (CRIU's pipes.c and fifo.c, in miniature).

Decided by the plan (`plan_pipes`), one decision per pipe inode:
  "pipe"     both ends were in the process: one new pipe (pipe2 injected into the helper), its size
             set, the dumped bytes written into it, each end at the fds that held it
  "inherit"  one end was outside the process and `--inherit-fd fd[N]:pipe:[INO]` names a pipe of
             `ckpt restore` (its fd N) to stand for it: the helper takes it (pidfd_getfd on ckpt);
             the bytes stay with that pipe, which outlives the process (they are not written again)
  "follow"   one end outside, and the pipe was also one of fds 0-2: those become `ckpt restore`'s
             (--shell-job, as before), and the fds above 2 that named the same pipe are dups of them;
             the same for a terminal above fd 2 that is the terminal of one of fds 0-2
  "fifo"     a FIFO, opened again by path with each fd's flags. ckpt holds it open read-write while
             the helper opens it (so no open blocks waiting for a partner, CRIU's fake fd); the
             dumped bytes are written when the FIFO is empty now; a FIFO that still holds exactly
             those bytes (it outlived the process) is left as it is; other bytes are an error
  "external" a pipe the caller makes and hands out itself (`external` inodes: a process tree's
             restorer, for pipes between its processes); left alone here
Anything else (an end outside with no --inherit-fd) is refused, naming the fd.

Fds that were one open file description at dump (kcmp; PipeRecord.files) share one again: each end
of a new pipe is one description, dup'd to its fds; any other description is the same pipe opened
again through the helper's /proc/self/fd/N, as a separate open would have made it.

For a process tree: a PipeRecord is keyed by inode (the same in the layer of every process that
held the pipe), so a tree restorer can make each pipe once (pipe2 in one helper) and give its ends
to the other helpers with `fetch_fd` (pidfd_getfd injected into the taking helper), then place them
with `Placer`, passing those inodes as `external` to `plan_pipes`.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.image.fdobjects import PipeRecord
from ckpt.image.format import FdRecord
from ckpt.proc.pipes import F_SETPIPE_SZ, PIPE_KINDS, is_reader, peek, pidfd_getfd
from ckpt.restore.openflags import reopen_flags
from ckpt.restore.remote import Remote

PIPE2, PIDFD_OPEN, PIDFD_GETFD = 293, 434, 438
F_SETFD, F_GETFL, F_SETFL = 2, 3, 4
# What F_SETFL can change on an open file (fs/fcntl.c SETFL_MASK), and what it is asked to.
SETFL_MASK = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME
PIPE_ARGS_OFFSET = 0x1000  # scratch: pipe2's int[2], clear of paths (0) and the creds area (0x1800)


@dataclass
class PipePlan:
    action: str  # "pipe" | "inherit" | "follow" | "fifo"
    ino: int
    fds: list[FdRecord]
    record: PipeRecord | None = None  # the dumped pipe (size, bytes); None for inherit/follow
    source: int = -1  # inherit: ckpt restore's own fd; follow: the fd of 0-2 it follows


@dataclass
class PipesPlan:
    pipes: list[PipePlan] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def fds(self) -> set[int]:
        return {f.fd for p in self.pipes for f in p.fds}


def parse_inherit(specs: Iterable[str]) -> dict[str, int]:
    """`fd[N]:pipe:[INO]` (CRIU's --inherit-fd) -> {"pipe:[INO]": N}. Raises ValueError."""
    out: dict[str, int] = {}
    for s in specs:
        head, sep, what = s.partition(":")
        if not (sep and head.startswith("fd[") and head.endswith("]") and head[3:-1].isdigit()):
            raise ValueError(f"--inherit-fd {s!r}: expected fd[N]:pipe:[INODE]")
        if not (what.startswith("pipe:[") and what.endswith("]") and what[6:-1].isdigit()):
            raise ValueError(f"--inherit-fd {s!r}: only pipes can be inherited (pipe:[INODE])")
        out[what] = int(head[3:-1])
    return out


def plan_pipes(
    fds: Iterable[FdRecord],
    records: Iterable[PipeRecord],
    inherit: dict[str, int] | None,
    *,
    dumping: bool,
    external: Container[int] = (),
) -> PipesPlan:
    """One decision per pipe or FIFO inode among `fds` (fds 0-2 whose pipe is not the process's own
    are left out: the plan keeps them as `ckpt restore`'s). `dumping`: checks made by `ckpt dump`,
    which cannot know the --inherit-fd a restore will be given. `external`: pipe inodes the caller
    makes and places itself."""
    out = PipesPlan()
    fds = list(fds)
    by_ino = {r.ino: r for r in records}
    groups: dict[int, list[FdRecord]] = {}
    for f in sorted(fds, key=lambda f: f.fd):
        if f.kind in PIPE_KINDS:
            groups.setdefault(f.ino, []).append(f)
    for ino, group in groups.items():
        rec = by_ino.get(ino)
        first = group[0]
        if first.kind == "fifo":
            _plan_fifo(out, ino, group, rec)
            continue
        readers = any(is_reader(f.flags) for f in group)
        writers = any(f.flags & os.O_ACCMODE != os.O_RDONLY for f in group)
        key = f"pipe:[{ino}]"
        if ino in external:
            out.pipes.append(PipePlan("external", ino, group, rec))
        elif inherit and key in inherit:
            out.pipes.append(_plan_inherit(out, ino, group, inherit[key]))
        elif readers and writers:
            if rec is None:
                out.unsupported.append(
                    f"fd {first.fd} ({first.path}) (a pipe whose bytes this layer did not record: "
                    "a layer before format version 3)"
                )
                continue
            if rec.data and any(f.flags & os.O_DIRECT for f in group):
                out.unsupported.append(
                    f"fd {first.fd} ({first.path}) (a packet-mode pipe (O_DIRECT) with bytes buffered: "
                    "their packet boundaries were not recorded)"
                )
                continue
            out.pipes.append(PipePlan("pipe", ino, group, rec))
        elif first.fd <= 2:
            # As before: fds 0-2 become ckpt restore's own; the others follow the first of them.
            rest = [f for f in group if f.fd > 2]
            if rest:
                out.pipes.append(PipePlan("follow", ino, rest, source=first.fd))
        else:
            msg = (
                f"fd {first.fd} ({first.path}) (a pipe whose other end is outside the process: "
                f"give one with --inherit-fd fd[N]:{key})"
            )
            (out.warnings if dumping else out.unsupported).append(msg)
    # A terminal above fd 2 that is the terminal of one of fds 0-2 (bash's fd 255, `exec 3>&1`)
    # follows it the same way; any other stays refused by the plan.
    ttys: dict[tuple[int, int], list[FdRecord]] = {}
    for f in sorted(fds, key=lambda f: f.fd):
        if f.kind == "tty":
            ttys.setdefault((f.dev, f.ino), []).append(f)
    for group in ttys.values():
        rest = [f for f in group if f.fd > 2]
        if group[0].fd <= 2 and rest:
            out.pipes.append(PipePlan("follow", group[0].ino, rest, source=group[0].fd))
    return out


def _plan_inherit(out: PipesPlan, ino: int, group: list[FdRecord], n: int) -> PipePlan:
    first = group[0]
    try:
        st = os.fstat(n)
        mode = fcntl.fcntl(n, F_GETFL) & os.O_ACCMODE
    except OSError as e:
        out.problems.append(f"--inherit-fd fd[{n}] for fd {first.fd} ({first.path}): {e.strerror}")
        return PipePlan("inherit", ino, group, source=n)
    if not stat.S_ISFIFO(st.st_mode):
        out.problems.append(f"--inherit-fd fd[{n}] for fd {first.fd} ({first.path}) is not a pipe")
    for f in group:
        want = f.flags & os.O_ACCMODE
        if want != mode and mode != os.O_RDWR:
            end = "read" if want == os.O_RDONLY else "write"
            out.problems.append(
                f"--inherit-fd fd[{n}] for fd {f.fd} ({f.path}) is not the {end} end of a pipe"
            )
            break
    return PipePlan("inherit", ino, group, source=n)


def _plan_fifo(out: PipesPlan, ino: int, group: list[FdRecord], rec: PipeRecord | None) -> None:
    first = group[0]
    what = f"fd {first.fd} ({first.path})"
    if not first.path.startswith("/") or first.path.endswith(" (deleted)"):
        out.unsupported.append(f"{what} (a deleted FIFO)")
        return
    if rec is None:
        out.unsupported.append(
            f"{what} (a FIFO whose bytes this layer did not record: before format version 3)"
        )
        return
    try:
        st = os.stat(first.path)
    except OSError as e:
        out.problems.append(f"{what}: the FIFO cannot be found now ({e.strerror})")
        return
    if not stat.S_ISFIFO(st.st_mode) or (st.st_dev, st.st_ino) != (first.dev, first.ino):
        out.problems.append(f"{what}: the path now names another file")
        return
    out.pipes.append(PipePlan("fifo", ino, group, rec))


# -- restore ---------------------------------------------------------------------------------------
class Placer:
    """Puts descriptions at fd numbers in the helper without clobbering a temporary fd of ours that
    sits on a number some fd of the plan still needs."""

    def __init__(self, remote: Remote, targets: set[int]) -> None:
        self.remote = remote
        self.pending = set(targets)  # numbers not yet given their fd
        self.park = max(targets, default=2) + 1

    def temp(self, fd: int, what: str) -> int:
        """A temporary fd moved off the numbers still to be filled."""
        if fd not in self.pending:
            return fd
        moved = self.remote.check(what, nr.FCNTL, fd, nr.F_DUPFD_CLOEXEC, self.park)
        self.remote.check(what, nr.CLOSE, fd)
        return moved

    def place(self, src: int, rec: FdRecord, what: str) -> None:
        """`rec.fd` becomes a dup of `src` (the same description), with rec's close-on-exec."""
        cloexec = rec.flags & nr.O_CLOEXEC
        if src != rec.fd:
            self.remote.check(what, nr.DUP3, src, rec.fd, cloexec)
        else:
            self.remote.check(what, nr.FCNTL, rec.fd, F_SETFD, 1 if cloexec else 0)
        self.pending.discard(rec.fd)

    def setfl(self, fd: int, flags: int, what: str) -> None:
        self.remote.check(what, nr.FCNTL, fd, F_SETFL, flags & SETFL_MASK)


def restore_pipes(remote: Remote, plans: list[PipePlan], targets: set[int]) -> None:
    """Every pipe and FIFO of the plan at its fds. `targets`: every fd number the restore fills."""
    if not plans:
        return
    placer = Placer(remote, targets)
    pidfd = os.pidfd_open(remote.pid)
    try:
        for p in plans:
            what = f"restoring fd {p.fds[0].fd} ({p.fds[0].path})"
            if p.action == "pipe":
                _make_pipe(remote, placer, pidfd, p, what)
            elif p.action == "fifo":
                _open_fifo(remote, placer, p, what)
            elif p.action == "inherit":
                _inherit(remote, placer, p, what)
            elif p.action == "follow":
                for f in p.fds:
                    placer.place(p.source, f, what)
    finally:
        os.close(pidfd)


def _ends(
    remote: Remote, placer: Placer, p: PipePlan, bases: dict[int, int], what: str, fixed: int | None = None
) -> None:
    """Each fd of `p` from the description of its end (`bases`: access mode -> a temporary fd).
    Fds that were one open file description (the record's `files`; without them, fds of one end
    with the same flags) share one again; every other description is the same pipe opened again
    through the helper's /proc/self/fd. `fixed`: the flags of a description that is not ours to
    change (an inherited one, shared with whoever gave it)."""
    group = {fd: i for i, g in enumerate(p.record.files if p.record else []) for fd in g}
    placed: dict[tuple[int, ...], int] = {}  # description -> an fd of the process holding it
    given: set[int] = set()  # access modes whose base description is taken
    for f in p.fds:
        mode = f.flags & os.O_ACCMODE
        want = f.flags & SETFL_MASK
        key = (0, group[f.fd]) if f.fd in group else (1, mode, want)
        if key in placed:
            placer.place(placed[key], f, what)
            continue
        placed[key] = f.fd
        if mode in bases and mode not in given and fixed in (None, want):
            if fixed is None:
                placer.setfl(bases[mode], want, what)
            placer.place(bases[mode], f, what)
            given.add(mode)
            continue
        path = remote.put_str(f"/proc/self/fd/{next(iter(bases.values()))}")
        flags = reopen_flags(f.flags) | os.O_NONBLOCK | nr.O_CLOEXEC
        tmp = placer.temp(remote.check(what, nr.OPENAT, nr.AT_FDCWD & (2**64 - 1), path, flags, 0), what)
        placer.setfl(tmp, want, what)
        placer.place(tmp, f, what)
        if tmp != f.fd:
            remote.check(what, nr.CLOSE, tmp)


def _make_pipe(remote: Remote, placer: Placer, pidfd: int, p: PipePlan, what: str) -> None:
    assert p.record is not None
    arg = remote.put(bytes(8), PIPE_ARGS_OFFSET)
    remote.check(what, PIPE2, arg, nr.O_CLOEXEC)
    r, w = struct.unpack("<ii", remote.read(arg, 8))
    r = placer.temp(r, what)
    w = placer.temp(w, what)
    local = pidfd_getfd(pidfd, w)  # ckpt's own fd on the write end: size and bytes from here
    try:
        if fcntl.fcntl(local, F_SETPIPE_SZ, p.record.size) < len(p.record.data):
            raise RestoreError(f"{what}: a pipe of {p.record.size} bytes cannot be made")
        _write_all(local, p.record.data, what)
    except OSError as e:
        raise RestoreError(f"{what}: {e.strerror}") from None
    finally:
        os.close(local)
    _ends(remote, placer, p, {os.O_RDONLY: r, os.O_WRONLY: w}, what)
    for t in (r, w):
        if t not in {f.fd for f in p.fds}:
            remote.check(what, nr.CLOSE, t)


def fetch_fd(remote: Remote, pid: int, fd: int, what: str) -> int:
    """A new fd in the helper on the open file description behind `fd` of process `pid` (ckpt
    itself for --inherit-fd; another helper of a process tree for an object made once and shared).
    pidfd_getfd needs ptrace access to `pid`: the helper still has ckpt's real ids here."""
    # Imported here: pidns brings the restore helper (and subprocess), which a dump never needs.
    from ckpt.restore.pidns import open_pidfd

    owner = open_pidfd(remote, pid, what)  # (ckpt's pid means nothing inside a --pidns namespace)
    try:
        return remote.check(what, PIDFD_GETFD, owner, fd, 0)
    finally:
        remote.check(what, nr.CLOSE, owner)


def _inherit(remote: Remote, placer: Placer, p: PipePlan, what: str) -> None:
    got = fetch_fd(remote, os.getpid(), p.source, f"{what} from --inherit-fd fd[{p.source}]")
    tmp = placer.temp(got, what)
    mode = p.fds[0].flags & os.O_ACCMODE
    try:
        fixed = fcntl.fcntl(p.source, F_GETFL) & SETFL_MASK
    except OSError as e:
        raise RestoreError(f"{what}: --inherit-fd fd[{p.source}]: {e.strerror}") from None
    _ends(remote, placer, p, {mode: tmp}, what, fixed)
    if tmp not in {f.fd for f in p.fds}:
        remote.check(what, nr.CLOSE, tmp)


def _open_fifo(remote: Remote, placer: Placer, p: PipePlan, what: str) -> None:
    assert p.record is not None
    path = p.fds[0].path
    try:
        keeper = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise RestoreError(f"{what}: cannot open the FIFO: {e.strerror}") from None
    try:
        st = os.fstat(keeper)
        if not stat.S_ISFIFO(st.st_mode) or (st.st_dev, st.st_ino) != (p.fds[0].dev, p.fds[0].ino):
            raise RestoreError(f"{what}: the path now names another file")
        addr = remote.put_str(path)
        for f in p.fds:
            flags = reopen_flags(f.flags)
            tmp = placer.temp(remote.check(what, nr.OPENAT, nr.AT_FDCWD & (2**64 - 1), addr, flags, 0), what)
            placer.place(tmp, f, what)
            if tmp != f.fd:
                remote.check(what, nr.CLOSE, tmp)
        now = peek(keeper)
        if not now:
            fcntl.fcntl(keeper, F_SETPIPE_SZ, p.record.size)
        if p.record.data and now != p.record.data:
            if now:
                raise RestoreError(
                    f"{what}: the FIFO holds {len(now)} bytes now, not the {len(p.record.data)} it held: "
                    "another process uses it"
                )
            _write_all(keeper, p.record.data, what)
    except OSError as e:
        raise RestoreError(f"{what}: {e.strerror}") from None
    finally:
        os.close(keeper)


def _write_all(fd: int, data: bytes, what: str) -> None:
    done = 0
    while done < len(data):
        n = os.write(fd, data[done:])
        if n <= 0:
            raise RestoreError(f"{what}: short write of the pipe's bytes")
        done += n
