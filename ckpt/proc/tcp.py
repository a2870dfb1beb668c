"""Established TCP connections of a process, read with TCP_REPAIR (issue 12 (B) 6; CRIU's sk-tcp.c
and soccr). Only with `ckpt dump --tcp-established` (or `ckpt migrate --tcp-established`,
ckpt/migrate/tcpmove.py): without it a dump of a process holding one is refused, naming it. A
pre-dump (a migration's live round) leaves them alone: they are no state of a live layer.

The socket is reached through a copy of the process's fd taken with pidfd_getfd (Linux 5.6+): the
same socket, so nothing is injected into the frozen process. In order:
  1. the network lock (ckpt/netlock.py) drops every packet of the connections, so that no ACK or
     segment changes the state while it is read, and the peer's packets are not answered by a reset
     while no socket holds the connection (after --kill, until the restore);
  2. TCP_REPAIR on (needs CAP_NET_ADMIN; Linux 3.5+, TCP_REPAIR_WINDOW 4.8+): the socket then sends
     nothing, and its queues and sequence numbers can be read;
  3. per queue (TCP_REPAIR_QUEUE): TCP_QUEUE_SEQ and its bytes (recv with MSG_PEEK, which leaves
     them queued); TCP_INFO's options and window scales, TCP_MAXSEG, TCP_TIMESTAMP,
     TCP_REPAIR_WINDOW, SIOCOUTQNSD (how much of the send queue was never sent), the options that
     differ from a new socket's;
  4. a dump that leaves the process running takes repair mode off again (TCP_REPAIR_OFF_NO_WP: the
     connection is as it was, nothing is sent), gives SO_REUSEADDR back (below) and lifts the lock
     before the thaw. `--kill` keeps
     both: the sockets are closed in repair mode after the kill (a silent close: no FIN, no reset)
     and the lock stays until `ckpt restore` lifts it.
Every failure path takes repair mode off and lifts the lock: the process never notices a dump.

Repair mode owns SO_REUSEADDR: TCP_REPAIR on sets sk_reuse to SK_FORCE_REUSE (getsockopt reads 2)
and either TCP_REPAIR off sets it to SK_NO_REUSE (0), whatever the process had. (No other option:
SO_REUSEPORT is a field of its own; a listener cannot enter repair mode, EPERM.) So SO_REUSEADDR is
read before repair mode (the record's options hold that value) and set back after every way out
of it (`repair_off`), here, in tcpmove.py, guardtcp.py and the restore (restore/tcp.py).
"""

from __future__ import annotations

import _socket
import contextlib
import fcntl
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket
else:
    from ckpt.lightstd import socket  # (imported at its first use: a process without sockets never)
from ckpt import netlock
from ckpt.errors import CkptError
from ckpt.proc.fds import FdInfo
from ckpt.proc.sockets import OPTIONS, SOCKET_RE, V6_OPTIONS, _copy_fd, _int_options, same_netns

SOL_TCP = _socket.IPPROTO_TCP
TCP_INFO, TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 11, 19, 20, 21
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCP_REPAIR_ON, TCP_REPAIR_OFF_NO_WP = 1, -1
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
TCP_ESTABLISHED = 1
SO_DOMAIN, SO_PROTOCOL = 39, 38
# Not options of an established connection: the mss is given back with TCP_REPAIR_OPTIONS, the
# others concern connection set-up only.
SKIPPED = {(SOL_TCP, _socket.TCP_MAXSEG), (SOL_TCP, _socket.TCP_DEFER_ACCEPT), (SOL_TCP, 23)}
REUSEADDR = (_socket.SOL_SOCKET, _socket.SO_REUSEADDR)


# The SO_REUSEADDR of each socket a TcpDump of this ckpt holds in repair mode, by inode: the one
# connection that two members of a tree share (forked after accept) is met by the later member's
# TcpDump in repair mode already, where SO_REUSEADDR reads 2, not the process's value.
_HELD: dict[int, int] = {}


