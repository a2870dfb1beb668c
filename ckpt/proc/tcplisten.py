"""Whether a TCP port is held by a listening socket in a process's network namespace
(/proc/PID/net/tcp and tcp6).

A restore binds an established connection's local port in repair mode, which the kernel lets
through beside any other socket on the port (SK_FORCE_REUSE), as CRIU does. ckpt allows that only
beside sockets that do not listen: a connection sharing its port with someone else's live listener
is refused and named (restore/tcp.py), while an ordinary socket that took the port meanwhile (the
ephemeral port of a connection elsewhere: the original was killed, so the port was free for a
moment) must not make the restore fail."""

from __future__ import annotations

import _socket
import struct

LISTEN = 0x0A  # TCP_LISTEN in include/net/tcp_states.h

_ANY4 = bytes(4)
_ANY6 = bytes(16)
_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d


def _address(hexed: str) -> bytes:
    # Each 32-bit word is printed as a host-order integer (%08X): back to network-order bytes.
    return b"".join(struct.pack("=I", int(hexed[i : i + 8], 16)) for i in range(0, len(hexed), 8))


def _holds(local: bytes, family: int, addr: bytes) -> bool:
    """A listener bound to `local` (4 or 16 bytes) conflicts with a bind of `addr` (of `family`)."""
    if local in (_ANY4, _ANY6):
        # A wildcard listener: of the other family too (a dual-stack :: listener holds IPv4 ports;
        # whether it is IPV6_V6ONLY is not in the table, so it counts).
        return True
    if len(local) == len(addr):
        return local == addr
    if family == _socket.AF_INET and len(local) == 16:
        return local == _MAPPED + addr
    return len(addr) == 16 and addr == _MAPPED + local


def listening_on(pid: int, family: int, addr: bytes, port: int) -> bool:
    """Whether a socket listens on `port` at `addr` (or a wildcard) in the network namespace of
    `pid`. An unreadable table counts as a listener: the caller then refuses, naming the port."""
    read = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue  # (no IPv6 in this kernel or namespace)
        except OSError:
            return True
        read += 1
        for row in rows:
            cols = row.split()
            if len(cols) < 4 or int(cols[3], 16) != LISTEN:
                continue
            local, _, hexport = cols[1].partition(":")
            if int(hexport, 16) == port and _holds(_address(local), family, addr):
                return True
    return read == 0  # (neither table: the process is gone, or no /proc/PID/net)
