"""The destination of a migration (`ckpt serve`).

Each round arrives as a layer file; it is written under a temporary name (0600, O_EXCL, inside DIR
only, at most the announced size), checked against its announced SHA-256, opened as a layer (every
record validated) whose parent must be the round before it, then renamed to its place: DIR is an
ordinary chain that `show`, `diff` and `verify` read. The final layer is restored; the source is
told the new pid and kills its original only then."""

from __future__ import annotations

import contextlib
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
from ckpt.image.recmemo import RecordMemo
from ckpt.image.writer import ensure_dir
from ckpt.migrate import auth, wire
from ckpt.migrate.boost import Boost
from ckpt.migrate.stream import Aborted, receive_layer
from ckpt.migrate.timeline import mark
from ckpt.migrate.tls import TlsOptions, server_wrap
from ckpt.migrate.tree import is_member, is_tree, receive_member
from ckpt.migrate.warm import WarmRestore
from ckpt.migrate.warm import enabled as warm_enabled
from ckpt.ptrace.signals import deferred_signals
from ckpt.restore import listenshare
from ckpt.restore.restorer import RestoredProcess, restore_process

_NAME_RE = re.compile(r"layer-(\d{4,6})\.ckpt\Z")
MAX_ROUNDS = 10_000
HANDSHAKE_TIMEOUT = 60.0  # s, from accept until the client has proved it holds the token
COMMIT_TIMEOUT = 30.0  # s the built copy waits (stopped) for the source's commit, then is killed
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
    streamed_pages: int = 0  # pages written into the restore helper as their chunks arrived
    notes: list[str] = field(default_factory=list)
    peer: str = ""
    init_pid: int | None = None  # --pidns: the init of the copy's pid namespace (restore/pidns.py)
    ns_pid: int | None = None  # --pidns: the copy's pid inside that namespace


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


def _check_link(
    part: Path, index: int, prev: tuple[str, str] | None, memo: RecordMemo | None = None
) -> Layer:
    """The layer, open: valid, and its parent is the round before it (`prev`: its name and digest),
    so the chain never reaches out of DIR. `memo`: the records the rounds before repeat are not
    checked again (image/recmemo.py: the final layer's check is in the downtime)."""
    layer = Layer.open(part, memo=memo)
    try:
        ref = layer.meta.inventory.parent
        if index == 1:
            if ref is not None or layer.meta.inventory.incremental:
                raise wire.ProtocolError("the first layer of a migration must be a full one")
            return layer
        assert prev is not None
        if ref is None or ref.path != prev[0]:
            raise wire.ProtocolError(f"layer {index} does not name {prev[0]} as its parent")
        if ref.digest != prev[1]:
            raise wire.ProtocolError(f"layer {index} was built on another {prev[0]}")
    except BaseException:
        layer.close()
        raise
    return layer


