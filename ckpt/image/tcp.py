"""Established TCP connections (format version 4, images/FORMAT.md; read by ckpt/proc/tcp.py with
TCP_REPAIR, made again by ckpt/restore/tcp.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ckpt.image.sockets import socket_records
from ckpt.image.validate import as_bytes, as_int, as_list, as_map, as_str, fail, get

AF_INET, AF_INET6 = 2, 10
MAX_CONNECTIONS = 1 << 16
MAX_OPTIONS = 64
MAX_QUEUE = 64 << 20  # bytes in one queue; the kernel's tcp_wmem/tcp_rmem maxima are far below
U32 = (1 << 32) - 1
LOCK_NAME = re.compile(r"ckpt_lock_[0-9a-f]{1,32}")  # an nftables table of ckpt/netlock.py
REUSEADDR = (1, 2)  # (SOL_SOCKET, SO_REUSEADDR)
REUSE_UNKNOWN = 2  # SK_FORCE_REUSE: SO_REUSEADDR read in repair mode, the process's value lost
WINDOW_FIELDS = ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")  # struct tcp_repair_window


@dataclass
class TcpRecord:
    ino: int  # the socket's inode: fds[i].path "socket:[INO]"
    family: int  # AF_INET or AF_INET6
    addr: bytes  # local address, 4 or 16 bytes, network order
    port: int
    peer: bytes
    peer_port: int
    ifindex: int  # the scope of a link-local IPv6 address; 0 otherwise
    send_seq: int  # TCP_QUEUE_SEQ of the send queue: the sequence number after its last byte
    recv_seq: int  # TCP_QUEUE_SEQ of the receive queue: the next byte expected from the peer
    send_queue: bytes  # written by the process, not yet acknowledged by the peer
    unsent: int  # of which the last `unsent` bytes were never sent (SIOCOUTQNSD)
    recv_queue: bytes  # received and acknowledged, not yet read by the process
    mss: int  # TCP_MAXSEG: the mss clamp given back with TCP_REPAIR_OPTIONS
    tcpi_options: int  # TCP_INFO's tcpi_options: TIMESTAMPS 1, SACK 2, WSCALE 4
    snd_wscale: int
    rcv_wscale: int
    timestamp: int  # TCP_TIMESTAMP: the connection's timestamp clock
    window: list[int]  # TCP_REPAIR_WINDOW, in WINDOW_FIELDS order
    options: list[tuple[int, int, int]] = field(default_factory=list)  # (level, option, value)
    lock: str = ""  # the network lock (ckpt/netlock.py) left by `dump --kill`, lifted by the restore

    def reuseaddr(self) -> int:
        """SO_REUSEADDR as the process had it: among the options when on (read before repair mode;
        a layer of an older ckpt holds repair mode's 2 there, REUSE_UNKNOWN: restore/tcp.py)."""
        return next((v for lv, o, v in self.options if (lv, o) == REUSEADDR), 0)

    def endpoint(self, peer: bool = False) -> str:
        import ipaddress

        ip, port = (self.peer, self.peer_port) if peer else (self.addr, self.port)
        a = ipaddress.ip_address(ip)
        return f"[{a}]:{port}" if self.family == AF_INET6 else f"{a}:{port}"

    def label(self) -> str:
        return f"the TCP connection {self.endpoint()} -> {self.endpoint(peer=True)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ino": self.ino, "family": self.family, "addr": self.addr, "port": self.port,
            "peer": self.peer, "peer_port": self.peer_port, "ifindex": self.ifindex,
            "send_seq": self.send_seq, "recv_seq": self.recv_seq, "send_queue": self.send_queue,
            "unsent": self.unsent, "recv_queue": self.recv_queue, "mss": self.mss,
            "tcpi_options": self.tcpi_options, "snd_wscale": self.snd_wscale,
            "rcv_wscale": self.rcv_wscale, "timestamp": self.timestamp, "window": list(self.window),
            "options": [list(o) for o in self.options], "lock": self.lock,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, v: Any, where: str) -> TcpRecord:
        d = as_map(v, where)
        family = as_int(get(d, "family", where), f"{where}.family")
        if family not in (AF_INET, AF_INET6):
            fail(f"{where}.family", f"{family} is not AF_INET or AF_INET6")
        n = 4 if family == AF_INET else 16
        addr = as_bytes(get(d, "addr", where), f"{where}.addr", 16)
        peer = as_bytes(get(d, "peer", where), f"{where}.peer", 16)
        if len(addr) != n or len(peer) != n:
            fail(f"{where}.addr", f"addresses of {len(addr)} and {len(peer)} bytes for family {family}")
        send_queue = as_bytes(get(d, "send_queue", where), f"{where}.send_queue", MAX_QUEUE)
        unsent = as_int(get(d, "unsent", where), f"{where}.unsent", 0, len(send_queue))
        window = [as_int(x, f"{where}.window", 0, U32) for x in as_list(get(d, "window", where), where, 5)]
        if len(window) != len(WINDOW_FIELDS):
            fail(f"{where}.window", f"{len(window)} values, not {len(WINDOW_FIELDS)}")
        opts = []
        for i, o in enumerate(as_list(d.get("options", []), f"{where}.options", MAX_OPTIONS)):
            w = f"{where}.options[{i}]"
            vals = as_list(o, w, 3)
            if len(vals) != 3:
                fail(w, "expected [level, option, value]")
            lv, opt, val = (as_int(x, w, 0, U32) for x in vals)
            opts.append((lv, opt, val))
        lock = as_str(d.get("lock", ""), f"{where}.lock")
        if lock and not LOCK_NAME.fullmatch(lock):
            fail(f"{where}.lock", "not a lock name of ckpt's")
        return cls(
            ino=as_int(get(d, "ino", where), f"{where}.ino"),
            family=family,
            addr=addr,
            port=as_int(get(d, "port", where), f"{where}.port", 1, 65535),
            peer=peer,
            peer_port=as_int(get(d, "peer_port", where), f"{where}.peer_port", 1, 65535),
            ifindex=as_int(d.get("ifindex", 0), f"{where}.ifindex", 0, U32),
            send_seq=as_int(get(d, "send_seq", where), f"{where}.send_seq", 0, U32),
            recv_seq=as_int(get(d, "recv_seq", where), f"{where}.recv_seq", 0, U32),
            send_queue=send_queue,
            unsent=unsent,
            recv_queue=as_bytes(get(d, "recv_queue", where), f"{where}.recv_queue", MAX_QUEUE),
            mss=as_int(get(d, "mss", where), f"{where}.mss", 0, 65535),
            tcpi_options=as_int(get(d, "tcpi_options", where), f"{where}.tcpi_options", 0, 255),
            snd_wscale=as_int(get(d, "snd_wscale", where), f"{where}.snd_wscale", 0, 14),
            rcv_wscale=as_int(get(d, "rcv_wscale", where), f"{where}.rcv_wscale", 0, 14),
            timestamp=as_int(get(d, "timestamp", where), f"{where}.timestamp", 0, U32),
            window=window,
            options=opts,
            lock=lock,
        )


def tcp_from(v: Any) -> list[TcpRecord]:
    """The layer's "tcp_established" (absent before version 4: none)."""
    return socket_records(v, "tcp_established", MAX_CONNECTIONS, TcpRecord.from_dict)
