"""Migration of a process tree (`ckpt migrate --pid P` where P has children): one stop-and-copy.

The source dumps the whole tree once (ckpt/dumptree.py: every process frozen together, dumped
into its own chain, then all left stopped with SIGSTOP, no tracker armed: nothing follows), and
sends it over the migration protocol (docs/migrate.md) as layer files: each member's layer first,
named by its place in the tree dump (`tree/PID-STARTTIME/layer-0001.ckpt`, stored there by the
destination and acknowledged), then the root's layer, the final one, whose tree record names them
with their digests. The destination restores the tree as `ckpt restore` does (restore/tree.py) and
holds every process stopped until the source's COMMIT (the same two-phase commit as for one
process): the source kills its original tree only once the copy runs, and on any failure before
the commit lets it go (SIGCONT to each process), so exactly one copy of the tree ever runs.

No live rounds: the downtime is the whole copy (a tree's pre-dumps, one tracker per member, are
left for later). Hooks: ckpt/migrate/source.py `migrate()` calls `migrate_tree` where it refused a
process with children; ckpt/migrate/server.py `_rounds` hands a member's layer to
`receive_member`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ckpt.errors import CkptError, TargetExited
from ckpt.image import Layer
from ckpt.image.tree import MAX_TREE
from ckpt.image.writer import ensure_dir
from ckpt.migrate import auth, wire
from ckpt.migrate.stream import StreamOut, receive_layer
from ckpt.migrate.testhold import hold
from ckpt.migrate.throttle import TokenBucket
from ckpt.migrate.tls import TlsOptions, client_wrap
from ckpt.threadpool import start as start_thread

TREE_DIR = "tree"  # as ckpt/dumptree.py lays a tree dump out (not imported: serve stays light)
MEMBER_RE = re.compile(r"tree/(\d{1,7})-(\d{1,20})/layer-0001\.ckpt\Z")
MEMBER_NAME = "layer-0001.ckpt"
READ_BLOCK = 1 << 20


# -- destination ---------------------------------------------------------------------------------
def is_member(name: object) -> bool:
    """A layer name that is a tree member's (sent before the root's, the first layer)."""
    return isinstance(name, str) and MEMBER_RE.match(name) is not None


def is_tree(layer: Layer) -> bool:
    """The root layer of a tree of more than one process: restored as a tree, not warm."""
    return layer.tree is not None and len(layer.tree.processes) > 1


def receive_member(
    ch: wire.Channel, directory: Path, name: str, emit: Callable[[dict[str, Any]], None]
) -> None:
    """Store a member's layer at DIR/tree/PID-STARTTIME/layer-0001.ckpt, as a tree dump lays it out:
    a full layer with no parent, each member once. Whether it is the layer the tree names (digest)
    is checked when the root's layer is restored (restore/tree.py open_members)."""
    m = MEMBER_RE.match(name)
    assert m is not None
    tdir = directory / TREE_DIR
    ensure_dir(tdir)
    if sum(1 for _ in tdir.iterdir()) >= MAX_TREE:
        raise wire.ProtocolError(f"more than {MAX_TREE} processes in the tree")
    d = tdir / f"{m.group(1)}-{m.group(2)}"
    if d.exists():
        raise wire.ProtocolError(f"layer {name} was sent twice")
    ensure_dir(d)
    part, _, _ = receive_layer(ch, d, MEMBER_NAME, None)
    try:
        layer = Layer.open(part)
        try:
            inv = layer.meta.inventory
            if inv.parent is not None or inv.incremental:
                raise wire.ProtocolError(f"layer {name} of a tree member must be a full one")
        finally:
            layer.close()
        os.rename(part, d / MEMBER_NAME)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    emit({"event": "layer", "layer": name, "round": 0, "final": False})
    ch.send_obj(wire.ACK, {"name": name})