def reuseaddr(s: socket.socket) -> int:
    """SO_REUSEADDR as the process set it (0 or 1); read out of repair mode only (module doc)."""
    return 1 if s.getsockopt(*REUSEADDR) else 0


def repair_off(s: socket.socket, reuse: int) -> None:
    """Repair mode off without a window probe, and SO_REUSEADDR back to `reuse` (the process's
    value, read before repair mode: leaving it resets it to 0)."""
    s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    s.setsockopt(*REUSEADDR, reuse)


def _ioctl_int(s: socket.socket, req: int) -> int:
    return int(struct.unpack("=i", fcntl.ioctl(s.fileno(), req, bytes(4)))[0])


def _peek(s: socket.socket, queue: int, n: int) -> tuple[int, bytes]:
    """TCP_QUEUE_SEQ of `queue` and its `n` bytes (MSG_PEEK: they stay queued)."""
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
    seq = struct.unpack("=I", s.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4))[0]
    data = b""
    while len(data) < n:
        # MSG_PEEK always starts at the head of the queue: ask for all of it each time.
        got = s.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(got) <= len(data):
            break
        data = got
    if len(data) != n:
        raise OSError(0, f"{len(data)} of the {n} queued bytes could be read")
    return seq, data


def _read(s: socket.socket, family: int, reuse: int) -> dict[str, Any]:
    """The connection's state; `s` is in repair mode, `reuse` its SO_REUSEADDR from before."""
    info = s.getsockopt(SOL_TCP, TCP_INFO, 8)
    addr, port = s.getsockname()[:2]
    peer, peer_port = s.getpeername()[:2]
    scope = s.getsockname()[3] if family == socket.AF_INET6 else 0
    outq, unsent = _ioctl_int(s, SIOCOUTQ), _ioctl_int(s, SIOCOUTQNSD)
    send_seq, send_queue = _peek(s, TCP_SEND_QUEUE, outq)
    inq = _ioctl_int(s, SIOCINQ)
    recv_seq, recv_queue = _peek(s, TCP_RECV_QUEUE, inq)
    window = list(struct.unpack("=5I", s.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20)))
    which = tuple(o for o in OPTIONS + (V6_OPTIONS if family == socket.AF_INET6 else ()) if o not in SKIPPED)
    mine = _int_options(s, which)
    if REUSEADDR in mine:
        mine[REUSEADDR] = reuse  # (repair mode's own reads 2)
    with socket.socket(family, socket.SOCK_STREAM) as fresh:
        default = _int_options(fresh, which)
    return {
        "family": family,
        "addr": socket.inet_pton(family, addr),
        "port": port,
        "peer": socket.inet_pton(family, peer),
        "peer_port": peer_port,
        "ifindex": scope,
        "send_seq": send_seq,
        "recv_seq": recv_seq,
        "send_queue": send_queue,
        "unsent": min(unsent, outq),
        "recv_queue": recv_queue,
        "mss": s.getsockopt(SOL_TCP, socket.TCP_MAXSEG),
        "tcpi_options": info[5],
        "snd_wscale": info[6] & 0xF,
        "rcv_wscale": info[6] >> 4,
        "timestamp": struct.unpack("=I", s.getsockopt(SOL_TCP, TCP_TIMESTAMP, 4))[0],
        "window": window,
        "options": [[lv, o, v & 0xFFFFFFFF] for (lv, o), v in mine.items() if default.get((lv, o)) != v],
    }


def _established(s: socket.socket) -> int:
    """The family of an established TCP socket, or 0."""
    try:
        family = s.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)
        if family not in (socket.AF_INET, socket.AF_INET6):
            return 0
        if s.getsockopt(socket.SOL_SOCKET, SO_PROTOCOL) != socket.IPPROTO_TCP:
            return 0
        return family if s.getsockopt(SOL_TCP, TCP_INFO, 1)[0] == TCP_ESTABLISHED else 0
    except OSError:
        return 0


