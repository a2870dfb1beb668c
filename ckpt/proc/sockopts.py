"""Socket options of a unix socketpair end that a new socketpair would not have (tests/zdtm/sockopt00):
read at dump on a copy of the process's fd, set at restore on a copy of the new one (a socket's
options are the socket's, whichever fd sets them). Kept in the record's `ints` as so_NAME."""

from __future__ import annotations

import _socket
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket
else:
    from ckpt.lightstd import socket  # (imported at its first use: a process without sockets never)

SO_RCVBUFFORCE, SO_SNDBUFFORCE, SO_PASSCRED, SO_PASSSEC = 33, 32, 16, 34
TIMEVAL = struct.Struct("=qq")
# name -> (option read, option set); the buffer sizes are read back doubled (the kernel's
# bookkeeping share): set half, with the FORCE variants (ckpt's CAP_NET_ADMIN), past rmem_max too.
INT_OPTIONS = {
    "so_rcvbuf": (_socket.SO_RCVBUF, SO_RCVBUFFORCE),
    "so_sndbuf": (_socket.SO_SNDBUF, SO_SNDBUFFORCE),
    "so_passcred": (SO_PASSCRED, SO_PASSCRED),
    "so_passsec": (SO_PASSSEC, SO_PASSSEC),
    "so_priority": (_socket.SO_PRIORITY, _socket.SO_PRIORITY),
    "so_rcvlowat": (_socket.SO_RCVLOWAT, _socket.SO_RCVLOWAT),
}
TIME_OPTIONS = {"so_rcvtimeo_us": _socket.SO_RCVTIMEO, "so_sndtimeo_us": _socket.SO_SNDTIMEO}
HALVED = ("so_rcvbuf", "so_sndbuf")
INT_MAX = (1 << 31) - 1  # every option above is an int; the image's value is untrusted


def read_options(s: socket.socket) -> dict[str, int]:
    out = {}
    for name, (opt, _) in INT_OPTIONS.items():
        try:
            out[name] = s.getsockopt(socket.SOL_SOCKET, opt)
        except OSError:
            continue  # (SO_PASSSEC without an LSM that has it)
    for name, opt in TIME_OPTIONS.items():
        sec, usec = TIMEVAL.unpack(s.getsockopt(socket.SOL_SOCKET, opt, TIMEVAL.size))
        out[name] = sec * 1_000_000 + usec
    return out


def set_options(s: socket.socket, ints: dict[str, int]) -> list[str]:
    """Set every option `ints` holds; the names of those that did not come back as dumped (or that
    no socket can have: out of an int's range)."""
    bad = []
    for name, (get_opt, set_opt) in INT_OPTIONS.items():
        if name not in ints:
            continue
        want = ints[name]
        if not 0 <= want <= INT_MAX:
            bad.append(name)
            continue
        try:
            if s.getsockopt(socket.SOL_SOCKET, get_opt) == want:
                continue  # already so: a default needs no FORCE (CAP_NET_ADMIN), nor a halving
            s.setsockopt(socket.SOL_SOCKET, set_opt, want // 2 if name in HALVED else want)
            ok = s.getsockopt(socket.SOL_SOCKET, get_opt) == want
        except OSError:
            ok = False
        if not ok:
            bad.append(name)
    for name, opt in TIME_OPTIONS.items():
        if name in ints:
            us = max(0, ints[name])
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, TIMEVAL.pack(us // 1_000_000, us % 1_000_000))
            except (OSError, struct.error):
                bad.append(name)
    return bad
