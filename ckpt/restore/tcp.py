"""Established TCP connections made again in the restored process (issue 12 (B) 6; CRIU's sk-tcp.c
and soccr).

The socket is created by a syscall injected into the helper (so it is the process's own: its
network namespace, its owner), then ckpt takes a copy of the fd (pidfd_getfd) and does the rest on
that copy, with its own CAP_NET_ADMIN (the helper may hold the dumped process's lesser capabilities
while its files are opened):

  with the fds (open): TCP_REPAIR on (no packet leaves it from here); its options; per queue
  TCP_REPAIR_QUEUE + TCP_QUEUE_SEQ = the dumped sequence number less the queue's length; bind() to
  the dumped address (before the process's listeners: one that shares the port would refuse it);
  at the end (finish, after a migration's commit: on one machine the original holds the address
  pair until then): the dump's lock made here if it is not here, connect() to the peer (in repair
  mode connect sends no SYN: the socket is ESTABLISHED at once); TCP_REPAIR_OPTIONS (mss, window
  scales, SACK, timestamps), TCP_TIMESTAMP; the receive queue sent in repair mode into the receive
  queue (the process reads it as before) and the part of the send queue that had been sent into the
  send queue (as sent, not yet acknowledged: retransmitted if the peer never got it);
  TCP_REPAIR_WINDOW.

The socket stays in repair mode until then, the restore's very last step before the process runs:
TCP_REPAIR off (a window probe tells the peer we are back), the bytes never sent sent normally,
SO_REUSEADDR back to the dumped value, and the network lock the dump left (ckpt/netlock.py)
lifted. A restore that fails before then closes the sockets in repair mode (no FIN, no reset,
nothing left in FIN-WAIT holding the port) while the peer's packets are still dropped: the peer
notices nothing and the restore can be tried again. A tree's restore connects every process's
connections before it brings any live (finish_all).
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket
else:
    from ckpt.lightstd import socket  # (imported at its first use: a process without sockets never)
from ckpt import netlock
from ckpt import sysno as nr
from ckpt.errors import CkptError, RestoreError
from ckpt.image.tcp import REUSE_UNKNOWN, TcpRecord
from ckpt.proc.sockets import _copy_fd
from ckpt.proc.tcp import (
    SOL_TCP,
    TCP_QUEUE_SEQ,
    TCP_RECV_QUEUE,
    TCP_REPAIR,
    TCP_REPAIR_ON,
    TCP_REPAIR_QUEUE,
    TCP_REPAIR_WINDOW,
    TCP_SEND_QUEUE,
    TCP_TIMESTAMP,
)
from ckpt.proc.tcplisten import listening_on
from ckpt.restore.remote import Remote
from ckpt.restore.sockets import SOCKET

SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC = 1, 0o4000, 0o2000000
SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 7, 8, 32, 33
TCP_REPAIR_OPTIONS = 22
TCP_NO_QUEUE = 0
TCP_REPAIR_OFF = 0
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
MIN_CHUNK = 1024
REUSEADDR = (_socket.SOL_SOCKET, _socket.SO_REUSEADDR)
FREEBIND: dict[int, tuple[int, int]] = {
    _socket.AF_INET: (_socket.IPPROTO_IP, 15),
    _socket.AF_INET6: (_socket.IPPROTO_IPV6, 78),
}
# Set with the FORCE variants (an autotuned buffer may be past the sysctl maxima a plain set is
# held to), and halved: the kernel doubles what it is given and reads back the doubled value.
FORCED = {(_socket.SOL_SOCKET, SO_SNDBUF): SO_SNDBUFFORCE, (_socket.SOL_SOCKET, SO_RCVBUF): SO_RCVBUFFORCE}


def _fill(s: socket.socket, queue: int, data: bytes, what: str) -> None:
    """`data` into `queue` (repair mode): the receive queue takes one skb per send, and one too big
    for the socket's memory is refused (ENOMEM): smaller pieces then, as CRIU does."""
    if not data:
        return
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
    view, off, chunk = memoryview(data), 0, len(data)
    while off < len(data):
        try:
            off += s.send(view[off : off + chunk], socket.MSG_DONTWAIT)
        except OSError as e:
            if e.errno in (errno.ENOMEM, errno.EAGAIN) and chunk > MIN_CHUNK:
                chunk //= 2
                continue
            raise RestoreError(
                f"refilling the {'receive' if queue == TCP_RECV_QUEUE else 'send'} queue of {what} "
                f"failed at byte {off} of {len(data)}: {e.strerror}"
            ) from None


