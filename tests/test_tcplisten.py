"""ckpt.proc.tcplisten: which real sockets count as a listener on a port (restore/tcp.py binds a
connection beside any other socket on its port, but not beside a listener)."""

from __future__ import annotations

import errno
import os
import socket

from ckpt.proc.tcplisten import listening_on

LO4 = socket.inet_pton(socket.AF_INET, "127.0.0.1")
OTHER4 = socket.inet_pton(socket.AF_INET, "127.0.0.2")
LO6 = socket.inet_pton(socket.AF_INET6, "::1")


def _listener(family: int, addr: str) -> socket.socket:
    s = socket.socket(family)
    s.bind((addr, 0))
    s.listen(1)
    return s


def _alone() -> tuple[socket.socket, list[socket.socket]]:
    """A listener on 127.0.0.1, and its port bound (not listening) by this test at 127.0.0.2 and
    [::1] too: no other xdist worker can listen there meanwhile (a bind beside a socket without
    SO_REUSEADDR fails), which the assertions that nothing listens there rely on. A port another
    socket holds at either address is given up for the next one the kernel offers."""
    while True:
        s = _listener(socket.AF_INET, "127.0.0.1")
        port = s.getsockname()[1]
        held: list[socket.socket] = []
        try:
            for fam, addr in ((socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")):
                h = socket.socket(fam)
                held.append(h)
                h.bind((addr, port))
            return s, held
        except OSError as e:
            for h in (s, *held):
                h.close()
            if e.errno != errno.EADDRINUSE:
                raise


def test_a_listener_on_the_address_or_a_wildcard_counts() -> None:
    me = os.getpid()
    s, held = _alone()
    with s, held[0], held[1]:
        port = s.getsockname()[1]
        assert listening_on(me, socket.AF_INET, LO4, port)
        assert not listening_on(me, socket.AF_INET, OTHER4, port)  # another address of lo
        assert not listening_on(me, socket.AF_INET6, LO6, port)
    with _listener(socket.AF_INET, "0.0.0.0") as s:
        port = s.getsockname()[1]
        assert listening_on(me, socket.AF_INET, OTHER4, port)
    with _listener(socket.AF_INET6, "::") as s:  # dual-stack: holds IPv4 ports as well
        port = s.getsockname()[1]
        assert listening_on(me, socket.AF_INET, LO4, port)
        assert listening_on(me, socket.AF_INET6, LO6, port)
    with _listener(socket.AF_INET6, "::ffff:127.0.0.1") as s:
        port = s.getsockname()[1]
        assert listening_on(me, socket.AF_INET, LO4, port)
        assert not listening_on(me, socket.AF_INET, OTHER4, port)


def test_sockets_that_do_not_listen_do_not_count() -> None:
    me = os.getpid()
    with socket.socket() as bound, _listener(socket.AF_INET, "127.0.0.1") as other, socket.socket() as conn:
        bound.bind(("127.0.0.1", 0))
        assert not listening_on(me, socket.AF_INET, LO4, bound.getsockname()[1])
        conn.connect(other.getsockname())
        assert not listening_on(me, socket.AF_INET, LO4, conn.getsockname()[1])


def test_a_process_that_is_gone_counts_as_a_listener() -> None:
    # (the caller then refuses, naming the port, rather than bind beside what it cannot see)
    assert listening_on(2**22 + 1, socket.AF_INET, LO4, 1)
