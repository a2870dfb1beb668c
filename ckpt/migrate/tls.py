"""TLS for links that are not trusted (stdlib ssl). The token's challenge-response runs inside it
either way: TLS keeps the pages private, the token says who may send them."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from ckpt.errors import CkptError


@dataclass(frozen=True)
class TlsOptions:
    cert: str | None = None  # our certificate (server: required; client: for mutual TLS)
    key: str | None = None
    ca: str | None = None  # server: require client certificates from this CA; client: verify the server

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.ca)


def _load(ctx: ssl.SSLContext, o: TlsOptions) -> None:
    try:
        if o.cert:
            ctx.load_cert_chain(o.cert, o.key)
        if o.ca:
            ctx.load_verify_locations(o.ca)
    except (OSError, ssl.SSLError) as e:
        raise CkptError(f"cannot load TLS files: {e}") from None


def server_wrap(sock: socket.socket, o: TlsOptions) -> socket.socket:
    if not o.cert:
        raise CkptError("TLS on the server needs --tls-cert (and --tls-key unless the cert holds it)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, o)
    if o.ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        return ctx.wrap_socket(sock, server_side=True)
    except (OSError, ssl.SSLError) as e:
        sock.close()
        raise CkptError(f"TLS handshake failed: {e}") from None


def client_wrap(sock: socket.socket, o: TlsOptions, host: str) -> socket.socket:
    if not o.ca:
        raise CkptError("TLS on the client needs --tls-ca to verify the destination")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, o)
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except (OSError, ssl.SSLError) as e:
        sock.close()
        raise CkptError(f"TLS handshake with {host} failed: {e}") from None