def receive(
    ch: wire.Channel,
    directory: Path,
    token: bytes,
    emit: Emit,
    hold: Callable[[], None] | None = None,
    pidns: bool = False,
    new_pids: bool = False,
) -> Received:
    """One migration on an accepted connection. Raises on any failure; the chain received so far
    stays in DIR (it is valid, and shows what arrived)."""
    out = Received()
    auth.server_handshake(ch, token)
    ch.sock.settimeout(None)
    emit({"event": "authenticated"})
    # --pidns: restored cold (the warm restore builds its helper outside any new namespace).
    warm = WarmRestore() if warm_enabled() and not pidns else None
    boost = Boost()
    try:
        return _rounds(ch, directory, emit, hold, out, warm, pidns, boost, new_pids)
    finally:
        boost.end()
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
    pidns: bool = False,
    boost: Boost | None = None,
    new_pids: bool = False,
) -> Received:
    index = 1
    prev: tuple[str, str] | None = None  # name and digest of the last layer stored
    memo = RecordMemo()
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
        name = hdr.get("name")
        if index == 1 and is_member(name):  # a process tree's member, before its root (migrate/tree.py)
            receive_member(ch, directory, str(name), emit)
            continue
        if not isinstance(name, str) or not (m := _NAME_RE.match(name)) or int(m.group(1)) != index:
            raise wire.ProtocolError(f"layer name {str(name)[:80]!r} is not layer-{index:04d}.ckpt")
        final = hdr.get("final") is True
        if final and boost is not None:
            # The final layer's header comes before the source's freeze: from here to RUNNING is
            # the downtime, a chain of hand-overs that each wait for a CPU (boost.py).
            boost.start()
            if warm is not None:
                warm.join_boost(boost)  # (its thread applies the final chunks and builds the copy)
        # Layers are synced after the restore, all at once: neither a round's ACK nor the downtime
        # waits for the disk (a failed migration needs no durable layers; a done one gets them).
        part, chunks, _ = receive_layer(ch, directory, name, warm.chunk if warm else None, sync=False)
        path = directory / name
        try:
            # Opened once, here: the warm restore takes this Layer on (no second decode).
            layer = _check_link(part, index, prev, memo)
            try:
                os.rename(part, path)
            except BaseException:
                layer.close()
                raise
            layer.path = path  # the same inode, now under its name
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        prev = (name, layer.digest)
        mark(f"dst layer-checked {name}")
        out.layers.append(path.name)
        emit({"event": "layer", "layer": path.name, "round": index - 1, "final": final})
        if not final:
            ch.send_obj(wire.ACK, {"name": path.name})
            if warm is not None:
                warm.round(layer, chunks)  # built while the next round is copied
            else:
                layer.close()
            index += 1
            continue
        if hold:
            hold()

        def commit(pid: int) -> None:
            """The copy is built and held stopped: it runs only on the source's COMMIT (sent while
            its original stays stopped), so exactly one of the two ever runs."""
            ch.send_obj(wire.READY, {"pid": pid})
            mark("dst ready-sent")
            ch.sock.settimeout(COMMIT_TIMEOUT)
            try:
                m = ch.expect(wire.COMMIT, wire.ABORT)
            finally:
                ch.sock.settimeout(None)
            mark("dst commit-received")
            if m.type == wire.ABORT:
                raise Aborted("the source aborted the migration before its commit")
            if os.environ.get("CKPT_SERVE_TEST_DROP_AFTER_COMMIT") == "1":
                # Tests: the connection breaks between the commit and RUNNING (the one window a
                # one-phase protocol cannot close).
                with contextlib.suppress(OSError):
                    ch.sock.shutdown(socket.SHUT_RDWR)

        # A Ctrl-C here waits until the copy runs or is killed: never half-way.
        with deferred_signals():
            t0 = time.perf_counter()
            if warm is not None and not is_tree(layer):  # (a tree: restored cold, migrate/tree.py)
                rp = warm.finish(layer, chunks, commit)
                out.warm = warm.warm_final
            else:
                with MergedView(layer) as view:
                    rp = restore_process(view, before_run=commit, pidns=pidns, new_pids=new_pids)
            out.restore_ms = round((time.perf_counter() - t0) * 1e3, 3)
            out.pid, out.dumped_pid, out.pid_kept = rp.pid, rp.dumped_pid, rp.pid_kept
            out.init_pid, out.ns_pid = rp.init_pid, rp.ns_pid
            out.notes.extend(rp.warnings)  # e.g. threads whose tids were taken
            out.streamed_pages = warm.streamed_pages if warm is not None else 0
            emit({"event": "restored", "pid": rp.pid})
            try:
                _running(ch, rp, out)
                if boost is not None:
                    boost.end()
            except wire.ConnectionLost as e:
                raise CkptError(
                    f"the copy runs as pid {rp.pid}, but the source could not be told ({e}); the "
                    "source keeps its original stopped"
                ) from None
        for n in out.layers:
            _fsync(directory / n)
        # The source now kills its original. Whatever comes next (DONE, or nothing), the copy here
        # is the one that runs.
        with contextlib.suppress(CkptError):
            ch.expect(wire.DONE, wire.ABORT)
        out.bytes_received = ch.received
        return out


def _running(ch: wire.Channel, rp: RestoredProcess, out: Received) -> None:
    mark("dst running-send")
    ch.send_obj(
        wire.RUNNING,
        {
            "pid": rp.pid,
            "pid_kept": rp.pid_kept,
            "restore_ms": out.restore_ms,
            "warm": out.warm,
            "restore_phases_ms": rp.timings_ms,
            "streamed_pages": out.streamed_pages,
            "notes": [str(n)[:400] for n in out.notes[:64]],  # e.g. a tree's pids that were in use
            "init_pid": rp.init_pid,  # serve --pidns: the namespace's init (None otherwise)
        },
    )


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def serve(
    addr: str,
    directory: str | Path,
    *,
    token_file: str | None = None,
    once: bool = False,
    emit: Emit,
    warn: Callable[[str], None],
    tls: TlsOptions | None = None,
    pidns: bool = False,
    new_pids: bool = False,
) -> list[Received]:
    """`pidns`: restore each copy into a new pid namespace, with its dumped pids (restore/pidns.py).
    `new_pids`: a tree child whose pid is in use here gets another (else refused)."""
    token = auth.load_token(token_file)
    host, _ = wire.parse_hostport(addr)
    if not token and not is_loopback(host):
        raise CkptError("listening beyond loopback needs --token-file")
    base = Path(directory)
    ensure_dir(base)
    if find_layers(base):
        raise CkptError(f"{base} already holds layers; give serve an empty directory")
    sock = listen(addr)
    listenshare.allow()  # its restores are migrations' copies: listeners are taken over on one machine
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
                r = receive(ch, target, token, emit, hold, pidns, new_pids)
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
                        "streamed_pages": r.streamed_pages,
                        "notes": r.notes,
                        "dir": str(target),
                        "peer": r.peer,
                        "init_pid": r.init_pid,
                        "ns_pid": r.ns_pid,
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
