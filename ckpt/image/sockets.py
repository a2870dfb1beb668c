"""Listening TCP sockets and bound UDP sockets (format version 3, images/FORMAT.md; read by
ckpt/proc/sockets.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ckpt.image.validate import as_bytes, as_int, as_list, as_map, fail, get


class _HasIno(Protocol):
    ino: int


R = TypeVar("R", bound=_HasIno)

AF_INET, AF_INET6 = 2, 10
IPPROTO_TCP, IPPROTO_UDP = 6, 17
MAX_SOCKETS = 1 << 20
MAX_OPTIONS = 64


@dataclass
class InetListenRecord:
    ino: int  # the socket's inode: fds[i].path "socket:[INO]"
    family: int  # AF_INET or AF_INET6
    addr: bytes  # 4 or 16 bytes, network order
    port: int
    ifindex: int  # the scope of a link-local IPv6 address; 0 otherwise
    backlog: int  # as given to listen() (the kernel's sk_max_ack_backlog)
    pending: int  # TCP: connections not yet accepted; UDP: bytes of datagrams not yet read
    options: list[tuple[int, int, int]] = field(default_factory=list)  # (level, option, value)
    proto: int = IPPROTO_TCP  # 6 (a listener) or 17 (UDP)
    peer: bytes = b""  # UDP: the address connect()ed to (peer_port 0: not connected)
    peer_port: int = 0

    def endpoint(self, peer: bool = False) -> str:
        import ipaddress

        ip, port = (self.peer, self.peer_port) if peer else (self.addr, self.port)
        a = ipaddress.ip_address(ip)
        return f"[{a}]:{port}" if self.family == AF_INET6 else f"{a}:{port}"

    def label(self) -> str:
        if self.proto == IPPROTO_TCP:
            return f"the listening TCP socket {self.endpoint()}"
        return f"the UDP socket {self.endpoint()}" + (
            f" connected to {self.endpoint(peer=True)}" if self.peer_port else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ino": self.ino, "family": self.family, "addr": self.addr, "port": self.port,
            "ifindex": self.ifindex, "backlog": self.backlog, "pending": self.pending,
            "options": [list(o) for o in self.options], "proto": self.proto, "peer": self.peer,
            "peer_port": self.peer_port,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, v: Any, where: str) -> InetListenRecord:
        d = as_map(v, where)
        family = as_int(get(d, "family", where), f"{where}.family")
        if family not in (AF_INET, AF_INET6):
            fail(f"{where}.family", f"{family} is not AF_INET or AF_INET6")
        addr = as_bytes(get(d, "addr", where), f"{where}.addr", 16)
        if len(addr) != (4 if family == AF_INET else 16):
            fail(f"{where}.addr", f"{len(addr)} bytes for family {family}")
        proto = as_int(d.get("proto", IPPROTO_TCP), f"{where}.proto")
        if proto not in (IPPROTO_TCP, IPPROTO_UDP):
            fail(f"{where}.proto", f"{proto} is not TCP or UDP")
        peer = as_bytes(d.get("peer", b""), f"{where}.peer", 16)
        if peer and len(peer) != len(addr):
            fail(f"{where}.peer", f"{len(peer)} bytes for family {family}")
        opts = []
        for i, o in enumerate(as_list(get(d, "options", where), f"{where}.options", MAX_OPTIONS)):
            w = f"{where}.options[{i}]"
            vals = as_list(o, w, 3)
            if len(vals) != 3:
                fail(w, "expected [level, option, value]")
            lv, opt, val = (as_int(x, w, 0, (1 << 32) - 1) for x in vals)
            opts.append((lv, opt, val))
        return cls(
            ino=as_int(get(d, "ino", where), f"{where}.ino"),
            family=family,
            addr=addr,
            port=as_int(get(d, "port", where), f"{where}.port", 0, 65535),
            ifindex=as_int(get(d, "ifindex", where), f"{where}.ifindex", 0, (1 << 32) - 1),
            backlog=as_int(get(d, "backlog", where), f"{where}.backlog", 0, (1 << 31) - 1),
            pending=as_int(get(d, "pending", where), f"{where}.pending", 0, (1 << 32) - 1),
            options=opts,
            proto=proto,
            peer=peer,
            peer_port=as_int(d.get("peer_port", 0), f"{where}.peer_port", 0, 65535),
        )


def socket_records(v: Any, name: str, most: int, parse: Callable[[Any, str], R]) -> list[R]:
    """A layer's list of socket records `name` (absent in older layers: none), each parsed and
    bounded by `parse`, at most `most` of them, no socket (inode) twice."""
    if v is None:
        return []
    listed = as_list(v, name, most)
    recs = [parse(r, f"{name}[{i}]") for i, r in enumerate(listed)]
    if len({r.ino for r in recs}) != len(recs):
        fail(name, "a socket appears twice")
    return recs


def sockets_from(v: Any) -> list[InetListenRecord]:
    return socket_records(v, "inet_listen", MAX_SOCKETS, InetListenRecord.from_dict)
