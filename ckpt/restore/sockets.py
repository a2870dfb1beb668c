"""Listening TCP sockets made again in the restored process (issue 12 (B) 6): socket(), its options
(those that differed from a new socket's), bind() to the dumped address and port, listen() with the
dumped backlog; all injected, so the socket is the process's own from the start. The address must be
free here: `ckpt dump --kill` frees it, a live original still holds it (EADDRINUSE, named).
Connections waiting in the accept queue at dump time are not restored: the plan refuses those."""

from __future__ import annotations

import socket
import struct

from ckpt import sysno as nr
from ckpt.image.sockets import AF_INET6, InetListenRecord
from ckpt.restore.remote import Remote

SOCKET, BIND, LISTEN, SETSOCKOPT = 41, 49, 50, 54
SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC = 1, 0o4000, 0o2000000
# Read back doubled (the kernel's bookkeeping share): set half to get the same value back.
REUSEADDR = (socket.SOL_SOCKET, socket.SO_REUSEADDR)
HALVED = {(socket.SOL_SOCKET, socket.SO_RCVBUF), (socket.SOL_SOCKET, socket.SO_SNDBUF)}


def sockaddr(r: InetListenRecord) -> bytes:
    if r.family == AF_INET6:
        return (
            struct.pack("=H", r.family)
            + struct.pack("!HI", r.port, 0)
            + r.addr
            + struct.pack("=I", r.ifindex)
        )
    return struct.pack("=H", r.family) + struct.pack("!H", r.port) + r.addr + bytes(8)


def _set(remote: Remote, fd: int, which: tuple[int, int], v: int, what: str) -> None:
    raw = struct.pack("=i", v - (1 << 32) if v >= 1 << 31 else v)
    remote.check(
        f"setting option {which[0]}/{which[1]} of {what}", SETSOCKOPT, fd, *which, remote.put(raw), 4
    )


def open_listener(remote: Remote, r: InetListenRecord, flags: int) -> int:
    """The listening socket in the helper, with the fd's O_NONBLOCK; its (new) fd number."""
    what = f"the listening TCP socket {r.endpoint()}"
    kind = SOCK_STREAM | SOCK_CLOEXEC | (SOCK_NONBLOCK if flags & nr.O_NONBLOCK else 0)
    fd = remote.check(f"creating {what}", SOCKET, r.family, kind, socket.IPPROTO_TCP)
    try:
        for level, opt, val in r.options:
            _set(remote, fd, (level, opt), val // 2 if (level, opt) in HALVED else val, what)
        # As CRIU: the port may still have connections in TIME_WAIT (the process's own, closed before
        # the dump), which a bind without SO_REUSEADDR refuses; the dumped value is set after it.
        reuse = next((v for lv, o, v in r.options if (lv, o) == REUSEADDR), 0)
        _set(remote, fd, REUSEADDR, 1, what)
        sa = sockaddr(r)
        remote.check(f"binding {what}", BIND, fd, remote.put(sa), len(sa))
        _set(remote, fd, REUSEADDR, reuse, what)
        remote.check(f"listening on {what}", LISTEN, fd, r.backlog)
    except BaseException:
        remote.syscall(nr.CLOSE, fd)
        raise
    return fd