# -- source --------------------------------------------------------------------------------------
def _send_file(
    ch: wire.Channel,
    bucket: TokenBucket | None,
    path: Path,
    name: str,
    final: bool,
    on_end: Callable[[], None] | None = None,
) -> StreamOut:
    """A layer already written, framed as if it were being written: each chunk announced with its
    place and pages (the destination checks them against the layer's records), the bytes around the
    chunks (header, metadata, footer) sent as they are."""
    layer = Layer.open(path)
    try:
        recs = list(layer.pages.chunks)
        addrs = np.array(layer.pages.data, dtype=np.uint64)
    finally:
        layer.close()
    out = StreamOut(ch, bucket, name, 0, final)
    out.on_end = on_end
    with open(path, "rb") as f:

        def plain(upto: int | None) -> None:
            while upto is None or f.tell() < upto:
                b = f.read(READ_BLOCK if upto is None else min(READ_BLOCK, upto - f.tell()))
                if not b:
                    if upto is not None:
                        raise CkptError(f"{path} ended before its chunk at {upto}")
                    return
                out(memoryview(b), None)

        first = 0
        for r in recs:
            plain(r.offset)
            b = f.read(r.clen)
            if len(b) != r.clen:
                raise CkptError(f"{path} ended inside its chunk at {r.offset}")
            out(memoryview(b), (addrs[first : first + r.npages], r.raw))
            first += r.npages
        plain(None)
    out.end()
    return out


def _descendants(pid: int) -> list[int]:
    from ckpt.migrate.refuse import members  # (not at the top: serve stays light)

    return members(pid, MAX_TREE + 1)


def _walk(pid: int) -> Mapping[int, Sequence[Any]]:
    from ckpt.migrate.refuse import walk  # (not at the top: serve stays light)

    return walk(pid)


