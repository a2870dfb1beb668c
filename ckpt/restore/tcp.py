"""Established TCP connections made again in the restored process (issue 12 (B) 6; CRIU's sk-tcp.c
and soccr), all by syscalls injected into the helper so that the socket is the process's own:

  socket(); TCP_REPAIR on (no packet leaves it from here); its options; per queue TCP_REPAIR_QUEUE
  + TCP_QUEUE_SEQ = the dumped sequence number less the queue's length; bind() to the dumped
  address and connect() to the peer (in repair mode connect sends no SYN: the socket is
  ESTABLISHED at once); TCP_REPAIR_OPTIONS (mss, window scales, SACK, timestamps), TCP_TIMESTAMP;
  the receive queue sent in repair mode into the receive queue (the process reads it as before) and
  the part of the send queue that had been sent, into the send queue (as sent, not yet
  acknowledged: retransmitted if the peer never got it); TCP_REPAIR_WINDOW; TCP_REPAIR off (a
  window probe tells the peer we are back); then the bytes never sent, sent normally.

The network lock the dump left (ckpt/netlock.py) is lifted by lift_locks() at the very end of the
restore, just before the process runs: a restore that fails before then has its helper's sockets
closed while the peer's packets are still dropped, so the peer never sees a FIN or a reset and the
restore can be tried again.
"""

from __future__ import annotations

import struct

from ckpt import netlock
from ckpt import sysno as nr
from ckpt.errors import CkptError, RestoreError
from ckpt.image.tcp import TcpRecord
from ckpt.restore.remote import Remote
from ckpt.restore.sockets import REUSEADDR, SETSOCKOPT, SOCKET, sockaddr

BIND, CONNECT, SENDTO = 49, 42, 44
SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC = 1, 0o4000, 0o2000000
SOL_SOCKET, SOL_TCP = 1, 6
SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 7, 8, 32, 33
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCP_REPAIR_ON, TCP_REPAIR_OFF = 1, 0
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
MSG_DONTWAIT = 0x40
MIN_CHUNK = 1024
# Set with the FORCE variants (root may pass the sysctl maxima, as an autotuned buffer has), and
# halved: the kernel doubles what it is given (its bookkeeping share) and reads back the doubled value.
FORCED = {(SOL_SOCKET, SO_SNDBUF): SO_SNDBUFFORCE, (SOL_SOCKET, SO_RCVBUF): SO_RCVBUFFORCE}


def _opt(remote: Remote, fd: int, level: int, opt: int, raw: bytes, what: str) -> None:
    remote.check(
        f"setting option {level}/{opt} of {what}", SETSOCKOPT, fd, level, opt, remote.put(raw), len(raw)
    )


def _int(remote: Remote, fd: int, level: int, opt: int, v: int, what: str) -> None:
    _opt(remote, fd, level, opt, struct.pack("=i", v - (1 << 32) if v >= 1 << 31 else v), what)


def _queue(remote: Remote, fd: int, queue: int, data: bytes, what: str, flags: int = 0) -> None:
    """`data` sent on `fd`, from a mapping made for it in the helper (the scratch page is small)."""
    if not data:
        return
    size = (len(data) + 4095) & ~4095
    prot, flags_map = nr.PROT_READ | nr.PROT_WRITE, nr.MAP_PRIVATE | nr.MAP_ANONYMOUS
    buf = remote.check(f"mapping a buffer for the queue of {what}", nr.MMAP, 0, size, prot, flags_map, -1, 0)
    try:
        remote.write(buf, data)
        if queue != TCP_NO_QUEUE:
            _int(remote, fd, SOL_TCP, TCP_REPAIR_QUEUE, queue, what)
        off, chunk = 0, len(data)
        while off < len(data):
            n = min(chunk, len(data) - off)
            r = remote.syscall(SENDTO, fd, buf + off, n, flags, 0, 0)
            if r <= 0:
                # The receive queue is refilled one skb per send; one too big for the socket's
                # memory is refused (ENOMEM): smaller pieces, as CRIU does.
                if chunk > MIN_CHUNK and queue == TCP_RECV_QUEUE:
                    chunk //= 2
                    continue
                err = "nothing sent" if r == 0 else f"error {-r}"
                raise RestoreError(f"refilling the {_qname(queue)} of {what} failed at byte {off}: {err}")
            off += r
    finally:
        remote.syscall(nr.MUNMAP, buf, size)


