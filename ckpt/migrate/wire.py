"""Frames on the migration stream. Everything read here is untrusted: the type must be known and
the length within the bound of that type before a byte of the body is read."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

from ckpt.errors import CkptError

MAGIC = b"CK"
PROTOCOL = 3  # 2: layers streamed (PAGES), the two-phase commit (READY, COMMIT); 3: END's xxh3_128
_HDR = struct.Struct(">2sBxI")  # magic, type, pad, body length

# Message types. Control messages carry a JSON object; DATA carries raw layer bytes.
HELLO, AUTH, AUTH_OK, LAYER, DATA, END, ACK, RUNNING, ERROR, ABORT, DONE, SYNC, SYNCED = range(1, 14)
# PAGES: a chunk's header and page addresses (binary); READY: the copy is built and held stopped;
# COMMIT: the source's go (its original stays stopped until the copy runs).
PAGES, READY, COMMIT = 14, 15, 16
NAMES = {
    HELLO: "hello",
    AUTH: "auth",
    AUTH_OK: "auth-ok",
    LAYER: "layer",
    DATA: "data",
    END: "end",
    ACK: "ack",
    RUNNING: "running",
    ERROR: "error",
    ABORT: "abort",
    DONE: "done",
    SYNC: "sync",
    SYNCED: "synced",
    PAGES: "pages",
    READY: "ready",
    COMMIT: "commit",
}
MAX_CONTROL = 64 << 10
MAX_DATA = 1 << 20
MAX_PAGES = 24 + 8 * 16384  # a chunk header and the addresses of MAX_CHUNK_PAGES pages
DATA_CHUNK = 256 << 10


def _limit(mtype: int) -> int:
    return MAX_DATA if mtype == DATA else MAX_PAGES if mtype == PAGES else MAX_CONTROL


class ProtocolError(CkptError):
    """The peer sent something that is not this protocol."""


class ConnectionLost(CkptError):
    """The peer went away (closed, reset, or the network failed)."""


@dataclass
class Message:
    type: int
    body: bytes | bytearray | memoryview  # as received, not copied again (memoryview: recv(into=))

    @property
    def name(self) -> str:
        return NAMES.get(self.type, str(self.type))

    def obj(self) -> dict[str, Any]:
        if self.type in (DATA, PAGES):
            raise ProtocolError("a data frame has no fields")
        try:
            v = json.loads(bytes(self.body).decode())
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(f"malformed {self.name} message") from None
        if not isinstance(v, dict):
            raise ProtocolError(f"malformed {self.name} message (not an object)")
        return v


class Channel:
    """One framed connection. `sent` and `received` count the bytes on the wire."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0
        self.received = 0
        self.broken = False  # a send was cut off mid-frame (Ctrl-C, error): no frame may follow

    def send(self, mtype: int, body: bytes | memoryview) -> None:
        limit = _limit(mtype)
        if len(body) > limit:
            raise ValueError(f"{NAMES[mtype]} frame of {len(body)} bytes exceeds {limit}")
        if self.broken:
            raise ConnectionLost("the connection was cut off in the middle of a message")
        hdr = _HDR.pack(MAGIC, mtype, len(body))
        self.broken = True
        try:
            if len(body) < 4096:  # one segment for small messages
                self.sock.sendall(hdr + bytes(body))
            else:
                self.sock.sendall(hdr)
                self.sock.sendall(body)
        except OSError as e:
            raise ConnectionLost(f"connection lost while sending ({e.strerror or e})") from None
        self.broken = False
        self.sent += _HDR.size + len(body)

    def send_obj(self, mtype: int, obj: dict[str, Any]) -> None:
        self.send(mtype, json.dumps(obj).encode())

    def _exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        self._fill(memoryview(buf))
        return buf

    def _fill(self, view: memoryview) -> None:
        """Receive exactly len(view) bytes into view."""
        n = len(view)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError:
                raise ConnectionLost("the peer sent nothing in time") from None
            except OSError as e:
                raise ConnectionLost(f"connection lost ({e.strerror or e})") from None
            if k == 0:
                raise ConnectionLost("the peer closed the connection")
            got += k
        self.received += n

    def recv(self, into: memoryview | None = None) -> Message:
        """The next message. `into`: where a DATA frame's body goes if it fits (the receiver's
        buffer for it, instead of a fresh one to copy from); the body is then a view of it."""
        magic, mtype, length = _HDR.unpack(self._exact(_HDR.size))
        if magic != MAGIC or mtype not in NAMES:
            raise ProtocolError("not a ckpt migration stream (bad frame header)")
        limit = _limit(mtype)
        if length > limit:
            raise ProtocolError(f"{NAMES[mtype]} frame of {length} bytes exceeds the limit of {limit}")
        if into is not None and mtype == DATA and length <= len(into):
            view = into[:length]
            self._fill(view)
            return Message(mtype, view)
        return Message(mtype, self._exact(length))

    def expect(self, *types: int, into: memoryview | None = None) -> Message:
        """The next message, which must be one of `types`; an ERROR from the peer is raised."""
        m = self.recv(into)
        if m.type == ERROR and ERROR not in types:
            msg = str(m.obj().get("message", "unspecified error"))[:500]
            raise PeerError(msg)
        if m.type not in types:
            want = " or ".join(NAMES[t] for t in types)
            raise ProtocolError(f"expected {want}, got {m.name}")
        return m

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class PeerError(CkptError):
    """The other side reported an error."""


def parse_hostport(s: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep:
        host, port = default_host, s
    host = host.strip("[]") or default_host
    try:
        p = int(port)
    except ValueError:
        raise CkptError(f"{s!r} is not HOST:PORT") from None
    if not 0 <= p <= 65535:
        raise CkptError(f"port {p} is out of range")
    return host, p