class TcpDump:
    """The established connections of one dump, from the freeze to the end of the dump (a context
    manager: its exit takes repair mode off and lifts the lock unless killed() said the process is
    gone, in which case the sockets are closed in repair mode and the lock is left for the restore)."""

    def __init__(
        self,
        enabled: bool,
        keep: bool,
        in_tree: bool = False,
        force: bool = False,
        live: bool = False,
        command: str = "dump",
        hold: bool = False,
    ) -> None:
        self.enabled = enabled
        # A pre-dump (a migration's live round): the connections are no state of it (the final
        # dump locks and reads them), so it neither refuses nor touches them.
        self.live = live
        self.command = command  # what the refusal without --tcp-established names
        self.force = force  # --kill --force without --tcp-established: left as plain sockets
        self.keep = keep  # --kill: the lock stays until the restore
        # A tree's member: locked and in repair mode until every member is read (dumptree.py
        # releases them all before the thaw), so that the two ends of a connection inside the tree
        # are read at one moment, with no segment moving between them in between.
        self.hold = hold
        self.in_tree = in_tree
        self.socks: list[socket.socket] = []
        self.repair: list[socket.socket] = []
        self.reuse: dict[socket.socket, int] = {}  # SO_REUSEADDR of each, read before repair mode
        self.held: list[int] = []  # the inodes this one entered in _HELD
        self.lock = ""
        self._killed = False
        self.taken: list[tuple[socket.socket, dict[str, Any]]] = []  # each socket with its record
        # A migration's (tcpmove.py): told (pid, the lock's name, the sockets' inodes) before the
        # lock is made and repair mode set, so that its guard can undo them if ckpt dies.
        # The last list: the inodes whose SO_REUSEADDR is on (repair mode resets it).
        self.announce: Callable[[int, str, list[int], list[int]], None] | None = None

    def __enter__(self) -> TcpDump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def killed(self) -> None:
        """The process was killed: its connections now live only in the image."""
        self._killed = True

    def release(self) -> None:
        if not self._killed:
            for s in self.repair:
                with contextlib.suppress(OSError):
                    repair_off(s, self.reuse.get(s, 0))
        self.repair = []
        for ino in self.held:
            _HELD.pop(ino, None)
        self.held = []
        for s in self.socks:
            s.close()  # in repair mode (killed): the kernel drops the connection without a word
        self.socks = []
        self.reuse = {}
        self.taken = []
        if self.lock and not self._killed:
            netlock.unlock(self.lock)
        self.lock = ""

    def collect(self, pid: int, fds: Sequence[FdInfo]) -> list[dict[str, Any]]:
        """Records of the process's established TCP connections (ckpt/image/tcp.py), each once;
        refuses (CkptError) those it cannot take, naming them."""
        if self.live:
            return []
        found: dict[int, tuple[int, socket.socket]] = {}
        names: dict[int, str] = {}
        try:
            for ino, fd, family, s in established(pid, fds):
                found[ino] = (family, s)
                self.socks.append(s)
                try:
                    names[ino] = f"fd {fd} (a TCP connection {_ends(s)})"
                except OSError:
                    names[ino] = f"fd {fd} (an established TCP connection)"
            if not found:
                return []
            listed = "; ".join(names.values())
            if not self.enabled and self.force:
                self.release()
                return []  # the restore refuses them as sockets, as --force accepts
            if not self.enabled:
                raise CkptError(
                    f"process {pid} has established TCP connections: {listed}; {self.command} it "
                    "with --tcp-established (the connections are locked and read with TCP_REPAIR)"
                )
            if not same_netns(pid):
                raise CkptError(
                    f"process {pid} is in another network namespace than ckpt: its TCP connections "
                    f"cannot be locked from here ({listed})"
                )
            flows = []
            for family, s in found.values():
                (a, p), (pa, pp) = s.getsockname()[:2], s.getpeername()[:2]
                flows.append(
                    netlock.Flow(family, socket.inet_pton(family, a), p, socket.inet_pton(family, pa), pp)
                )
            for ino, (_, s) in found.items():
                # One an earlier member of the tree holds (forked after accept) is in repair mode,
                # where it reads 2: its value is the one that member read before.
                self.reuse[s] = _HELD[ino] if ino in _HELD else reuseaddr(s)
            name = netlock.new_name()
            if self.announce is not None:
                on = sorted(ino for ino, (_, s) in found.items() if self.reuse[s])
                self.announce(pid, name, sorted(found), on)
            self.lock = netlock.lock(flows, name)
            out = []
            for ino, (family, s) in sorted(found.items()):
                try:
                    s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
                except OSError as e:
                    raise CkptError(
                        f"cannot put {names[ino]} in repair mode (TCP_REPAIR needs CAP_NET_ADMIN and "
                        f"Linux 3.5+): {e.strerror}"
                    ) from None
                self.repair.append(s)
                if ino not in _HELD:
                    _HELD[ino] = self.reuse[s]
                    self.held.append(ino)
                try:
                    rec = _read(s, family, self.reuse[s])
                except OSError as e:
                    raise CkptError(f"cannot read the state of {names[ino]}: {e.strerror or e}") from None
                out.append({"ino": ino, **rec, "lock": self.lock if self.keep else ""})
                self.taken.append((s, out[-1]))
            if not self.keep and not self.hold:
                self.release()
            return out
        except BaseException:
            self.release()
            raise