def _qname(queue: int) -> str:
    return {TCP_RECV_QUEUE: "receive queue", TCP_SEND_QUEUE: "send queue"}.get(queue, "unsent bytes")


def open_tcp(remote: Remote, r: TcpRecord, flags: int) -> int:
    """The connection in the helper, with the fd's O_NONBLOCK; its (new) fd number."""
    what = r.label()
    kind = SOCK_STREAM | SOCK_CLOEXEC | (SOCK_NONBLOCK if flags & nr.O_NONBLOCK else 0)
    fd = remote.check(f"creating the socket of {what}", SOCKET, r.family, kind, SOL_TCP)
    try:
        try:
            _int(remote, fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON, what)
        except RestoreError as e:
            raise RestoreError(f"{e} (TCP_REPAIR needs CAP_NET_ADMIN and Linux 3.5+)") from None
        for level, opt, val in r.options:
            forced = FORCED.get((level, opt))
            _int(remote, fd, level, forced or opt, val // 2 if forced else val, what)
        sent = len(r.send_queue) - r.unsent
        _int(remote, fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, what)
        _int(remote, fd, SOL_TCP, TCP_QUEUE_SEQ, (r.recv_seq - len(r.recv_queue)) & 0xFFFFFFFF, what)
        _int(remote, fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, what)
        _int(remote, fd, SOL_TCP, TCP_QUEUE_SEQ, (r.send_seq - len(r.send_queue)) & 0xFFFFFFFF, what)
        reuse = next((v for lv, o, v in r.options if (lv, o) == REUSEADDR), 0)
        _int(remote, fd, *REUSEADDR, 1, what)
        sa = sockaddr(r)  # type: ignore[arg-type]  # the same fields as a listener's
        remote.check(f"binding {what}", BIND, fd, remote.put(sa), len(sa))
        _int(remote, fd, *REUSEADDR, reuse, what)
        pa = sockaddr(r, peer=True)  # type: ignore[arg-type]
        remote.check(f"connecting {what} (in repair mode)", CONNECT, fd, remote.put(pa), len(pa))
        opts = [(TCPOPT_MAXSEG, r.mss)]
        if r.tcpi_options & TCPI_OPT_SACK:
            opts.append((TCPOPT_SACK_PERM, 0))
        if r.tcpi_options & TCPI_OPT_WSCALE:
            opts.append((TCPOPT_WINDOW, r.snd_wscale | (r.rcv_wscale << 16)))
        if r.tcpi_options & TCPI_OPT_TIMESTAMPS:
            opts.append((TCPOPT_TIMESTAMP, 0))
        _opt(remote, fd, SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("=II", *o) for o in opts), what)
        if r.tcpi_options & TCPI_OPT_TIMESTAMPS:
            _opt(remote, fd, SOL_TCP, TCP_TIMESTAMP, struct.pack("=I", r.timestamp), what)
        _queue(remote, fd, TCP_RECV_QUEUE, r.recv_queue, what)
        _queue(remote, fd, TCP_SEND_QUEUE, r.send_queue[:sent], what)
        _opt(remote, fd, SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("=5I", *r.window), what)
        _int(remote, fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, what)
        _int(remote, fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF, what)
        _queue(remote, fd, TCP_NO_QUEUE, r.send_queue[sent:], what, MSG_DONTWAIT)
    except BaseException:
        remote.syscall(nr.CLOSE, fd)
        raise
    return fd


def lift_locks(records: list[TcpRecord]) -> None:
    """Let the connections' packets through again (the restored sockets hold them now)."""
    for name in sorted({r.lock for r in records if r.lock}):
        try:
            netlock.unlock(name)
        except CkptError as e:
            raise RestoreError(str(e)) from None