def _repair(s: socket.socket, r: TcpRecord, steps: Callable[[socket.socket, TcpRecord], None]) -> None:
    try:
        steps(s, r)
    except _Step as e:
        raise RestoreError(f"{e.args[0]} {r.label()} failed: {e.args[1]}") from None


class _Step(Exception):
    pass


def _step(name: str, fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except OSError as e:
        raise _Step(name, e.strerror or str(e)) from None


def _bind_steps(
    s: socket.socket, r: TcpRecord, beside_listener: bool = False, netns_of: int | None = None
) -> None:
    """Options, sequence numbers and the local address; `s` is in repair mode. Before the process's
    listeners are made: a repair-mode bind beside another socket's port is let through
    (SK_FORCE_REUSE), but not once that socket listens. `netns_of`: a process in the socket's
    network namespace, whose listeners are looked at when the port is taken."""
    for level, opt, val in r.options:
        forced = FORCED.get((level, opt))
        v = val // 2 if forced else val
        _step(
            f"setting option {level}/{opt} of",
            s.setsockopt,
            level,
            forced or opt,
            v - (1 << 32) if v >= 1 << 31 else v,
        )
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("=I", (r.recv_seq - len(r.recv_queue)) & 0xFFFFFFFF))
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("=I", (r.send_seq - len(r.send_queue)) & 0xFFFFFFFF))
    # On until finish(): a listener of the process may be bound to the same port after this (one
    # that accepted this connection), as CRIU does.
    s.setsockopt(*REUSEADDR, 1)
    if beside_listener:
        # Repair mode again: SO_REUSEADDR (above, or among the options: an accepted connection
        # inherits its listener's) overwrote the SK_FORCE_REUSE that TCP_REPAIR gave, and only that
        # lets the bind through beside a socket listening on the port: the process's own listener,
        # live (a migration on one machine hands it over, restore/listenshare.py). Beside anyone
        # else's listener the bind still fails, naming the connection.
        s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    ip = socket.inet_ntop(r.family, r.addr)
    six = r.family == socket.AF_INET6
    where = (ip, r.port, 0, r.ifindex) if six else (ip, r.port)
    try:
        try:
            _bind(s, r, where, beside_listener, netns_of)
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                raise
            # Not this host's address yet: a migration to another host or namespace, where the
            # network moves it at the commit (migrate/netmove.py), before finish() connects.
            # IP_FREEBIND for the bind only (a connected socket no longer uses it).
            freebind = FREEBIND[r.family]
            s.setsockopt(*freebind, 1)
            s.bind(where)
            # One flag behind both options; the dump records it as IP_FREEBIND for either family.
            was = next((v for lv, o, v in r.options if (lv, o) == FREEBIND[socket.AF_INET]), 0)
            s.setsockopt(*freebind, was)
    except OSError as e:
        # A socket taken back after a repair-mode disconnect may have kept its port (one accepted
        # from a listener bound to it keeps the listener's SOCK_BINDPORT_LOCK): bound already.
        # (One that lost it still shows it in getsockname: only the bind tells.)
        if e.errno != errno.EINVAL or s.getsockname()[1] != r.port:
            raise _Step("binding", e.strerror or str(e)) from None


def _bind(
    s: socket.socket, r: TcpRecord, where: tuple[Any, ...], beside_listener: bool, netns_of: int | None
) -> None:
    try:
        s.bind(where)
    except OSError as e:
        if e.errno != errno.EADDRINUSE or beside_listener or netns_of is None:
            raise
        # The port is taken by another socket: the original's port, free from its kill until now,
        # may have become the ephemeral port of any connection of this namespace. A connection's
        # port may be shared (it is its address pair that must be unique, which the connect in
        # repair mode checks), as CRIU binds it: in repair mode, whose SK_FORCE_REUSE the
        # SO_REUSEADDR above overwrote. Not beside a listener: that is someone else's service on
        # the port, and the restore is refused, naming the connection.
        if listening_on(netns_of, r.family, r.addr, r.port):
            raise
        s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        s.bind(where)


