"""The destination of a migration (`ckpt serve`).

Each round arrives as a layer file; it is written under a temporary name (0600, O_EXCL, inside DIR
only, at most the announced size), checked against its announced SHA-256, opened as a layer (every
record validated) whose parent must be the round before it, then renamed to its place: DIR is an
ordinary chain that `show`, `diff` and `verify` read. The final layer is restored; the source is
told the new pid and kills its original only then."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt.errors import CkptError
from ckpt.image import Layer, MergedView, find_layers
from ckpt.image.writer import ensure_dir
from ckpt.migrate import auth, wire
from ckpt.migrate.tls import TlsOptions, server_wrap
from ckpt.migrate.warm import WarmRestore
from ckpt.migrate.warm import enabled as warm_enabled
from ckpt.ptrace.signals import deferred_signals
from ckpt.restore.restorer import restore_process

_NAME_RE = re.compile(r"layer-(\d{4,6})\.ckpt\Z")
MAX_LAYER_BYTES = 1 << 40
MAX_ROUNDS = 10_000
HANDSHAKE_TIMEOUT = 60.0  # s, from accept until the client has proved it holds the token
Emit = Callable[[dict[str, Any]], None]


@dataclass
class Received:
    pid: int | None = None
    dumped_pid: int | None = None
    pid_kept: bool = False
    layers: list[str] = field(default_factory=list)
    bytes_received: int = 0
    restore_ms: float = 0.0
    warm: bool = False  # the final restore found the process already built
    notes: list[str] = field(default_factory=list)
    peer: str = ""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen(addr: str) -> socket.socket:
    host, port = wire.parse_hostport(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise CkptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    s.listen(4)
    return s


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _receive_layer(ch: wire.Channel, directory: Path, hdr: dict[str, Any], expect_index: int) -> Path:
    name = hdr.get("name")
    size = hdr.get("size")
    if not isinstance(name, str) or not (m := _NAME_RE.match(name)) or int(m.group(1)) != expect_index:
        raise wire.ProtocolError(f"layer name {str(name)[:80]!r} is not layer-{expect_index:04d}.ckpt")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_LAYER_BYTES:
        raise wire.ProtocolError(f"layer size {size!r} is out of bounds")
    if size > _free_bytes(directory):
        raise CkptError(f"layer {name} ({size} bytes) does not fit into {directory}")
    part = directory / f".{name}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    ok = False
    try:
        h = hashlib.sha256()
        got = 0
        while True:
            msg = ch.expect(wire.DATA, wire.END, wire.ABORT)
            if msg.type == wire.ABORT:
                raise Aborted(str(msg.obj().get("reason", ""))[:200])
            if msg.type == wire.END:
                break
            got += len(msg.body)
            if got > size:
                raise wire.ProtocolError(f"layer {name} is longer than the {size} bytes announced")
            h.update(msg.body)
            view = memoryview(msg.body)
            while view:
                view = view[os.write(fd, view) :]
        if got != size:
            raise wire.ProtocolError(f"layer {name} ended after {got} of {size} bytes")
        digest = msg.obj().get("sha256")
        if digest != h.hexdigest():
            raise wire.ProtocolError(f"layer {name} arrived damaged (SHA-256 differs)")
        os.fsync(fd)
        ok = True
    finally:
        os.close(fd)
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
    final = directory / name
    try:
        _check_link(part, directory, expect_index)
        os.rename(part, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return final


def _check_link(part: Path, directory: Path, index: int) -> None:
    """The layer is valid, and its parent is the round before it: the chain never reaches out of DIR."""
    with Layer.open(part) as layer:
        ref = layer.meta.inventory.parent
        if index == 1:
            if ref is not None or layer.meta.inventory.incremental:
                raise wire.ProtocolError("the first layer of a migration must be a full one")
            return
        prev = directory / f"layer-{index - 1:04d}.ckpt"
        if ref is None or ref.path != prev.name:
            raise wire.ProtocolError(f"layer {index} does not name {prev.name} as its parent")
        with Layer.open(prev) as p:
            if p.digest != ref.digest:
                raise wire.ProtocolError(f"layer {index} was built on another {prev.name}")


class Aborted(CkptError):
    """The source gave up."""


def receive(
    ch: wire.Channel, directory: Path, token: bytes, emit: Emit, hold: Callable[[], None] | None = None
) -> Received:
    """One migration on an accepted connection. Raises on any failure; the chain received so far
    stays in DIR (it is valid, and shows what arrived)."""
    out = Received()
    auth.server_handshake(ch, token)
    ch.sock.settimeout(None)
    emit({"event": "authenticated"})
    warm = WarmRestore() if warm_enabled() else None
    try:
        return _rounds(ch, directory, emit, hold, out, warm)
    finally:
        if warm is not None:
            warm.close()
            out.notes.extend(warm.notes)


def _rounds(
    ch: wire.Channel,
    directory: Path,
    emit: Emit,
    hold: Callable[[], None] | None,
    out: Received,
    warm: WarmRestore | None,
) -> Received:
    index = 1
    while True:
        msg = ch.expect(wire.LAYER, wire.SYNC, wire.ABORT)
        if msg.type == wire.SYNC:
            # The source is about to freeze for the final round: answer once the helper holds every
            # round so far, so that the downtime does not wait for the warm restore to catch up.
            ch.send_obj(wire.SYNCED, {"warm": warm.drain() if warm is not None else False})
            continue
        if msg.type == wire.ABORT:
            raise Aborted(f"the source aborted the migration: {str(msg.obj().get('reason', ''))[:200]}")
        if index > MAX_ROUNDS:
            raise wire.ProtocolError(f"more than {MAX_ROUNDS} rounds")
        hdr = msg.obj()
        path = _receive_layer(ch, directory, hdr, index)
        out.layers.append(path.name)
        final = hdr.get("final") is True
        emit({"event": "layer", "layer": path.name, "round": index - 1, "final": final})
        if not final:
            ch.send_obj(wire.ACK, {"name": path.name})
            if warm is not None:
                warm.round(path)  # built while the next round is copied
            index += 1
            continue
        ch.send_obj(wire.ACK, {"name": path.name})
        if hold:
            hold()
        # From here a copy may start running: a Ctrl-C waits until the source has been told so,
        # or the source would let its original go too.
        with deferred_signals():
            t0 = time.perf_counter()
            if warm is not None:
                rp = warm.finish(path)
                out.warm = warm.warm_final
            else:
                with MergedView(Layer.open(path)) as view:
                    rp = restore_process(view)
            out.restore_ms = round((time.perf_counter() - t0) * 1e3, 3)
            out.pid, out.dumped_pid, out.pid_kept = rp.pid, rp.dumped_pid, rp.pid_kept
            out.notes.extend(rp.warnings)  # e.g. threads whose tids were taken
            ch.send_obj(
                wire.RUNNING,
                {
                    "pid": rp.pid,
                    "pid_kept": rp.pid_kept,
                    "restore_ms": out.restore_ms,
                    "warm": out.warm,
                    "restore_phases_ms": rp.timings_ms,
                },
            )
        # The source now kills its original. Whatever comes next (DONE, ABORT too late, or nothing),
        # the copy here is the one that runs.
        with contextlib.suppress(CkptError):
            ch.expect(wire.DONE, wire.ABORT)
        out.bytes_received = ch.received
        return out


def serve(
    addr: str,
    directory: str | Path,
    *,
    token_file: str | None = None,
    once: bool = False,
    emit: Emit,
    warn: Callable[[str], None],
    tls: TlsOptions | None = None,
) -> list[Received]:
    token = auth.load_token(token_file)
    host, _ = wire.parse_hostport(addr)
    if not token and not is_loopback(host):
        raise CkptError("listening beyond loopback needs --token-file")
    base = Path(directory)
    ensure_dir(base)
    if find_layers(base):
        raise CkptError(f"{base} already holds layers; give serve an empty directory")
    sock = listen(addr)
    bound = sock.getsockname()
    emit({"listening": f"{bound[0]}:{bound[1]}", "dir": str(base), "once": once})
    hold = _test_hold if os.environ.get("CKPT_SERVE_HOLD_BEFORE_RESTORE") == "1" else None
    results: list[Received] = []
    n = 0
    try:
        while True:
            conn, peer = sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A peer that connects and says nothing must not hold a --once server forever.
            conn.settimeout(HANDSHAKE_TIMEOUT)
            ch = wire.Channel(conn)
            n += 1
            target = base if once else base / f"migration-{n:04d}"
            try:
                if tls is not None and tls.enabled:
                    ch.sock = server_wrap(conn, tls)
                ensure_dir(target)
                r = receive(ch, target, token, emit, hold)
                r.peer = f"{peer[0]}:{peer[1]}"
                results.append(r)
                emit(
                    {
                        "event": "done",
                        "pid": r.pid,
                        "dumped_pid": r.dumped_pid,
                        "pid_kept": r.pid_kept,
                        "layers": r.layers,
                        "bytes_received": r.bytes_received,
                        "restore_ms": r.restore_ms,
                        "warm": r.warm,
                        "notes": r.notes,
                        "dir": str(target),
                        "peer": r.peer,
                    }
                )
            except CkptError as e:
                with contextlib.suppress(CkptError):
                    ch.send_obj(wire.ERROR, {"message": str(e)[:500]})
                if once:
                    raise
                warn(f"migration from {peer[0]}:{peer[1]} failed: {e}")
                if target != base and not find_layers(target):
                    shutil.rmtree(target, ignore_errors=True)
            finally:
                ch.close()
            if once:
                return results
    finally:
        sock.close()


def _test_hold() -> None:
    """Tests stop here, between the final layer and the restore, to kill the server at that moment."""
    while True:
        signal.pause()
