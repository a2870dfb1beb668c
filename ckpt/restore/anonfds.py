"""Anonymous-inode fds and unix socketpairs at restore (CRIU's eventfd.c, timerfd.c, signalfd.c,
eventpoll.c, fsnotify.c and sk-unix.c, in miniature).

Each object is made inside the helper by an injected syscall (eventfd2, timerfd_create, signalfd4,
epoll_create1, inotify_init1, socketpair), moved to its fd number with dup3 (the temporary closed),
and given its flags; dups of it (the same open file at another number) follow. State goes in from
the helper (timerfd_settime with the time left, or the absolute deadline for TFD_TIMER_ABSTIME;
TFD_IOC_SET_TICKS for expirations not yet read; the eventfd's count written; inotify watches added
by path until each gets its dumped watch descriptor) or from ckpt's own fd on the object
(pidfd_getfd: the messages queued to a socket are sent again from its peer; the IN_IGNORED events
that finding the watch descriptors left are read away). Epoll fds come last, once every fd they
watch is in place: each watch is added with its fd number, events and data.
"""

from __future__ import annotations

import _socket
import ctypes
import fcntl
import os
import struct
import termios
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket
else:
    from ckpt.lightstd import socket  # (imported at its first use: a process without sockets never)
from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.image.fdobjects import AnonFdRecord
from ckpt.image.format import FdRecord
from ckpt.proc.pipes import pidfd_getfd
from ckpt.proc.sockopts import set_options
from ckpt.proc.stat import boot_id
from ckpt.restore.pipes import Placer
from ckpt.restore.remote import Remote

SOCKETPAIR, IOCTL, WRITE = 53, 16, 1
EPOLL_CTL, INOTIFY_ADD_WATCH, INOTIFY_RM_WATCH = 233, 254, 255
TIMERFD_CREATE, TIMERFD_SETTIME = 283, 286
SIGNALFD4, EVENTFD2, EPOLL_CREATE1, INOTIFY_INIT1 = 289, 290, 291, 294
OPEN_BY_HANDLE_AT = 304
EPOLL_CTL_ADD = 1
TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET = 1, 2
TFD_IOC_SET_TICKS = 0x40085400
EFD_SEMAPHORE = 1
REALTIME_CLOCKS = (0, 8)  # CLOCK_REALTIME, CLOCK_REALTIME_ALARM: the same on every boot
CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 7: "CLOCK_BOOTTIME", 8: "CLOCK_REALTIME_ALARM",
          9: "CLOCK_BOOTTIME_ALARM"}  # fmt: skip
ARGS_OFFSET = 0x1100  # scratch: clear of paths (0), pipe2's pair (0x1000) and the creds area (0x1800)
PATH_OFFSET = 0x1200
MAX_WD_STEPS = 1 << 16  # watch descriptors are handed out in turn: at most this many tries to reach one
SOCK_TYPES = {_socket.SOCK_STREAM: "SOCK_STREAM", _socket.SOCK_DGRAM: "SOCK_DGRAM",
              _socket.SOCK_SEQPACKET: "SOCK_SEQPACKET"}  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass
class AnonPlan:
    records: list[AnonFdRecord] = field(default_factory=list)  # fd order
    paths: dict[tuple[int, int], str] = field(default_factory=dict)  # (fd, wd) -> an inotify watch's path
    unsupported: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    refused: set[int] = field(default_factory=set)  # fds named in `unsupported`
    # Dumped on another boot: a deadline on CLOCK_MONOTONIC or CLOCK_BOOTTIME means nothing here,
    # so an absolute timer is given the time it had left instead, as a relative one is.
    other_boot: bool = False

    @property
    def fds(self) -> set[int]:
        return {r.fd for r in self.records}