def migrate_tree(
    pid: int,
    to: str,
    *,
    token_file: str | None = None,
    bandwidth: float | None = None,
    tls: TlsOptions | None = None,
    on_round: Callable[[Any], None] | None = None,
    tcp_established: bool = False,
    walked: Mapping[int, Sequence[Any]] | None = None,
    on_commit: str | None = None,
    on_abort: str | None = None,
) -> Any:
    """Stop-and-copy of the tree of `pid` to `ckpt serve` at `to`; a MigrateResult. With
    `tcp_established` the processes' connections are handed over as for one process (tcpmove.py).
    `walked`: the tree's processes and their fds, as the caller read them (migrate/refuse.py walk).
    `on_commit`/`on_abort` (migrate/netmove.py): run once for the whole tree, with every process's
    connections, as for one process."""
    from ckpt.dumptree import dump_tree
    from ckpt.migrate import source as src
    from ckpt.migrate.tcpmove import TcpHandover, check_connections
    from ckpt.migrate.tcpmove import on_commit as before_commit

    token = auth.load_token(token_file)
    host, port = wire.parse_hostport(to)
    if not tcp_established:  # a refusal now naming the option of migrate, not the tree dump's
        for p, fds in (_walk(pid) if walked is None else walked).items():
            with contextlib.suppress(TargetExited):
                check_connections(p, False, fds)
    t_start = time.perf_counter()
    sock = src._connect(host, port)
    if tls is not None and tls.enabled:
        sock = client_wrap(sock, tls, host)
    ch = wire.Channel(sock)
    staging = src._staging()
    bucket = TokenBucket(bandwidth) if bandwidth else None
    stopped = False  # the tree was (or may have been) left stopped by the dump
    pids: list[int] = []  # its live processes, stopped until the copy runs or the migration fails
    committer: Any = None
    committed = False
    handover = TcpHandover(on_commit, on_abort) if tcp_established else None
    guard: Any = None
    ours: list[int] = []  # the processes the dump stops with ckpt's SIGSTOP: continued on a failure
    try:
        # As for one process (guard.py): a SIGKILL of ckpt leaves exactly one copy of the tree
        # running. Its members as walked now, and again as dumped (one forked meanwhile).
        from ckpt.ptrace.signals import deferred_signals

        with deferred_signals():
            guard = src._guard(pid, ch, staging)
        root_start = None
        if guard is not None:
            from ckpt.migrate.guard import start_time

            guard.tell({"tree": pid})  # (continuing, it walks the tree again: one forked since)
            guard.add(_descendants(pid))
            root_start = start_time(pid)  # (here, not in the downtime: for the members as dumped)
        hold("tree-walked")
        if handover is not None:
            handover.guard, handover.stash_dir = guard, staging  # (what a death leaves: guardtcp.py)
        auth.client_handshake(ch, token)
        t0 = time.perf_counter()
        if guard is not None:
            guard.phase("handover")
        stopped = True

        def before_stop(stops: list[int]) -> None:
            if guard is not None:
                guard.stopped(stops)  # (before the stops: a death after them continues these)
            ours.extend(stops)

        r = dump_tree(
            pid, staging, leave_stopped=True, final=True, tcp_handover=handover, before_stop=before_stop
        )
        pids = [pid, *(int(m["pid"]) for m in r.tree if not m["zombie"])]
        hold("tree-dumped")  # (the tree stopped, its members not yet told)
        if guard is not None and root_start is not None:
            # One that left the tree since the first walk is not a target; each with the start
            # time the dump read in its freeze (no /proc read in the downtime).
            guard.members(
                [
                    (pid, root_start),
                    *((int(m["pid"]), int(m["start_time"])) for m in r.tree if not m["zombie"]),
                ]
            )
        if not r.restorable:
            raise CkptError(f"the tree of pid {pid} could not be restored: {'; '.join(r.not_restorable)}")
        for m in r.tree:
            if m["layer"] is None:
                continue  # a zombie: in the tree record alone
            name = os.path.relpath(m["layer"], staging)
            _send_file(ch, bucket, Path(m["layer"]), name, False)
            ack = ch.expect(wire.ACK).obj()
            if ack.get("name") != name:
                raise wire.ProtocolError(f"the destination acknowledged {ack.get('name')!r}, not {name}")
        committer = src._Committer(
            ch, before_commit(handover), guard=guard, before_ready=handover.stash if handover else None,
            held=lambda: pids,  # (each still stopped at the COMMIT: src.continued)
        )  # fmt: skip
        start_thread(committer)  # it reads READY once released (END is out)
        _send_file(ch, bucket, Path(r.layer), Path(r.layer).name, True, committer.release)
        try:
            ready, running, t_run = committer.outcome()
        finally:
            committed = committer.committed
        hold("running")
        _kill(pids)  # the copy runs: the original tree goes (stopped, it did nothing meanwhile)
        hold("killed")
        if handover:
            handover.finished()
        stopped = False
        with contextlib.suppress(wire.ConnectionLost):
            ch.send_obj(wire.DONE, {"killed": pid})
        report = src.RoundReport(
            round=0,
            kind="final",
            duration_ms=round((t_run - t0) * 1e3, 3),
            pages_dirty=0,
            pages_sent=r.pages_dumped + sum(int(m["pages_dumped"]) for m in r.tree),
            bytes_wire=ch.sent,
            freeze_ms=r.freeze_ms,
            dirty_rate=0.0,
            bandwidth=round(ch.sent / max(t_run - t0, 1e-9), 1),
            predicted_downtime_ms=0.0,
            throttle=0.0,
            decision=f"a process tree of {len(r.tree) + 1}: one stop-and-copy; restored at the destination",
        )
        if on_round:
            on_round(report)
        return src.MigrateResult(
            source_pid=pid,
            pid=int(ready["pid"]),
            pid_kept=bool(running.get("pid_kept", False)),
            policy="tree",
            stop_reason="a process tree is copied once, stopped",
            rounds=0,
            downtime_ms=round((t_run - t0) * 1e3, 3),
            total_ms=round((t_run - t_start) * 1e3, 3),
            bytes_sent=ch.sent,
            memory_bytes=report.pages_sent * src.PAGE,
            final_freeze_ms=r.freeze_ms,
            restore_ms=float(running.get("restore_ms", 0.0)),
            warm=False,
            final_phases_ms=dict(r.phases_ms),
            restore_phases_ms=src._floats(running.get("restore_phases_ms")),
            round_reports=[report],
            # The destination's restore notes: on this machine the originals still hold the tree's
            # pids while the copy is built, so its processes get new ones (docs/restore.md).
            warnings=[*r.warnings, *_notes(running)],
            init_pid=src.init_pid_of(running),
        )
    except BaseException as e:
        if committer is not None:
            state = committer.abandon()
            if state == "runs":
                _kill(pids)
                if handover:
                    handover.finished()
                raise src.MigrationFailed(
                    f"{e or type(e).__name__} after the commit; the copy of the tree runs at the "
                    f"destination (root pid {committer.ready['pid']}) and the original tree of "
                    f"{pid} was killed"
                ) from None
            committed = state == "unknown"
        if committed and not isinstance(e, wire.PeerError):
            if guard is not None:
                guard.phase("hold")
            shown = " ".join(map(str, pids))
            raise src.MigrationFailed(
                f"{e} after the commit: the copy may be running at the destination, so the original "
                f"tree is kept stopped (not killed); if the copy runs there, kill -9 {shown}, else "
                f"kill -CONT {shown}" + (handover.undecided() if handover else "")
            ) from None
        if guard is not None and stopped:
            guard.phase("let-go")
        lost = handover.take_back() if handover else ""
        if isinstance(e, src.ContinuedMeanwhile):
            ours = [p for p in ours if p != e.pid]  # it runs already: no SIGCONT of ckpt's
        what = _let_go(pid, ours, stopped)
        if lost:
            what += f"; but these TCP connections could not be given back to it: {lost}"
        with contextlib.suppress(CkptError, OSError, ValueError):
            ch.send_obj(wire.ABORT, {"reason": str(e)[:200] or type(e).__name__})
        if isinstance(e, KeyboardInterrupt):
            raise src.MigrationFailed(f"interrupted; {what}", exit_code=130) from None
        if isinstance(e, CkptError):
            raise src.MigrationFailed(f"{e}; {what}", reason=src._reason(e)) from None
        raise
    finally:
        try:
            with contextlib.suppress(OSError):
                ch.sock.shutdown(socket.SHUT_RDWR)
            ch.close()
            shutil.rmtree(staging, ignore_errors=True)
        finally:
            if guard is not None:
                guard.close()  # (reaped even when the above raised: see source.py)


def _notes(running: dict[str, Any]) -> list[str]:
    notes = running.get("notes")
    if not isinstance(notes, list):
        return []
    return [f"destination: {str(n)[:400]}" for n in notes[:64]]


def _kill(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _let_go(pid: int, ours: list[int], stopped: bool) -> str:
    if not stopped:
        return f"the tree of pid {pid} was not touched and runs on"
    # The processes the dump left stopped with ckpt's SIGSTOP get SIGCONT (as the tree dump's own
    # --leave-stopped would need), each thread back inside the syscall it was stopped in; not one
    # that someone else had stopped (its stop is its own), nor any if the dump stopped none.
    from ckpt.migrate.guard import stopped_by_another
    from ckpt.ptrace.resumestop import continue_stopped

    # (And not one stopped again by someone else while in ckpt's stop: a SIGCONT would discard it.)
    notes = continue_stopped([p for p in ours if not stopped_by_another(p)])
    return f"the tree of pid {pid} runs on" + (f" ({'; '.join(notes)})" if notes else "")


__all__ = ["is_member", "is_tree", "migrate_tree", "receive_member"]
