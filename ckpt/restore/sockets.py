"""Listening TCP sockets and bound UDP sockets made again in the restored process (issue 12 (B) 6):
socket(), its options (those that differed from a new socket's), bind() to the dumped address and
port, listen() with the dumped backlog (TCP) or connect() to the dumped peer (UDP); all injected, so
the socket is the process's own from the start. The address must be free here: `ckpt dump --kill`
frees it, a live original still holds it (EADDRINUSE, named). Connections waiting in the accept
queue and datagrams not yet read at dump time are not restored: the plan refuses those."""

from __future__ import annotations

import _socket
import struct

from ckpt import sysno as nr
from ckpt.image.sockets import AF_INET6, IPPROTO_TCP, InetListenRecord
from ckpt.restore.remote import Remote

SOCKET, CONNECT, BIND, LISTEN, SETSOCKOPT = 41, 42, 49, 50, 54
SOCK_STREAM, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_CLOEXEC = 1, 2, 0o4000, 0o2000000
REUSEADDR = (_socket.SOL_SOCKET, _socket.SO_REUSEADDR)
# Read back doubled (the kernel's bookkeeping share): set half to get the same value back.
HALVED = {(_socket.SOL_SOCKET, _socket.SO_RCVBUF), (_socket.SOL_SOCKET, _socket.SO_SNDBUF)}


def sockaddr(r: InetListenRecord, peer: bool = False) -> bytes:
    addr, port = (r.peer, r.peer_port) if peer else (r.addr, r.port)
    if r.family == AF_INET6:
        scope = struct.pack("=I", 0 if peer else r.ifindex)
        return struct.pack("=H", r.family) + struct.pack("!HI", port, 0) + addr + scope
    return struct.pack("=H", r.family) + struct.pack("!H", port) + addr + bytes(8)


def _set(remote: Remote, fd: int, which: tuple[int, int], v: int, what: str) -> None:
    raw = struct.pack("=i", v - (1 << 32) if v >= 1 << 31 else v)
    remote.check(
        f"setting option {which[0]}/{which[1]} of {what}", SETSOCKOPT, fd, *which, remote.put(raw), 4
    )


def open_listener(remote: Remote, r: InetListenRecord, flags: int) -> int:
    """The listening socket in the helper, with the fd's O_NONBLOCK; its (new) fd number."""
    what = r.label()
    kind = SOCK_STREAM if r.proto == IPPROTO_TCP else SOCK_DGRAM
    # As the fd had it: an fd that lands at its own number is not dup3()ed, which would set it.
    kind |= SOCK_CLOEXEC if flags & nr.O_CLOEXEC else 0
    kind |= SOCK_NONBLOCK if flags & nr.O_NONBLOCK else 0
    fd = remote.check(f"creating {what}", SOCKET, r.family, kind, r.proto)
    try:
        for level, opt, val in r.options:
            _set(remote, fd, (level, opt), val // 2 if (level, opt) in HALVED else val, what)
        # As CRIU: the port may still have connections in TIME_WAIT (the process's own, closed before
        # the dump), which a bind without SO_REUSEADDR refuses; the dumped value is set after it.
        reuse = next((v for lv, o, v in r.options if (lv, o) == REUSEADDR), 0)
        _set(remote, fd, REUSEADDR, 1, what)
        sa = sockaddr(r)
        remote.check(f"binding {what}", BIND, fd, remote.put(sa), len(sa))
        if r.proto == IPPROTO_TCP:
            # listen() checks the port again: connections of the process restored before on it
            # (restore/tcp.py) need SO_REUSEADDR on here too.
            remote.check(f"listening on {what}", LISTEN, fd, r.backlog)
        elif r.peer_port:
            pa = sockaddr(r, peer=True)
            remote.check(f"connecting {what}", CONNECT, fd, remote.put(pa), len(pa))
        _set(remote, fd, REUSEADDR, reuse, what)
    except BaseException:
        remote.syscall(nr.CLOSE, fd)
        raise
    return fd
