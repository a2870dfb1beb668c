"""A migration on one machine to a `ckpt serve --pidns`: the copy, inside its new pid namespace,
still takes over the original's bound socket (restore/listenshare.py), which the original holds
outside that namespace, where the copy's helper cannot name it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from tests.test_migrate import Server, server  # noqa: F401 (a fixture)
from tests.test_migrate_listen import UDP, WAIT, _finish, _migrate
from tests.test_restore_tcp import _no_lock_left  # noqa: F401 (a fixture)
from tests.util import Target


def test_bound_udp_socket_taken_over_into_a_pid_namespace(server: Callable[..., Server]) -> None:  # noqa: F811
    """The datagram left unread at the final freeze is read from the very socket by the copy, which
    has the original's pid inside its namespace."""
    t = Target([sys.executable, "-c", UDP], stderr=subprocess.DEVNULL)
    init = 0
    try:
        port = int(t.ready.split()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(WAIT)
            c.sendto(b"before", ("127.0.0.1", port))
            s = server("--pidns")
            rc, err = _finish(_migrate(t, s))
            assert rc == 0, err
            s.done()
            init = int(str(s.last["init_pid"]))
            assert t.proc.wait(30) == -signal.SIGKILL
            assert s.chan.cmd("recv") == f"{t.pid} before"
            assert c.recvfrom(100) == (b"erofeb", ("127.0.0.1", port))
    finally:
        if init:  # an orphan of serve, ours (the fixture makes the test a subreaper): the tree with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(init, 0)
        t.close()
