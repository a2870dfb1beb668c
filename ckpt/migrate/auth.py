"""The shared secret and the challenge-response both ends run before anything is stored.

Each side sends a fresh random nonce; each proves it holds the token with an HMAC-SHA256 over both
nonces and its role, so a recorded exchange cannot be replayed and neither side can be impersonated
by reflecting the other's answer. Compared with hmac.compare_digest (constant time)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from ckpt.errors import CkptError
from ckpt.migrate import wire

NONCE_BYTES = 32
MAX_TOKEN_BYTES = 4096


class AuthError(CkptError):
    """The peer could not prove it holds the token."""


def load_token(path: str | Path | None) -> bytes:
    """The token file's bytes (surrounding whitespace stripped). Refused when others can read it."""
    if path is None:
        return b""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise CkptError(f"cannot open token file {p}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CkptError(f"token file {p} is not a regular file")
        if st.st_mode & 0o077:
            raise CkptError(
                f"token file {p} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                f"chmod 600 it"
            )
        if st.st_size > MAX_TOKEN_BYTES:
            raise CkptError(f"token file {p} is larger than {MAX_TOKEN_BYTES} bytes")
        data = os.read(fd, MAX_TOKEN_BYTES + 1).strip()
    finally:
        os.close(fd)
    if len(data) < 16:
        raise CkptError(f"token file {p} holds fewer than 16 bytes: too weak a secret")
    return data


def _mac(token: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(token, role + b"\0" + server_nonce + client_nonce, hashlib.sha256).digest()


def _nonce(obj: dict[str, object], key: str) -> bytes:
    v = obj.get(key)
    if not isinstance(v, str) or len(v) != 2 * NONCE_BYTES:
        raise wire.ProtocolError(f"malformed {key}")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise wire.ProtocolError(f"malformed {key}") from None


def server_handshake(ch: wire.Channel, token: bytes) -> None:
    # The client speaks first: a client without TLS meeting a TLS server (or the reverse) then
    # fails at once on the bytes it sent, instead of both sides waiting for the other.
    hello = ch.expect(wire.HELLO).obj()
    if hello.get("protocol") != wire.PROTOCOL:
        ch.send_obj(wire.ERROR, {"message": f"this destination speaks protocol {wire.PROTOCOL}"})
        raise wire.ProtocolError(f"a client speaks protocol {str(hello.get('protocol'))[:20]!r}")
    sn = secrets.token_bytes(NONCE_BYTES)
    ch.send_obj(wire.HELLO, {"protocol": wire.PROTOCOL, "nonce": sn.hex()})
    m = ch.expect(wire.AUTH).obj()
    cn = _nonce(m, "nonce")
    mac = _nonce({"mac": m.get("mac")}, "mac")
    if not hmac.compare_digest(mac, _mac(token, b"client", sn, cn)):
        ch.send_obj(wire.ERROR, {"message": "authentication failed: wrong token"})
        raise AuthError("a client failed authentication (wrong token)")
    ch.send_obj(wire.AUTH_OK, {"mac": _mac(token, b"server", sn, cn).hex()})


def client_handshake(ch: wire.Channel, token: bytes) -> None:
    ch.send_obj(wire.HELLO, {"protocol": wire.PROTOCOL})
    m = ch.expect(wire.HELLO).obj()
    if m.get("protocol") != wire.PROTOCOL:
        raise wire.ProtocolError(
            f"the destination speaks protocol {m.get('protocol')!r}, not {wire.PROTOCOL}"
        )
    sn = _nonce(m, "nonce")
    cn = secrets.token_bytes(NONCE_BYTES)
    ch.send_obj(wire.AUTH, {"nonce": cn.hex(), "mac": _mac(token, b"client", sn, cn).hex()})
    try:
        ok = ch.expect(wire.AUTH_OK).obj()
    except wire.PeerError as e:
        raise AuthError(f"the destination refused: {e}") from None
    mac = _nonce({"mac": ok.get("mac")}, "mac")
    if not hmac.compare_digest(mac, _mac(token, b"server", sn, cn)):
        raise AuthError("the destination does not hold the token")