def _connect_steps(s: socket.socket, r: TcpRecord) -> None:
    """The connection itself: connect (in repair mode: no SYN, ESTABLISHED at once) and the options
    negotiated at its start."""
    peer = socket.inet_ntop(r.family, r.peer)
    six = r.family == socket.AF_INET6
    # No SYN in repair mode: the socket is ESTABLISHED at once.
    try:
        s.connect((peer, r.peer_port, 0, r.ifindex) if six else (peer, r.peer_port))
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno in (errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH):
            why += (
                f" ({socket.inet_ntop(r.family, r.addr)} is not an address of this host: a migration "
                "to another host or network namespace must move it there at the commit: migrate --on-commit)"
            )
        raise _Step("connecting", why) from None
    local = s.getsockname()
    if socket.inet_pton(r.family, local[0]) != r.addr or local[1] != r.port:
        raise _Step("connecting", f"the kernel chose the local end {local[0]}:{local[1]}, not {r.endpoint()}")
    opts = [(TCPOPT_MAXSEG, r.mss)]
    if r.tcpi_options & TCPI_OPT_SACK:
        opts.append((TCPOPT_SACK_PERM, 0))
    if r.tcpi_options & TCPI_OPT_WSCALE:
        opts.append((TCPOPT_WINDOW, r.snd_wscale | (r.rcv_wscale << 16)))
    if r.tcpi_options & TCPI_OPT_TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    raw = b"".join(struct.pack("=II", *o) for o in opts)
    _step("setting TCP_REPAIR_OPTIONS of", s.setsockopt, SOL_TCP, TCP_REPAIR_OPTIONS, raw)
    if r.tcpi_options & TCPI_OPT_TIMESTAMPS:
        _step(
            "setting TCP_TIMESTAMP of", s.setsockopt, SOL_TCP, TCP_TIMESTAMP, struct.pack("=I", r.timestamp)
        )


def prepare(
    s: socket.socket, r: TcpRecord, beside_listener: bool = False, netns_of: int | None = None
) -> None:
    """`s` (in repair mode, not connected) given the options, sequence numbers and address of `r`;
    `beside_listener`: the port may be held by a live listener of the process's own; `netns_of`:
    a process in the socket's network namespace (its listeners are looked at if the port is taken)."""
    _repair(s, r, lambda s, r: _bind_steps(s, r, beside_listener, netns_of))


def rebuild(s: socket.socket, r: TcpRecord) -> None:
    """The connection `r` made again on `s` (prepared, in repair mode): connected, its queues and
    window. It stays in repair mode."""
    what = r.label()
    _repair(s, r, _connect_steps)
    try:
        _fill(s, TCP_RECV_QUEUE, r.recv_queue, what)
        _fill(s, TCP_SEND_QUEUE, r.send_queue[: len(r.send_queue) - r.unsent], what)
        s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("=5I", *r.window))
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    except OSError as e:
        raise RestoreError(f"restoring {what} failed: {e.strerror or e}") from None


def go_live(s: socket.socket, r: TcpRecord) -> None:
    """Repair mode off (a window probe tells the peer we are back), the bytes never sent sent, and
    SO_REUSEADDR as it was."""
    s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
    _send_unsent(s, r)


def _send_unsent(s: socket.socket, r: TcpRecord) -> None:
    unsent = r.send_queue[len(r.send_queue) - r.unsent :]
    off = 0
    while off < len(unsent):
        off += s.send(unsent[off:], socket.MSG_DONTWAIT)
    # (TCP_REPAIR off reset it to 0: proc/tcp.py)
    s.setsockopt(*REUSEADDR, r.reuseaddr())


def flows(records: list[TcpRecord]) -> list[netlock.Flow]:
    return [netlock.Flow(r.family, r.addr, r.port, r.peer, r.peer_port) for r in records]


