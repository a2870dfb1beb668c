"""ckpt.proc.tcplisten: which real sockets count as a listener on a port (restore/tcp.py binds a
connection beside any other socket on its port, but not beside a listener)."""

from __future__ import annotations

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


def test_a_listener_on_the_address_or_a_wildcard_counts() -> None:
    me = os.getpid()
    with _listener(socket.AF_INET, "127.0.0.1") as s:
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