def plan_anonfds(
    fds: list[FdRecord], records: list[AnonFdRecord], *, dumping: bool, dumped_boot: str = ""
) -> AnonPlan:
    """The anonymous-inode fds and socketpairs a restore makes; those with no record are left to
    the plan's general refusal ("an anonymous inode", "a socket"). `dumped_boot`: the boot id the
    layer was dumped on."""
    out = AnonPlan(other_boot=bool(dumped_boot) and dumped_boot != boot_id())
    by_fd = {r.fd: r for r in records}
    paths = {f.fd: f.path for f in fds}
    bad: dict[int, str] = {}
    for f in sorted(fds, key=lambda f: f.fd):
        r = by_fd.get(f.fd)
        if r is None or f.kind not in ("anon", "socket"):
            continue
        what = f"fd {f.fd} ({f.path})"

        if r.dup_of >= 0:
            src = by_fd.get(r.dup_of)
            if src is None or src.dup_of >= 0 or src.kind != r.kind:
                bad[f.fd] = f"{what} (a dup of fd {r.dup_of}, which is not restored)"
                continue
        elif r.kind == "timerfd":
            clock, flags = r.ints.get("clockid", -1), r.ints.get("flags", 0)
            if clock not in CLOCKS:
                bad[f.fd] = f"{what} (a timerfd on clock {clock})"
                continue
            if flags & ~(TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET):
                bad[f.fd] = f"{what} (a timerfd with settime flags {flags:#o})"
                continue
        elif r.kind == "epoll":
            gone = [it for it in r.items if it[0] < 0 or it[0] not in paths]
            if gone:
                bad[f.fd] = f"{what} (an epoll watching a file no fd of the process holds at its number)"
                continue
        elif r.kind == "inotify":
            if r.ints.get("queued", 0):
                bad[f.fd] = f"{what} (an inotify with {r.ints['queued']} bytes of events not yet read)"
                continue
            if not dumping:
                for it, handle in zip(r.items, r.blobs, strict=False):
                    p = resolve_handle(it[3], it[4], it[5], handle)
                    if p is None:
                        out.problems.append(
                            f"{what}: the file its watch {it[0]} names (inode {it[4]}) cannot be found now"
                        )
                    else:
                        out.paths[(r.fd, it[0])] = p
        elif r.kind == "unix":
            peer = by_fd.get(r.ints.get("peer", -1))
            stype = r.ints.get("type", -1)
            if stype not in SOCK_TYPES:
                bad[f.fd] = f"{what} (a unix socket of type {stype})"
                continue
            if peer is None or peer.kind != "unix" or peer.ints.get("peer") != r.fd:
                bad[f.fd] = f"{what} (a unix socket whose peer is not in the process)"
                continue
            if r.ints.get("unreadable"):
                bad[f.fd] = f"{what} (a unix socket whose queue holds what cannot be read back)"
                continue
            if r.ints.get("shutdown"):
                bad[f.fd] = f"{what} (a unix socket that was shut down)"
                continue
        out.records.append(r)
    out.unsupported += bad.values()
    out.refused = set(bad)
    # A refused object refuses its dups and its socketpair peer too: they would come back alone.
    kept = out.fds
    out.records = [r for r in out.records if (r.dup_of if r.dup_of >= 0 else _pair(r)) in kept]
    return out


def _pair(r: AnonFdRecord) -> int:
    """The fd that must be restored for `r` to be: its socketpair peer, or itself."""
    return r.ints["peer"] if r.kind == "unix" else r.fd


def _mount_points(dev: int) -> list[str]:
    want = f"{os.major(dev)}:{os.minor(dev)}"
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for ln in f:
                w = ln.split()
                if len(w) > 4 and w[2] == want:
                    out.append(w[4].replace("\\040", " "))
    except OSError:
        pass
    return out


