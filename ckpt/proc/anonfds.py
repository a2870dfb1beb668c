"""Anonymous-inode fds and unix socketpairs at dump: what a restore needs to make each again.

Read from outside the frozen process, nothing injected: /proc/PID/fdinfo shows an eventfd's count
and semaphore mode, a timerfd's clock, settime flags, time left, interval and unread expirations, a
signalfd's mask, an epoll's watches (fd number, events, data) and an inotify's watches (wd, mask and
a file handle of the watched inode). kcmp(2) says which fds are one open file (dups), and whether an
epoll watch's fd number still holds the file it watches. Unix sockets: the kernel's sock_diag
netlink interface names each one's peer, and the messages queued to it are read with MSG_PEEK on
the dumper's own fd of it (pidfd_getfd), which takes nothing from the queue. For datagram sockets
SO_PEEK_OFF walks the queue message by message, and is set back as it was.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import termios
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket
else:
    from ckpt.lightstd import socket  # (imported at its first use: a process without sockets never)
from ckpt.cbuf import char_buffer, warm
from ckpt.errors import TargetError
from ckpt.image.fdobjects import MAX_PIPE_DATA
from ckpt.proc.fds import FdInfo, fields_of, read_fdinfo
from ckpt.proc.pipes import Descriptions, NoKcmp, kcmp, pidfd_getfd
from ckpt.proc.sockopts import read_options

KCMP_EPOLL_TFD = 7
_EPOLL_SLOT = struct.Struct("<III")  # struct kcmp_epoll_slot: efd, tfd, toff
warm(ctypes.c_char, _EPOLL_SLOT.size)  # (made at import, not in a freeze: ckpt/cbuf.py)
SO_PEEK_OFF = 42
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
UDIAG_SHOW_NAME, UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 1, 4, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 2, 4, 6
TCP_LISTEN = 10
MAX_DGRAM = 1 << 18  # above the largest datagram a unix socket's default buffers let through

ANON_NAMES = {
    "anon_inode:[eventfd]": "eventfd",
    "anon_inode:[timerfd]": "timerfd",
    "anon_inode:[signalfd]": "signalfd",
    "anon_inode:[eventpoll]": "epoll",
    "anon_inode:inotify": "inotify",
}


def _epoll_target_ok(pid: int, efd: int, tfd: int, toff: int) -> bool:
    """Whether fd `tfd` of the process is the file that epoll `efd`'s watch (tfd, toff) watches."""
    slot = _EPOLL_SLOT.pack(efd, tfd, toff)
    buf = char_buffer(len(slot), slot)
    return kcmp(pid, KCMP_EPOLL_TFD, tfd, ctypes.addressof(buf)) == 0


def _hexpair(v: str) -> tuple[int, int]:
    """ "(12, 345)" -> (12, 345)."""
    a, b = v.strip("()").split(",")
    return int(a), int(b)


def _eventfd(info: dict[str, str]) -> dict[str, Any]:
    if "eventfd-semaphore" not in info:
        raise TargetError("this kernel's fdinfo does not show an eventfd's semaphore mode")
    return {"ints": {"count": int(info["eventfd-count"], 16), "semaphore": int(info["eventfd-semaphore"])}}


def _timerfd(info: dict[str, str]) -> dict[str, Any]:
    clock = int(info["clockid"])
    vs, vn = _hexpair(info["it_value"])
    is_, in_ = _hexpair(info["it_interval"])
    return {
        "ints": {
            "clockid": clock,
            "flags": int(info["settime flags"], 8),
            "value_ns": vs * 10**9 + vn,
            "interval_ns": is_ * 10**9 + in_,
            "ticks": int(info["ticks"]),
            "now_ns": time.clock_gettime_ns(clock),
        }
    }


def _epoll(pid: int, fd: int) -> dict[str, Any]:
    items: list[list[int]] = []
    seen: dict[int, int] = {}
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for ln in f:
            if not ln.startswith("tfd:"):
                continue
            w = ln.split()
            tfd, events, data = int(w[1]), int(w[3], 16), int(w[5], 16)
            toff = seen.get(tfd, 0)
            seen[tfd] = toff + 1
            # -1: the watched file is no longer at the number it was added with (closed, or dup'd
            # elsewhere): no epoll_ctl in the restored process could name it. The plan refuses it.
            items.append([tfd if _epoll_target_ok(pid, fd, tfd, toff) else -1, events, data])
    return {"items": items}


