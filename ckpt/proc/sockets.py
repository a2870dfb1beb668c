"""Listening TCP sockets and bound UDP sockets of a process (issue 12 (B) 6): address, port,
backlog (TCP), the address a UDP socket is connected to, options.

Address, backlog and the connections waiting in the accept queue come from the kernel's socket
diagnostics (NETLINK_INET_DIAG, as `ss` reads them: for a listener `idiag_wqueue` is the backlog
given to listen() and `idiag_rqueue` the connections not yet accepted; for UDP `idiag_rqueue` is
the bytes of datagrams not yet read). Options are read with
getsockopt on a copy of the process's fd taken with pidfd_getfd (Linux 5.6+), which leaves the
process's socket as it is; only those that differ from a new socket's are kept.

Read from ckpt's network namespace: a process in another one has its sockets left as they are
(refused at restore as sockets).
"""

from __future__ import annotations

import _socket
import contextlib
import os
import re
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket
else:
    from ckpt.lightstd import socket  # (imported at its first use: a process without sockets never)
from ckpt.proc.fds import FdInfo
from ckpt.proc.pipes import pidfd_getfd

NETLINK_INET_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
TCP_LISTEN = 10
SOCKET_RE = re.compile(r"socket:\[(\d+)\]\Z")

# (level, option): integer options a listener may carry, and its accepted connections inherit.
OPTIONS: tuple[tuple[int, int], ...] = (
    (_socket.SOL_SOCKET, _socket.SO_REUSEADDR),
    (_socket.SOL_SOCKET, _socket.SO_REUSEPORT),
    (_socket.SOL_SOCKET, _socket.SO_KEEPALIVE),
    (_socket.SOL_SOCKET, _socket.SO_RCVBUF),
    (_socket.SOL_SOCKET, _socket.SO_SNDBUF),
    (_socket.SOL_SOCKET, _socket.SO_PRIORITY),
    (_socket.SOL_SOCKET, _socket.SO_RCVLOWAT),
    (_socket.SOL_SOCKET, 36),  # SO_MARK
    (_socket.IPPROTO_TCP, _socket.TCP_NODELAY),
    (_socket.IPPROTO_TCP, _socket.TCP_MAXSEG),
    (_socket.IPPROTO_TCP, _socket.TCP_KEEPIDLE),
    (_socket.IPPROTO_TCP, _socket.TCP_KEEPINTVL),
    (_socket.IPPROTO_TCP, _socket.TCP_KEEPCNT),
    (_socket.IPPROTO_TCP, _socket.TCP_DEFER_ACCEPT),
    (_socket.IPPROTO_TCP, 18),  # TCP_USER_TIMEOUT
    (_socket.IPPROTO_TCP, 23),  # TCP_FASTOPEN
    (_socket.IPPROTO_IP, _socket.IP_TOS),
    (_socket.IPPROTO_IP, _socket.IP_TTL),
    (_socket.IPPROTO_IP, 15),  # IP_FREEBIND
    (_socket.IPPROTO_IP, 19),  # IP_TRANSPARENT
)
V6_OPTIONS: tuple[tuple[int, int], ...] = (
    (_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY),
    (_socket.IPPROTO_IPV6, 16),  # IPV6_UNICAST_HOPS
)


def _diag(family: int, proto: int = _socket.IPPROTO_TCP) -> dict[int, dict[str, Any]]:
    """Listening TCP sockets (or bound UDP sockets) of this network namespace, by inode."""
    out: dict[int, dict[str, Any]] = {}
    states = 1 << TCP_LISTEN if proto == socket.IPPROTO_TCP else 0xFFF
    # struct inet_diag_req_v2: family, protocol, ext, pad, states; inet_diag_sockid (48 bytes)
    req = struct.pack("=BBBBI", family, proto, 0, 0, states) + bytes(48)
    hdr = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_INET_DIAG) as nl:
        nl.sendto(hdr + req, (0, 0))
        while True:
            buf = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(buf):
                length, typ, _, _, _ = struct.unpack_from("=IHHII", buf, off)
                if length < 16 or typ == NLMSG_DONE:
                    return out
                if typ == NLMSG_ERROR:
                    raise OSError(-struct.unpack_from("=i", buf, off + 16)[0], "inet_diag")
                m = off + 16
                fam, state = struct.unpack_from("=BB", buf, m)
                sport, dport = struct.unpack_from("!HH", buf, m + 4)
                n = 16 if fam == socket.AF_INET6 else 4
                src, dst = buf[m + 8 : m + 8 + n], buf[m + 24 : m + 24 + n]
                ifindex = struct.unpack_from("=I", buf, m + 40)[0]
                rq, wq, _uid, ino = struct.unpack_from("=IIII", buf, m + 56)
                if proto == socket.IPPROTO_UDP:
                    out[ino] = {"family": fam, "addr": bytes(src), "port": sport, "ifindex": ifindex,
                                "pending": rq, "backlog": 0, "proto": proto,
                                "peer": bytes(dst) if dport else b"", "peer_port": dport}  # fmt: skip
                elif state == TCP_LISTEN:
                    out[ino] = {"family": fam, "addr": bytes(src), "port": sport, "ifindex": ifindex,
                                "pending": rq, "backlog": wq}  # fmt: skip
                off += (length + 3) & ~3


def _int_options(s: socket.socket, which: Sequence[tuple[int, int]]) -> dict[tuple[int, int], int]:
    out = {}
    for lvl, opt in which:
        with contextlib.suppress(OSError):
            out[(lvl, opt)] = s.getsockopt(lvl, opt)
    return out


def _copy_fd(pid: int, fd: int) -> int:
    """The process's fd `fd` as an fd of ours (same open file), or -1."""
    try:
        pfd = os.pidfd_open(pid)
    except OSError:
        return -1
    try:
        return pidfd_getfd(pfd, fd)
    except OSError:
        return -1
    finally:
        os.close(pfd)


def same_netns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def listening_sockets(pid: int, fds: Sequence[FdInfo]) -> list[dict[str, Any]]:
    """Records of the process's listening TCP sockets (ckpt/image/sockets.py), each once."""
    inos: dict[int, int] = {}
    for f in fds:
        m = SOCKET_RE.match(f.path) if f.kind == "socket" else None
        if m:
            inos.setdefault(int(m.group(1)), f.fd)
    if not inos or not same_netns(pid):
        return []
    found: dict[int, dict[str, Any]] = {}
    for fam in (socket.AF_INET, socket.AF_INET6):
        for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            try:
                found.update({i: r for i, r in _diag(fam, proto).items() if i in inos})
            except OSError:
                continue
    out = []
    for ino, rec in sorted(found.items()):
        which = OPTIONS + (V6_OPTIONS if rec["family"] == socket.AF_INET6 else ())
        dup = _copy_fd(pid, inos[ino])
        if dup < 0:
            continue  # left a plain socket: refused at restore
        try:
            kind = socket.SOCK_DGRAM if rec.get("proto") == socket.IPPROTO_UDP else socket.SOCK_STREAM
            with socket.socket(rec["family"], kind, 0, fileno=dup) as s:
                mine = _int_options(s, which)
            with socket.socket(rec["family"], kind) as fresh:
                default = _int_options(fresh, which)
        except OSError:
            continue
        opts = [[lvl, opt, v] for (lvl, opt), v in mine.items() if default.get((lvl, opt)) != v]
        out.append({"ino": ino, **rec, "options": opts})
    return out