def resolve_handle(dev: int, ino: int, htype: int, handle: bytes) -> str | None:
    """A path of the inode (dev, ino) from its file handle (open_by_handle_at, as CRIU does); None
    when it cannot be found. Needs CAP_DAC_READ_SEARCH."""
    fh = struct.pack("<Ii", len(handle), htype) + handle
    buf = ctypes.create_string_buffer(fh, len(fh))
    for mnt in _mount_points(dev):
        try:
            mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fd = int(_libc.syscall(OPEN_BY_HANDLE_AT, mfd, buf, os.O_PATH | os.O_CLOEXEC))
            if fd < 0:
                continue
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
                st = os.stat(path, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (dev, ino) and not path.endswith(" (deleted)"):
                    return path
            except OSError:
                continue
            finally:
                os.close(fd)
        finally:
            os.close(mfd)
    return None


# -- restore ---------------------------------------------------------------------------------------
def restore_anonfds(remote: Remote, plan: AnonPlan, fds: dict[int, FdRecord], targets: set[int]) -> None:
    """Every record of `plan` at its fd; `fds`: the dumped fds by number; `targets`: every fd number
    the restore fills."""
    if not plan.records:
        return
    placer = Placer(remote, targets)
    pidfd = os.pidfd_open(remote.pid)
    by_fd = {r.fd: r for r in plan.records}
    try:
        made: set[int] = set()
        firsts = [r for r in plan.records if r.dup_of < 0]
        for r in [r for r in firsts if r.kind != "epoll"] + [r for r in firsts if r.kind == "epoll"]:
            if r.fd in made:
                continue
            what = f"restoring fd {r.fd} ({fds[r.fd].path})"
            if r.kind == "unix":
                peer = by_fd[r.ints["peer"]]
                _socketpair(remote, placer, pidfd, r, peer, fds, what)
                made |= {r.fd, peer.fd}
                continue
            tmp = placer.temp(_make(remote, pidfd, r, plan, what), what)
            _put(remote, placer, tmp, fds[r.fd], what)
            made.add(r.fd)
        for r in plan.records:
            if r.dup_of >= 0:
                placer.place(r.dup_of, fds[r.fd], f"restoring fd {r.fd} ({fds[r.fd].path})")
        for r in firsts:
            if r.kind == "epoll":
                for tfd, events, data in r.items:
                    ev = remote.put(struct.pack("<IQ", events & 0xFFFFFFFF, data), ARGS_OFFSET)
                    remote.check(
                        f"adding fd {tfd} to epoll fd {r.fd}", EPOLL_CTL, r.fd, EPOLL_CTL_ADD, tfd, ev
                    )
    finally:
        os.close(pidfd)


def _put(remote: Remote, placer: Placer, tmp: int, rec: FdRecord, what: str) -> None:
    placer.setfl(tmp, rec.flags, what)
    placer.place(tmp, rec, what)
    if tmp != rec.fd:
        remote.check(what, nr.CLOSE, tmp)


def _make(remote: Remote, pidfd: int, r: AnonFdRecord, plan: AnonPlan, what: str) -> int:
    """The object of `r`, made in the helper with its state: a temporary fd."""
    if r.kind == "eventfd":
        fd = remote.check(what, EVENTFD2, 0, nr.O_CLOEXEC | (EFD_SEMAPHORE if r.ints.get("semaphore") else 0))
        count = r.ints.get("count", 0)
        if count:
            if count >= (1 << 64) - 1:
                raise RestoreError(f"{what}: an eventfd count of {count}")
            if remote.check(what, WRITE, fd, remote.put(struct.pack("<Q", count), ARGS_OFFSET), 8) != 8:
                raise RestoreError(f"{what}: the eventfd's count was not taken")
        return fd
    if r.kind == "timerfd":
        return _timerfd(remote, r, what, plan.other_boot)
    if r.kind == "signalfd":
        mask = remote.put(struct.pack("<Q", r.ints.get("sigmask", 0) & ((1 << 64) - 1)), ARGS_OFFSET)
        return remote.check(what, SIGNALFD4, -1 & ((1 << 64) - 1), mask, 8, nr.O_CLOEXEC)
    if r.kind == "epoll":
        return remote.check(what, EPOLL_CREATE1, nr.O_CLOEXEC)
    if r.kind == "inotify":
        return _inotify(remote, pidfd, r, plan, what)
    raise RestoreError(f"{what}: no way to make a {r.kind}")


def _timerfd(remote: Remote, r: AnonFdRecord, what: str, other_boot: bool) -> int:
    clock, flags = r.ints["clockid"], r.ints.get("flags", 0)
    if other_boot and clock not in REALTIME_CLOCKS:
        flags &= ~TFD_TIMER_ABSTIME
    fd = remote.check(what, TIMERFD_CREATE, clock, nr.O_CLOEXEC)
    value, interval = r.ints.get("value_ns", 0), r.ints.get("interval_ns", 0)
    if value > 0:
        if flags & TFD_TIMER_ABSTIME:
            # The deadline the process set, on its clock: time that passed since the dump counts.
            value = r.ints.get("now_ns", 0) + value
        spec = struct.pack("<4q", *divmod(interval, 10**9), *divmod(value, 10**9))
        remote.check(what, TIMERFD_SETTIME, fd, flags, remote.put(spec, ARGS_OFFSET), 0)
    ticks = r.ints.get("ticks", 0)
    if ticks:
        remote.check(f"{what} (TFD_IOC_SET_TICKS)", IOCTL, fd, TFD_IOC_SET_TICKS,
                     remote.put(struct.pack("<Q", ticks), ARGS_OFFSET))  # fmt: skip
    return fd


def _inotify(remote: Remote, pidfd: int, r: AnonFdRecord, plan: AnonPlan, what: str) -> int:
    fd = remote.check(what, INOTIFY_INIT1, nr.O_CLOEXEC)
    steps = 0
    for it in sorted(r.items):
        wd, mask = it[0], it[1]
        path = remote.put_str(plan.paths[(r.fd, wd)], PATH_OFFSET)
        while True:
            how = f"{what}: watching {plan.paths[(r.fd, wd)]}"
            got = remote.check(how, INOTIFY_ADD_WATCH, fd, path, mask)
            if got == wd:
                break
            steps += 1
            if got > wd or steps > MAX_WD_STEPS:
                raise RestoreError(f"{what}: its watch {wd} cannot get its number back (got {got})")
            remote.check(what, INOTIFY_RM_WATCH, fd, got)
    if steps:
        # Each removal queued an IN_IGNORED event the process never had: read them away.
        local = pidfd_getfd(pidfd, fd)
        try:
            fcntl.fcntl(local, fcntl.F_SETFL, os.O_NONBLOCK)
            while int.from_bytes(fcntl.ioctl(local, termios.FIONREAD, b"\0\0\0\0"), "little"):
                os.read(local, 1 << 16)
        finally:
            os.close(local)
    return fd


def _socketpair(
    remote: Remote, placer: Placer, pidfd: int, a: AnonFdRecord, b: AnonFdRecord,
    fds: dict[int, FdRecord], what: str,
) -> None:  # fmt: skip
    arg = remote.put(bytes(8), ARGS_OFFSET)
    remote.check(what, SOCKETPAIR, socket.AF_UNIX, a.ints["type"] | socket.SOCK_CLOEXEC, 0, arg)
    ta, tb = (placer.temp(t, what) for t in struct.unpack("<ii", remote.read(arg, 8)))
    for rec, t in ((a, ta), (b, tb)):
        with socket.socket(fileno=pidfd_getfd(pidfd, t)) as s:
            bad = set_options(s, rec.ints)
        if bad:
            raise RestoreError(f"fd {rec.fd} ({what}): socket options {', '.join(bad)} not set as dumped")
    for dst, src in ((a, tb), (b, ta)):  # the messages queued to one end were sent by the other
        if not dst.blobs:
            continue
        local = pidfd_getfd(pidfd, src)
        s = socket.socket(fileno=local)
        try:
            for m in dst.blobs:
                if a.ints["type"] == socket.SOCK_STREAM:
                    s.sendall(m)
                elif s.send(m, socket.MSG_DONTWAIT) != len(m):
                    raise RestoreError(f"{what}: a queued message did not go back whole")
        except OSError as e:
            raise RestoreError(f"{what}: its queued messages cannot be sent again: {e.strerror}") from None
        finally:
            s.close()
    _put(remote, placer, ta, fds[a.fd], what)
    _put(remote, placer, tb, fds[b.fd], what)