def _end(a: tuple[Any, ...]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def _ends(s: socket.socket, sep: str = " -> ") -> str:
    """LOCAL{sep}PEER of a connected socket."""
    return f"{_end(s.getsockname())}{sep}{_end(s.getpeername())}"


def _maybe_tcp(pid: int, fd: int) -> bool:
    """False only where the socket's protocol is surely not TCP: sockfs names each socket's file
    after the protocol that made it ("TCP", "TCPv6", "UNIX-STREAM", "UDP", "MPTCP": the xattr
    system.sockprotoname), one call where a copy of the fd and three getsockopts cost eight (a
    process of 500 unix sockets: ~5 ms of its freeze). Any doubt (the xattr not there): True."""
    try:
        name = os.getxattr(f"/proc/{pid}/fd/{fd}", "system.sockprotoname")
    except OSError:
        return True
    return name.startswith(b"TCP")


def established(pid: int, fds: Sequence[FdInfo]) -> Iterator[tuple[int, int, int, socket.socket]]:
    """(inode, fd, family, our copy of the socket) of each established TCP connection among
    ``fds`` of ``pid``, each once (a socket at several fds is one connection); the caller owns and
    closes each socket yielded."""
    seen: set[int] = set()
    for f in fds:
        m = SOCKET_RE.match(f.path) if f.kind == "socket" else None
        if m is None or int(m.group(1)) in seen or not _maybe_tcp(pid, f.fd):
            continue
        dup = _copy_fd(pid, f.fd)
        if dup < 0:
            continue
        try:
            s = socket.socket(fileno=dup)
        except OSError:  # a family Python cannot wrap: not TCP
            os.close(dup)
            continue
        family = _established(s)
        if not family:
            s.close()
            continue
        seen.add(int(m.group(1)))
        yield int(m.group(1)), f.fd, family, s


def probe_tcp_repair() -> tuple[bool, str]:
    """For `ckpt check`: TCP_REPAIR tried on a loopback connection of our own."""
    try:
        with socket.socket() as lst:
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            with socket.create_connection(lst.getsockname()[:2], timeout=5) as c:
                peer, _ = lst.accept()
                with peer:
                    c.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
                    try:
                        c.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
                        c.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4)
                        c.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20)
                    finally:
                        c.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    except OSError as e:
        return False, f"{e.strerror or e} (needs CAP_NET_ADMIN, Linux 3.5+; the window 4.8+)"
    return True, "TCP_REPAIR with its queues and window"