class TcpRestore:
    """The connections of one restored process, from their creation to finish() (or close(): the
    restore failed, and they go silently).

    open() makes each socket (in repair mode, bound, at its fd); finish() connects them, after the
    migration's commit (before_run): on one machine the original's sockets hold the same address
    pairs until the source lets them go at its commit (a repair-mode connect of a pair in use is
    EADDRNOTAVAIL), and they are let go only then, so that a failure before it leaves the original
    whole (ckpt/migrate/tcpmove.py)."""

    def __init__(self, helper: int) -> None:
        self.helper = helper
        self.conns: list[tuple[socket.socket, TcpRecord]] = []
        self.placed: dict[int, int] = {}  # record index -> the fd it was restored at
        self.finished = False
        self.made: list[str] = []  # locks made here (not found): lifted here on a failure
        self.checked: set[str] = set()  # locks made or found here
        self.handed_over: set[int] = set()  # ports of listeners taken over (restore/listenshare.py)
        self.notes: list[str] = []  # warnings for the restore's user

    def open(self, remote: Remote, r: TcpRecord, flags: int) -> int:
        """The connection's socket in the helper, with the fd's O_NONBLOCK, in repair mode (made
        a connection by finish()); its fd number."""
        what = r.label()
        if r.reuseaddr() == REUSE_UNKNOWN:
            # An older ckpt read SO_REUSEADDR in repair mode (proc/tcp.py): 0 or 1 is unknown. Set
            # as it stands (2) it is on, as those ckpts restored it; harmless for a bound,
            # established socket, and refusing would leave their `dump --kill` layers dead.
            self.notes.append(
                f"{what}: SO_REUSEADDR restored on; the ckpt that wrote the layer did not record "
                "the process's value (0 or 1)"
            )
        kind = SOCK_STREAM | (SOCK_NONBLOCK if flags & nr.O_NONBLOCK else 0)
        kind |= SOCK_CLOEXEC if flags & nr.O_CLOEXEC else 0  # kept as it is when it lands at its number
        fd = remote.check(f"creating the socket of {what}", SOCKET, r.family, kind, SOL_TCP)
        try:
            dup = _copy_fd(self.helper, fd)
            if dup < 0:
                raise RestoreError(f"cannot take a copy of the socket of {what} (pidfd_getfd)")
            s = socket.socket(fileno=dup)
            try:
                s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
            except OSError as e:
                s.close()
                raise RestoreError(f"{what}: TCP_REPAIR (CAP_NET_ADMIN, Linux 3.5+): {e.strerror}") from None
            self.conns.append((s, r))
            prepare(s, r, r.port in self.handed_over, self.helper)
        except BaseException:
            remote.syscall(nr.CLOSE, fd)
            raise
        return fd

    def lock_here(self) -> None:
        """The dump's lock over these connections, made here if it is not here (another machine or
        network namespace than the dump's). Once every socket is made, before the commit: the
        network may move a connection's address here at the commit (migrate/netmove.py), and a
        packet of the peer that met the address with no lock and no socket would be answered by a
        reset."""
        for name in sorted({r.lock for _, r in self.conns if r.lock} - self.checked):
            try:
                if netlock.ensure(name, flows([r for _, r in self.conns if r.lock == name])):
                    self.made.append(name)
            except CkptError as e:
                raise RestoreError(str(e)) from None
            self.checked.add(name)

    def finish(self) -> None:
        """The last step before the process runs: the connections made and live again. The lock
        the dump named is made here first if it is not here (another machine than the dump's): no
        packet of the peer may meet the address pair with no socket, or the kernel resets it."""
        self.connect()
        self.go_live()

    def connect(self) -> None:
        """The first half of finish(): the lock here, the connections made, still in repair mode
        (a failure from here on leaves the peer none the wiser)."""
        if not self.conns:
            return
        self.lock_here()
        for s, r in self.conns:
            rebuild(s, r)
        if os.environ.get("CKPT_RESTORE_TEST_FAIL_CONNECTED") == "1":
            # Tests: the worst moment to fail, the address pairs taken by this restore's sockets.
            raise RestoreError("test: failing with the TCP connections made, before they run")

    def go_live(self) -> None:
        """The second half: out of repair mode, the never-sent bytes sent, the lock lifted."""
        for s, r in self.conns:
            try:
                s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
            except OSError as e:
                raise RestoreError(f"bringing {r.label()} back failed: {e.strerror or e}") from None
        self.finished = True
        for name in sorted({r.lock for _, r in self.conns if r.lock}):
            try:
                netlock.unlock(name)
            except CkptError as e:
                raise RestoreError(str(e)) from None
        # After the unlock: sent under the lock they would be dropped, and go out again only when
        # the retransmission timer fires (a restored socket has no RTT yet: 1 s).
        for s, r in self.conns:
            try:
                _send_unsent(s, r)
            except OSError as e:
                what = f"sending the unsent bytes of {r.label()}"
                raise RestoreError(f"{what} failed: {e.strerror or e}") from None

    def later(self) -> TcpRestore:
        """The connections of this process, finished by the caller (a tree's restore finishes every
        process's together: finish_all)."""
        moved = TcpRestore(self.helper)
        moved.conns, moved.placed = self.conns, self.placed
        moved.made, moved.checked = self.made, self.checked
        self.made, self.checked = [], set()
        self.conns, self.placed = [], {}
        return moved

    def close(self) -> None:
        """ckpt's copies go; sockets not finished stay in repair mode, so that closing them (with
        the helper) sends nothing."""
        for s, _ in self.conns:
            with contextlib.suppress(OSError):
                s.close()
        self.conns = []
        if not self.finished:
            for name in self.made:  # (the dump's own lock, if it is here, stays for a retry)
                with contextlib.suppress(CkptError):
                    netlock.unlock(name)
        self.made = []


def finish_all(restores: list[TcpRestore]) -> None:
    """Every process's connections made first, all still in repair mode, then all brought live: a
    failure in the first half leaves every connection silent (the two ends of one inside a tree
    among them)."""
    for t in restores:
        t.connect()
    for t in restores:
        t.go_live()