def _inotify(pid: int, fd: int, local: int) -> dict[str, Any]:
    items: list[list[int]] = []
    blobs: list[bytes] = []
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for ln in f:
            if not ln.startswith("inotify "):
                continue
            kv = dict(p.split(":", 1) for p in ln.split()[1:])
            sdev = int(kv["sdev"], 16)
            dev = os.makedev(sdev >> 20, sdev & 0xFFFFF)  # the kernel's dev_t, as st_dev shows it
            items.append([
                int(kv["wd"], 16), int(kv["mask"], 16), int(kv["ignored_mask"], 16), dev, int(kv["ino"], 16),
                int(kv.get("fhandle-type", "0"), 16),
            ])  # fmt: skip
            blobs.append(bytes.fromhex(kv.get("f_handle", "")))
    queued = int.from_bytes(fcntl.ioctl(local, termios.FIONREAD, b"\0\0\0\0"), "little")
    return {"items": items, "blobs": blobs, "ints": {"queued": queued}}


def unix_diag() -> dict[int, dict[str, int]]:
    """Every unix socket of this network namespace: inode -> type, state, peer inode, queued bytes,
    shutdown bits, named (bound to a path or an abstract name)."""
    out: dict[int, dict[str, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as s:
        show = UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN
        req = struct.pack("<BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, show, 0xFFFFFFFF, 0xFFFFFFFF)
        hdr = struct.pack("<IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        s.send(hdr + req)
        while True:
            buf = s.recv(1 << 16)
            off = 0
            while off + 16 <= len(buf):
                ln, typ = struct.unpack_from("<IH", buf, off)
                if ln < 16 or typ == NLMSG_DONE:
                    return out
                if typ == NLMSG_ERROR:
                    err = -struct.unpack_from("<i", buf, off + 16)[0]
                    raise TargetError(f"sock_diag of unix sockets failed: {os.strerror(err)}")
                body = buf[off + 16 : off + ln]
                _family, stype, state, _pad, ino = struct.unpack_from("<BBBBI", body)
                rec = {"type": stype, "state": state, "peer": 0, "rqueue": 0, "shutdown": 0, "named": 0}
                a = 16
                while a + 4 <= len(body):
                    alen, atype = struct.unpack_from("<HH", body, a)
                    if alen < 4:
                        break
                    val = body[a + 4 : a + alen]
                    if atype == UNIX_DIAG_PEER:
                        rec["peer"] = struct.unpack_from("<I", val)[0]
                    elif atype == UNIX_DIAG_RQLEN:
                        rec["rqueue"] = struct.unpack_from("<I", val)[0]
                    elif atype == UNIX_DIAG_SHUTDOWN:
                        rec["shutdown"] = val[0]
                    elif atype == UNIX_DIAG_NAME:
                        rec["named"] = 1
                    a += (alen + 3) & ~3
                out[ino] = rec
                off += (ln + 3) & ~3


def _peek_queue(local: int, stype: int, queued: int) -> tuple[list[bytes], str]:
    """The messages queued to the socket `local` (ours), left in place; or why they cannot be taken.
    `queued`: the bytes sock_diag counts in its queue (for a datagram socket, the first message's)."""
    s = socket.socket(fileno=os.dup(local))
    try:
        msgs: list[bytes] = []
        total = 0
        if stype == socket.SOCK_STREAM:
            try:
                data, _, flags, _ = s.recvmsg(queued + 1, 0, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return [], ""
            if flags & socket.MSG_CTRUNC:
                return [], "fds or credentials are queued to it"
            if len(data) != queued:  # a peek stops where credentials differ: the rest would be lost
                return [], f"{queued} bytes are queued but a peek sees {len(data)}"
            return ([data] if data else []), ""
        old = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        try:
            while True:
                try:
                    data, _, flags, _ = s.recvmsg(MAX_DGRAM, 0, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return msgs, ""
                if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                    return [], "fds, credentials or an oversized message are queued to it"
                msgs.append(data)
                total += len(data)
                if total > MAX_PIPE_DATA or len(msgs) > 1 << 16:
                    return [], "more queued messages than a layer keeps"
                if not data:
                    # A zero-length datagram does not move the peek offset: the rest cannot be walked.
                    return [], "an empty datagram is queued to it"
        finally:
            s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, old)
    finally:
        s.close()


def read_anonfds(
    pid: int, fds: list[FdInfo], fdinfo: Mapping[int, str] | None = None
) -> list[dict[str, Any]]:
    """A record (a dict for AnonFdRecord) for each anonymous-inode fd of a kind ckpt restores and
    each unix socket of a socketpair; other fds get none (the restore plan refuses them).
    ``fdinfo``: list_fds' fdinfo texts of this freeze, not read again."""
    cand = [f for f in fds if f.path in ANON_NAMES or f.kind == "socket"]
    if not cand:
        return []
    try:
        diag = unix_diag() if any(f.kind == "socket" for f in cand) else {}
    except (OSError, TargetError, struct.error):
        diag = {}  # no unix_diag here: no socket is recorded, and the restore refuses them as before
    sock_fd = {f.ino: f.fd for f in cand if f.kind == "socket"}
    out: list[dict[str, Any]] = []
    # The open file descriptions recorded so far, by inode: one open file has one inode, so only
    # fds of the same inode are compared (a socket's group is itself and its dups: no kcmp for a
    # socket that has none; the anonymous inode that eventfds, timerfds, ... share: in kcmp's order).
    seen: dict[tuple[int, int], Descriptions] = {}
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        raise TargetError(f"cannot read the fds of process {pid}: pidfd_open: {e.strerror}") from None
    try:
        for f in cand:
            if f.kind == "socket":
                u = diag.get(f.ino)
                if u is None or u["named"] or u["state"] == TCP_LISTEN or u["peer"] not in sock_fd:
                    continue  # not a socketpair inside the process: refused by the plan
                kind = "unix"
            else:
                kind = ANON_NAMES[f.path]
            try:
                dup_of = seen.setdefault((f.dev, f.ino), Descriptions(pid)).first_of(f.fd)
            except NoKcmp:
                return []  # dups cannot be told from separate objects: none recorded, all refused
            rec: dict[str, Any] = {"fd": f.fd, "kind": kind, "dup_of": dup_of}
            rec.update(ints={}, items=[], blobs=[])
            out.append(rec)
            if dup_of >= 0:
                continue
            try:
                text = fdinfo.get(f.fd) if fdinfo is not None else None
                info = read_fdinfo(pid, f.fd) if text is None else fields_of(text)
                if kind == "eventfd":
                    rec.update(_eventfd(info))
                elif kind == "timerfd":
                    rec.update(_timerfd(info))
                elif kind == "signalfd":
                    rec["ints"] = {"sigmask": int(info["sigmask"], 16)}
                elif kind == "epoll":
                    rec.update(_epoll(pid, f.fd))
                else:
                    local = pidfd_getfd(pidfd, f.fd)
                    try:
                        if kind == "inotify":
                            rec.update(_inotify(pid, f.fd, local))
                        else:
                            assert u is not None
                            if u["rqueue"] > MAX_PIPE_DATA:
                                raise TargetError(f"fd {f.fd} has {u['rqueue']} bytes queued")
                            msgs, why = _peek_queue(local, u["type"], u["rqueue"])
                            peer = sock_fd[u["peer"]]
                            rec["ints"] = {"type": u["type"], "peer": peer, "shutdown": u["shutdown"]}
                            with socket.socket(fileno=os.dup(local)) as s:
                                rec["ints"].update(read_options(s))
                            if why:
                                rec["ints"]["unreadable"] = 1
                            rec["blobs"] = msgs
                    finally:
                        os.close(local)
            except (OSError, KeyError, ValueError, IndexError) as e:
                msg = e.strerror if isinstance(e, OSError) else f"cannot parse its fdinfo ({e})"
                raise TargetError(f"cannot read fd {f.fd} ({f.path}) of process {pid}: {msg}") from None
    finally:
        os.close(pidfd)
    return out
