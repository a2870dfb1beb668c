"""The source side of a migration (`ckpt migrate`).

Live rounds are pre-dumps (ckpt.dump with pre_dump=True: a short freeze to read and re-arm the dirty
set, the copy after the thaw) into a private staging chain, each sent as the layer file it is. The
final round is the ordinary incremental dump, leaving the process stopped; the original is killed
only once the destination reports the restored copy running. On every failure before that the
original is let go (SIGCONT) and tracking taken out, so exactly one copy runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckpt.bufpool import BufferPool
from ckpt.dump import DumpResult, dump, untrack
from ckpt.errors import CkptError, TargetExited
from ckpt.image import Layer, MergedView
from ckpt.image.chain import PageTable
from ckpt.image.recmemo import RecordMemo
from ckpt.lastround import INLINE_PAGES
from ckpt.migrate import auth, policy, wire
from ckpt.migrate.boost import Boost
from ckpt.migrate.cgthrottle import AutoConverge, reap_orphans
from ckpt.migrate.chaintable import ChainTable
from ckpt.migrate.guard import Guard, job_stopped, sigstop_on_its_way, stopped_by_another
from ckpt.migrate.refuse import refusals, walk
from ckpt.migrate.server import is_loopback
from ckpt.migrate.stream import StreamOut
from ckpt.migrate.targetboost import TargetBoost
from ckpt.migrate.tcpmove import (
    TcpHandover,
    check_connections,
    check_hooks_env,
    check_on_abort,
    check_on_commit,
)
from ckpt.migrate.tcpmove import on_commit as before_commit
from ckpt.migrate.testhold import hold
from ckpt.migrate.throttle import TokenBucket
from ckpt.migrate.timeline import mark
from ckpt.migrate.tls import TlsOptions, client_wrap
from ckpt.proc import check_dumpable, read_stat
from ckpt.proc.ptcache import PageTablesCache
from ckpt.ptrace.resumestop import continue_stopped
from ckpt.ptrace.signals import deferred_signals
from ckpt.threadpool import Latch
from ckpt.threadpool import start as start_thread

PAGE = 4096
RUNNING_TIMEOUT = 60.0  # s from COMMIT until RUNNING
COMMITTER_JOIN = 10.0  # s: a committer woken by the socket's shutdown ends at once
SYNC_SLACK = 0.05  # s: a catch-up shorter than this is not worth another round


class MigrationFailed(CkptError):
    """The migration stopped before the copy ran; the message says what became of the original."""

    def __init__(self, message: str, exit_code: int = 1, reason: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.reason = reason  # a word for --json's end object ("continued": ContinuedMeanwhile; "": none)


class ContinuedMeanwhile(CkptError):
    """Someone else continued (SIGCONT: a shell's `fg`, `kill -CONT`) a process that ckpt held stopped
    for the hand-over, after its final dump: committing would kill it and lose what it did since,
    and for a moment two copies would run. Raised by the committer instead of sending COMMIT."""

    def __init__(self, pid: int) -> None:
        super().__init__(
            f"the original process {pid} was continued by someone else (SIGCONT) during the "
            "hand-over; its writes since the final dump would be lost: migration abandoned"
        )
        self.pid = pid


@dataclass
class RoundReport:
    round: int
    kind: str  # "live" | "final"
    duration_ms: float
    pages_dirty: int
    pages_sent: int
    bytes_wire: int
    freeze_ms: float
    dirty_rate: float  # pages/s
    bandwidth: float  # bytes/s on the wire
    predicted_downtime_ms: float
    throttle: float
    decision: str
    throttle_setting: str = ""  # the quota or duty cycle in force after the round (--auto-converge)
    sync_ms: float = 0.0  # waiting for the destination to catch up before the final round
    phases_ms: dict[str, float] = field(default_factory=dict)  # the round's dump, phase by phase

    def to_dict(self) -> dict[str, Any]:
        return {"event": "round", **asdict(self)}


@dataclass
class MigrateResult:
    source_pid: int
    pid: int
    pid_kept: bool
    policy: str
    stop_reason: str
    rounds: int  # live rounds, the final one not counted
    downtime_ms: float
    total_ms: float
    bytes_sent: int
    memory_bytes: int
    final_freeze_ms: float
    restore_ms: float
    warm: bool
    final_phases_ms: dict[str, float]
    restore_phases_ms: dict[str, float]
    round_reports: list[RoundReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    throttle: dict[str, Any] | None = None  # --auto-converge: the mechanism, why others were not, counters
    # serve --pidns: the copy's namespace init, by the destination's pid (what to wait for, or kill)
    init_pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("round_reports")
        d["event"] = "done"
        d["sent_per_memory"] = round(self.bytes_sent / self.memory_bytes, 3) if self.memory_bytes else None
        return d


def _staging() -> Path:
    """The source's own copy of the chain (each round's parent): in memory (/dev/shm) when there is
    one, since its only reader is the next round and a disk's fsync would lengthen the downtime."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None
    return Path(tempfile.mkdtemp(prefix="ckpt-migrate-", dir=base))  # 0700


def _connect(host: str, port: int) -> socket.socket:
    try:
        s = socket.create_connection((host, port))
    except OSError as e:
        raise CkptError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


# A live round copies after the thaw, so it need not hold its whole dirty set at once: the copy
# streams through this much buffer (a GiB's round 0 would otherwise fault in a GiB of buffer).
LIVE_BUFFER = 64 << 20
COMPRESS_BELOW = 200e6  # bytes/s: on a slower link zstd (~0.3-0.5 GB/s here) saves more than it costs


def _compress(limit: float | None, loopback: bool) -> bool:
    """Whether the chunks are worth compressing: only on a link slower than zstd. (Not decided
    by the measured round bandwidth: that is the pipeline's own rate, which compression lowers.)"""
    if limit is not None:
        return limit < COMPRESS_BELOW
    return not loopback


def _stream_dump(
    ch: wire.Channel,
    pid: int,
    staging: Path,
    index: int,
    final: bool,
    bucket: TokenBucket | None,
    compress: bool,
    on_end: Callable[[], None] | None = None,
    **options: Any,
) -> tuple[DumpResult, StreamOut]:
    """One round as a dump whose layer goes onto the wire as it is written (the staging copy keeps
    only its metadata, the next round's parent), ended by END."""
    name = f"layer-{index + 1:04d}.ckpt"
    out = StreamOut(ch, bucket, name, index, final)
    out.on_end = on_end
    wopts = {"tee": out, "keep_chunks": False, "compress": compress}
    if final:  # the downtime: small work on the (real-time) calling thread (ckpt/lastround.py)
        wopts["inline_pages"] = INLINE_PAGES
        options["downtime"] = True
    r = dump(pid, staging, writer_options=wopts, **options)
    if Path(r.layer).name != name:
        raise CkptError(f"internal: round {index} wrote {Path(r.layer).name}, not {name}")
    out.end()
    return r, out


def _acked(ch: wire.Channel, out: StreamOut) -> tuple[int, float]:
    """Wait for the destination to acknowledge a live layer (stored, and opened as a valid link of
    the chain); (bytes it put on the wire, seconds from its first chunk until the ACK)."""
    ack = ch.expect(wire.ACK).obj()
    if ack.get("name") != out.name:
        raise wire.ProtocolError(f"the destination acknowledged {ack.get('name')!r}, not {out.name}")
    return ch.sent - out.sent_before, time.perf_counter() - out.t_first


def migrate(
    pid: int,
    to: str,
    *,
    token_file: str | None = None,
    policy_name: str = "qemu",
    downtime_limit_ms: float = policy.DEFAULT_DOWNTIME_MS,
    max_rounds: int | None = None,
    bandwidth: float | None = None,
    auto_converge: bool = False,
    track: str = "auto",
    tls: TlsOptions | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    tcp_established: bool = False,  # move established TCP connections (migrate/tcpmove.py)
    on_commit: str | None = None,  # the network's step at the commit (migrate/netmove.py)
    on_abort: str | None = None,
) -> MigrateResult:
    rule = policy.get_rule(policy_name)
    limits = policy.Limits(downtime_limit_ms, max_rounds or policy.DEFAULT_MAX_ROUNDS)
    token = auth.load_token(token_file)
    host, port = wire.parse_hostport(to)
    check_dumpable(pid)
    reaped = reap_orphans(pid)  # throttle cgroups of a ckpt killed with its guard (cgthrottle.py)
    walked = walk(pid)  # /proc read once for every check before the first round
    refused = refusals(pid, walked)
    if refused:
        raise MigrationFailed(
            f"cannot migrate pid {pid}: {'; '.join(refused)}; the original process {pid} was not touched "
            "and runs on"
        )
    if (on_commit or on_abort) and not tcp_established:
        raise CkptError("--on-commit and --on-abort move TCP connections: they need --tcp-established")
    if on_abort and not on_commit:
        raise CkptError("--on-abort undoes --on-commit: give both")
    check_on_commit(on_commit)
    check_on_abort(on_abort)
    from ckpt.dumptree import has_children

    if has_children(pid):  # one stop-and-copy of the whole tree (ckpt/migrate/tree.py)
        from ckpt.migrate.tree import migrate_tree

        res = migrate_tree(
            pid, to, token_file=token_file, bandwidth=bandwidth, tls=tls, on_round=on_round,
            tcp_established=tcp_established, walked=walked, on_commit=on_commit, on_abort=on_abort,
        )  # fmt: skip
        # A tree has no live rounds: say so of every option that chose how rounds go, never drop it.
        unused = [
            name
            for name, given in (
                (f"--policy {policy_name}", policy_name != "qemu"),
                (f"--downtime-limit {downtime_limit_ms:g}", downtime_limit_ms != policy.DEFAULT_DOWNTIME_MS),
                (f"--max-rounds {max_rounds}", max_rounds is not None),
                ("--auto-converge", auto_converge),
            )
            if given
        ]
        if unused:
            res.warnings.append(
                f"{', '.join(unused)}: not used: a process tree is migrated by one stop-and-copy, "
                "no live rounds"
            )
        return res
    check_connections(pid, tcp_established, walked.get(pid))  # a refusal now, not after the live rounds
    check_hooks_env(pid, bool(on_commit or on_abort), walked.get(pid))  # (the same)
    t_start = time.perf_counter()
    sock = _connect(host, port)
    if tls is not None and tls.enabled:
        sock = client_wrap(sock, tls, host)
    ch = wire.Channel(sock)
    staging = _staging()
    bucket = TokenBucket(bandwidth) if bandwidth else None
    throttle: AutoConverge | None = None
    history: list[policy.Round] = []
    pool = BufferPool()  # the copy buffer, faulted in once for every round
    records = RecordMemo()  # each round's records, the final's checked only where they changed
    reports: list[RoundReport] = []
    warnings: list[str] = list(reaped)
    tracked = False  # the target holds our tracker (round 0 armed it)
    synced = False  # the destination confirmed it had built the rounds (once per migration)
    stopped = False  # the final dump left the target stopped
    ours: list[int] = []  # [pid] once that dump's thaw stops it with ckpt's own SIGSTOP (not another's)
    committed = False  # COMMIT was sent: the copy may run, the original must not be let go
    committer: _Committer | None = None
    handover = TcpHandover(on_commit, on_abort) if tcp_established else None
    loopback = is_loopback(host)
    boost = Boost()
    guard: Guard | None = None
    target_boost = TargetBoost()
    try:
        # Before anything is done to the target: from here a SIGKILL of ckpt leaves exactly one
        # copy running (guard.py), whatever point of the hand-over it comes at.
        with deferred_signals():  # (a Ctrl-C comes after the assignment, so the finally closes it)
            guard = _guard(pid, ch, staging)
        target_boost.guard = guard
        if handover is not None:
            handover.guard, handover.stash_dir = guard, staging  # (what a death leaves: guardtcp.py)
        if auto_converge:  # a cgroup CPU quota where one can be used; the SIGSTOP duty cycle where not
            with deferred_signals():  # a Ctrl-C comes after the assignment, so the finally undoes it
                throttle = AutoConverge([pid], guard)
        auth.client_handshake(ch, token)
        decision = policy.Decision(False, "")
        index = 0
        below: MergedView | None = None  # the chain through the last round
        prev_below: MergedView | None = None  # the chain under the last round
        ctab = ChainTable()  # the page table of `below`, advanced round by round
        table: PageTable | None = None
        # smaps' walk, read again by a round only when the mappings change. No flag counters here:
        # while they exist every syscall on the machine takes the tracepoints' slow path; the final
        # dump opens its own just before its freeze (ckpt/proc/ptcache.py, baseline_live).
        walks = PageTablesCache(watch=False)

        seized: list[float] = []  # when the final freeze began (the downtime's start)

        def on_final_phase(phase: str, done: int, total: int) -> None:
            """The final round only lifts the throttle (it copies frozen and leaves it stopped)."""
            if phase == "seize":
                # Called in the freezing thread: a hand-off thread, it joins the boost (its freeze's
                # own spell, ptrace/rtboost.py, ends before the thaw; this one lasts through it).
                boost.join()
                seized.append(time.perf_counter())
                mark("src final-seize")
            if throttle and phase == "seize":
                throttle.pause()
            if phase == "freezing":
                # Just before the stops, not at "seize": the walks' prewarm and the freeze's checks
                # come between, and the target would run them raised.
                target_boost.start(pid)  # its stops not behind the machine's tasks (targetboost.py)

        def on_phase(phase: str, done: int, total: int) -> None:
            """The throttle holds the process back except while a round freezes it: lifted when
            the freeze begins (a throttled thread would hold the freeze up), put back at the copy."""
            if throttle and phase == "seize":
                throttle.pause()
            elif throttle and phase == "copy" and done == 0:
                throttle.resume()

        while True:
            t0 = time.perf_counter()
            compress = _compress(bandwidth, loopback)
            r, out = _stream_dump(
                ch, pid, staging, index, False, bucket, compress,
                incremental=index > 0, pre_dump=True, track=track, progress=on_phase,
                max_buffer=LIVE_BUFFER, parent_below=prev_below, parent_table=table, walks_cache=walks,
                buffer_pool=pool, records=records,
            )  # fmt: skip
            tracked = True
            # The chain so far, kept open: the next round's dump stacks on it instead of decoding
            # every older layer's metadata again (a GiB's first layer: ~30 ms a round).
            prev_below, below = below, MergedView(Layer.open(r.layer), below=below)
            table = ctab.add(below)
            sent, send_secs = _acked(ch, out)
            secs = time.perf_counter() - t0
            history.append(
                policy.Round(index, r.pages_dirty, sent, secs, max(r.pages_total, 1), send_secs, r.freeze_ms)
            )
            decision = policy.decide(rule, history, limits)
            thr = throttle.fraction if throttle else 0.0
            if throttle and not decision.stop and policy.throttle_due(history):
                thr = 0.2 if throttle.fraction == 0 else min(0.99, throttle.fraction + 0.1)
                throttle.set(thr)
            rep = RoundReport(
                round=index,
                kind="live",
                duration_ms=round(secs * 1e3, 3),
                pages_dirty=r.pages_dirty,
                pages_sent=r.pages_dumped,
                bytes_wire=sent,
                freeze_ms=r.freeze_ms,
                dirty_rate=round(policy.dirty_rate(history), 1),
                bandwidth=round(policy.bandwidth(history), 1),
                predicted_downtime_ms=round(min(policy.predicted_downtime_ms(history), 1e9), 3),
                throttle=round(thr, 2),
                decision=decision.reason,
                phases_ms=r.phases_ms,
                throttle_setting=throttle.setting if throttle else "",
            )
            reports.append(rep)
            if decision.stop and not synced:
                # Wait for the destination to have built every round so far. If that took longer
                # than a round, the process ran on meanwhile: one more live round picks that up.
                ts = time.perf_counter()
                ch.send_obj(wire.SYNC, {})
                ch.expect(wire.SYNCED)
                waited = time.perf_counter() - ts
                rep.sync_ms = round(waited * 1e3, 3)
                synced = True
                if waited > max(SYNC_SLACK, secs) and not policy_name.startswith("rounds:"):
                    rep.decision += (
                        f"; the destination took {waited * 1e3:.0f} ms to catch up: one more round"
                    )
                    decision = policy.Decision(False, rep.decision)
            if on_round:
                on_round(rep)
            hold(f"live-{index}")  # (tests: between live rounds, the target running untouched)
            if decision.stop:
                break
            index += 1
        if throttle and throttle.fraction > 0:
            warnings.append(f"auto-converge throttled the process with a {throttle.mechanism}")
        if throttle and throttle.halted:
            warnings.append(f"auto-converge: {throttle.halted}")
        if (warn := policy.convergence_warning(history, decision, policy.bandwidth(history))) is not None:
            warnings.append(
                f"{warn}; the final round carries what is dirty"
                + ("" if throttle else "; --auto-converge would throttle the process")
            )
        # The final round: the ordinary incremental dump, the process left stopped (SIGSTOP) until
        # the destination answers. Its tracker stays in: taking it out walks every tracked page
        # (~100 ms for 64 MiB), and on success the original is killed anyway; only a failure pays.
        boost.start()  # the downtime: ckpt's threads ahead of the machine's others (boost.py)
        t0 = time.perf_counter()
        if guard is not None:
            guard.phase("handover")  # (before the freeze: a death from here continues the original)
        stopped = True  # from here (even if this dump fails, it may leave the process stopped)
        compress = _compress(bandwidth, loopback)
        # Two-phase: the destination holds its built copy stopped (READY) until COMMIT; from the
        # COMMIT on, the original is never let go again unless the destination says it killed
        # its copy. So at most one of them ever runs. The COMMIT is sent by a thread of its own
        # as soon as READY comes: the final dump may still be publishing its staging copy then.
        committer = _Committer(
            ch, before_commit(handover), boost, guard, handover.stash if handover else None,
            held=lambda: [pid],  # (still stopped at the COMMIT: `continued`)
        )  # fmt: skip
        # Started now, before the freeze: a thread started at END would first wait for a CPU as an
        # ordinary one (reset on fork) before it could join the boost and read READY (5-50 ms in
        # the downtime with the session busy). It waits for `release` (END is out) to read.
        start_thread(committer)
        mark("src final-start")

        def before_stop(stops: list[int]) -> None:
            """The thaw's SIGSTOP is ckpt's own (the process ran when frozen): told before it, so that
            a failure, or the guard after a death, continues it. Not called for a process someone
            else had stopped: it stays stopped whatever becomes of the migration."""
            if guard is not None:
                guard.stopped(stops)
            ours.extend(stops)

        fr, out = _stream_dump(
            ch, pid, staging, index + 1, True, bucket, compress, committer.release,
            incremental=True, leave_stopped=True, before_stop=before_stop, track=track,
            parent_below=prev_below, parent_table=table, progress=on_final_phase, buffer_pool=pool,
            on_lap=lap_mark, records=records,
            **({"tcp_dump": handover.member()} if handover else {}),
        )  # fmt: skip
        mark("src final-dump-returned")
        hold("final-dumped")  # (tests: the target still raised; the committer goes on meanwhile)
        target_boost.end()  # (stopped since the thaw: it ran nothing raised)
        if throttle:
            throttle.close()  # back in its own cgroup while stopped (the throttle held to the freeze)
            if throttle.cgroup and throttle.cgroup.left:
                warnings.append(f"the throttle cgroup {throttle.cgroup.left}: remove it by hand")
        committer.release()  # (END went out at the end, not at the footer)
        sent = ch.sent - out.sent_before
        # (Not t0 plus the phases before the freeze: the final dump may read its smaps walk, or
        # pre-copy, while the process still runs.)
        before = (fr.phases_ms.get("prepare", 0.0) + fr.phases_ms.get("buffer", 0.0)) / 1e3
        freeze_start = seized[0] if seized else t0 + before
        try:
            ready, running, t_run = committer.outcome()
        finally:
            committed = committer.committed
        boost.end()
        hold("running")
        # The copy runs: the original goes. It is stopped, so it does nothing in between.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        hold("killed")
        if handover:
            handover.finished()
        stopped = tracked = False
        with contextlib.suppress(wire.ConnectionLost):
            ch.send_obj(wire.DONE, {"killed": pid})
        final_rep = RoundReport(
            round=index + 1,
            kind="final",
            duration_ms=round((t_run - t0) * 1e3, 3),
            pages_dirty=fr.pages_dirty,
            pages_sent=fr.pages_dumped,
            bytes_wire=sent,
            freeze_ms=fr.freeze_ms,
            dirty_rate=0.0,
            bandwidth=round(sent / max(t_run - t0, 1e-9), 1),
            predicted_downtime_ms=0.0,
            throttle=0.0,
            decision="restored at the destination",
        )
        reports.append(final_rep)
        if on_round:
            on_round(final_rep)
        return MigrateResult(
            source_pid=pid,
            pid=int(ready["pid"]),
            pid_kept=bool(running.get("pid_kept", False)),
            policy=policy_name,
            stop_reason=decision.reason,
            rounds=len(history),
            downtime_ms=round((t_run - freeze_start) * 1e3, 3),
            total_ms=round((t_run - t_start) * 1e3, 3),
            bytes_sent=ch.sent,
            memory_bytes=history[0].memory_pages * PAGE if history else 0,
            final_freeze_ms=fr.freeze_ms,
            restore_ms=float(running.get("restore_ms", 0.0)),
            warm=running.get("warm") is True,
            final_phases_ms=fr.phases_ms,
            restore_phases_ms=_floats(running.get("restore_phases_ms")),
            round_reports=reports,
            warnings=warnings,
            throttle=throttle.report() if throttle else None,
            init_pid=init_pid_of(running),
        )
    except BaseException as e:
        target_boost.end()  # (a failed final seize: its own policy, before it may be let go)
        if committer is not None:
            state = committer.abandon()
            if state == "runs":
                # The copy runs: it is the one. (The failure came after the commit.)
                assert committer.ready is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if handover:
                    handover.finished()
                # (A Ctrl-C: "interrupted", and 130 as for any; str() of a KeyboardInterrupt is "".)
                ctrl_c = isinstance(e, KeyboardInterrupt)
                raise MigrationFailed(
                    f"{'interrupted' if ctrl_c else str(e) or type(e).__name__} after the commit; the "
                    f"copy runs at the destination as pid {committer.ready['pid']} and the original "
                    f"process {pid} was killed",
                    exit_code=130 if ctrl_c else 1,
                ) from None
            committed = state == "unknown"  # (not: never sent, or the destination says its copy is gone)
        if committed and not isinstance(e, wire.PeerError):
            # The COMMIT left; whether it arrived is unknown (no RUNNING, no error). Letting the
            # original go could make two copies: it stays stopped for someone to decide.
            if guard is not None:
                guard.phase("hold")
            raise MigrationFailed(
                f"{e} after the commit: the copy may be running at the destination, so the original "
                f"process {pid} is kept stopped (not killed); if the copy runs there, kill -9 {pid}, "
                f"else kill -CONT {pid}" + (handover.undecided() if handover else "")
            ) from None
        if guard is not None and stopped:
            guard.phase("let-go")  # (the destination's copy never runs, or is gone: this one runs)
        lost = handover.take_back() if handover else ""
        if throttle:
            throttle.close()  # into its own cgroup before it is let go
        if isinstance(e, ContinuedMeanwhile):
            ours.clear()  # it runs already: no SIGCONT of ckpt's (its handler would run twice)
        what = _let_go(pid, ours, tracked) + (throttle.note() if throttle else "")
        if lost:
            what += f"; but these TCP connections could not be given back to it: {lost}"
        with contextlib.suppress(CkptError, OSError, ValueError):
            ch.send_obj(wire.ABORT, {"reason": str(e)[:200] or type(e).__name__})
        if isinstance(e, KeyboardInterrupt):
            raise MigrationFailed(f"interrupted; {what}", exit_code=130) from None
        if isinstance(e, CkptError):
            raise MigrationFailed(f"{e}; {what}", reason=_reason(e)) from None
        raise
    finally:
        try:
            boost.end()
            target_boost.end()
            if throttle:
                throttle.close()
            with contextlib.suppress(OSError):
                ch.sock.shutdown(socket.SHUT_RDWR)  # wakes a committer still waiting in recv
            if committer is not None and committer.ident is not None:
                # Ended before the staging dir goes and the guard is closed: its before_ready
                # stash (tcpmove.py) would race the rmtree and the guard's end, and be left behind.
                committer.stop()
                committer.join(COMMITTER_JOIN)
            ch.close()
            shutil.rmtree(staging, ignore_errors=True)
            pool.close()
        finally:
            if guard is not None:
                # Last: everything is done that a death could have left half-way. Reaped even when
                # the above raised (a Ctrl-C in rmtree): a guard left to a library's host process
                # would act later on stale state.
                guard.close()


def lap_mark(name: str) -> None:
    """The final dump's steps on the timeline (timeline.py), one mark each."""
    mark("src lap:" + name.replace(" ", "_"))


def _guard(pid: int, ch: wire.Channel, staging: Path | None = None) -> Guard | None:
    """The migration's guard (guard.py), holding the target and the socket, and removing `staging`
    if ckpt dies. CKPT_MIGRATE_GUARD=0 runs without one (only to measure what it costs:
    bench_migrate.py --guard 1,0)."""
    if os.environ.get("CKPT_MIGRATE_GUARD", "1") == "0":
        return None
    try:
        return Guard([pid], sock=ch.sock.fileno(), staging=str(staging) if staging else None)
    except OSError as e:  # (no process can be started: nothing is done to the target yet)
        raise CkptError(f"cannot start the migration's guard: {e.strerror or e}") from None


class _Committer(threading.Thread):
    """Answers READY with COMMIT as soon as it comes, then waits for RUNNING. `stop()` forbids the
    commit from then on (the migration is being abandoned) and says whether it was sent already."""

    def __init__(
        self,
        ch: wire.Channel,
        before_commit: Callable[[], None] | None = None,
        boost: Boost | None = None,
        guard: Guard | None = None,
        before_ready: Callable[[], None] | None = None,
        held: Callable[[], Sequence[int]] | None = None,
    ) -> None:
        super().__init__(name="ckpt-commit", daemon=True)
        self.held = held  # the processes the hand-over holds stopped: still so at the COMMIT
        self.before_ready = before_ready  # while the destination builds its copy (tcpmove.py stash)
        self.ch = ch
        self.guard = guard  # told the commit's two sides (guard.py: "commit", "committed")
        self.boost = boost  # started after the boost: on the downtime's path, so it joins
        self.before_commit = before_commit  # the original's TCP connections let go (tcpmove.py)
        self.lock = threading.Lock()
        self.aborted = self.committed = False
        self.ready: dict[str, Any] | None = None
        self.running: dict[str, Any] | None = None
        self.t_running = 0.0
        self.error: BaseException | None = None
        # END is out: from then on only this thread uses the socket. A Latch: the main thread sets it
        # (at the footer, and again in its cleanup), and a Ctrl-C inside threading.Event.set() could
        # leave its lock held, the second set() then waiting for ever (ckpt/threadpool.py).
        self.released = Latch()
        # Set as run() ends: the main thread waits for it, not in join(), which a Ctrl-C given to
        # this thread by the kernel would not wake (Latch.wait polls beside the wakeup fd).
        self.ended = Latch()

    def release(self) -> None:
        self.released.set()

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.ended.set()

    def _run(self) -> None:
        if self.boost is not None:
            self.boost.join()
        self.released.wait()
        if self.aborted:
            return
        try:
            hold("final-footer")
            with self.lock:
                # Not for an abandoned migration (stop()): the stash is for a death after the
                # let-go, which it never reaches; written now it would tell the guard of a file
                # the take-back and the staging dir's removal race.
                if self.aborted:
                    return
                if self.before_ready is not None:
                    self.before_ready()
            ready = _await_ready(self.ch)
            mark("src ready-received")
            hold("ready")
            if os.environ.get("CKPT_MIGRATE_TEST_FAIL_AT_READY") == "1":
                raise CkptError("test: failing between READY and COMMIT")
            with self.lock:
                if self.aborted:
                    return
                # The last moment the original can still be the one: continued by someone else
                # since the final dump, it has done what the copy never saw. (Before the TCP let-go
                # and the guard's "commit": the abort is the ordinary one, from "handover".)
                if self.held is not None and (gone_on := continued(self.held())) is not None:
                    raise ContinuedMeanwhile(gone_on)
                self.ready = ready
                if self.before_commit is not None:
                    self.before_commit()
                if self.guard is not None:
                    self.guard.phase("commit")  # with the socket's count: which side of the send
                hold("commit-told")
                self.ch.send_obj(wire.COMMIT, {"pid": ready["pid"]})
                self.committed = True  # sent whole: from here it may have arrived
                if self.guard is not None:
                    self.guard.phase("committed")
                hold("committed")
            # The copy is built: RUNNING follows the detach at once. A destination silent for
            # this long leaves the question open (the original stays stopped), not hanging.
            self.ch.sock.settimeout(RUNNING_TIMEOUT)
            self.running = self.ch.expect(wire.RUNNING).obj()
            self.t_running = time.perf_counter()
            mark("src running-received")
        except BaseException as e:
            self.error = e
            if self.committed and isinstance(e, wire.PeerError) and self.guard is not None:
                # The destination says its copy is gone: from now on a death of ckpt must let the
                # original run, not kill it (the main thread says "let-go" too, later).
                self.guard.phase("let-go")

    def outcome(self) -> tuple[dict[str, Any], dict[str, Any], float]:
        """Wait for the destination's answer and return READY, RUNNING and when RUNNING came; raise
        what went wrong. Ctrl-C abandons the migration only while the commit is unsent."""
        while self.is_alive():
            try:
                self.ended.wait()
                self.join()
            except KeyboardInterrupt:
                if not self.stop():
                    raise
                # Committed: the destination's answer decides; wait for it.
        if self.error is not None:
            raise self.error
        assert self.ready is not None and self.running is not None
        return self.ready, self.running, self.t_running

    def stop(self) -> bool:
        with self.lock:
            self.aborted = True
            self.released.set()  # (not released yet: it ends without reading)
            return self.committed

    def abandon(self) -> str:
        """The migration failed: no COMMIT from now on, and where the copy stands. "runs" (RUNNING
        came: the copy is the one), "unknown" (COMMIT went out, no answer: it may run), or "gone"
        (COMMIT never went out, or the destination says its copy is gone)."""
        if not self.stop():
            return "gone"
        with deferred_signals():
            self.join(RUNNING_TIMEOUT + 5)
        if self.running is not None and self.ready is not None:
            return "runs"
        return "gone" if isinstance(self.error, wire.PeerError) else "unknown"


def _await_ready(ch: wire.Channel) -> dict[str, Any]:
    """The destination's answer to the final layer: its copy built and held stopped. A Ctrl-C or
    an error here aborts: the copy is killed there, the original runs on here."""
    m = ch.expect(wire.READY).obj()
    pid = m.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 22:
        raise wire.ProtocolError("the destination reported no valid pid")
    return m


def continued(pids: Sequence[int]) -> int | None:
    """The first of `pids`, held for the hand-over (frozen by the final dump, or stopped since its
    thaw), that runs again: continued by someone else. None: each is still held, or gone.

    Held: a thread in a ptrace-stop (t: the dump's freeze, whose thaw drops a SIGCONT that came
    meanwhile) or a group-stop (T), or a SIGSTOP pending: the thaw's, queued before the detach and
    not yet taken (the threads then run, state R, until the first takes it). Read in that order: a
    SIGSTOP no longer pending was taken, and its taker set its state T under the same lock
    (do_signal_stop) before the others are woken to join the stop. A SIGCONT ends the group-stop of
    every thread at once and discards a pending SIGSTOP: none is T then. (Not told: a SIGCONT and a
    new stop of someone else's both since the dump; docs/migrate.md.)"""
    for pid in pids:
        # The usual case in one read, on the downtime's path: a leader in its stop (a SIGCONT would
        # have woken it with every other thread) or still frozen.
        with contextlib.suppress(CkptError, OSError, ValueError):
            if read_stat(pid).state in ("T", "t"):
                continue
        if sigstop_on_its_way(pid):
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone: it runs nothing (the commit goes on; its kill finds nothing)
        states = []
        for tid in tids:
            with contextlib.suppress(CkptError, OSError, ValueError):
                states.append(read_stat(pid, int(tid)).state)
        live = [st for st in states if st not in ("Z", "X")]
        if live and not any(st in ("T", "t") for st in live):
            return pid
    return None


def _reason(e: BaseException) -> str:
    """The failure's word in --json's end object: "continued" where someone else continued the
    original during the hand-over; "" (no end object) for the others."""
    return "continued" if isinstance(e, ContinuedMeanwhile) else ""


def init_pid_of(running: dict[str, Any]) -> int | None:
    """The destination's word on its namespace init (serve --pidns); anything but a pid: none."""
    v = running.get("init_pid")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _floats(v: Any) -> dict[str, float]:
    """A peer's timing map, kept only if it is one (it is shown, never trusted)."""
    if not isinstance(v, dict) or len(v) > 64:
        return {}
    return {str(k)[:40]: float(x) for k, x in v.items() if isinstance(x, int | float)}


def _exited(pid: int) -> bool:
    try:
        return read_stat(pid).is_zombie
    except TargetExited:
        return True


def _let_go(pid: int, ours: list[int], tracked: bool) -> str:
    """Leave the original running and untracked, or stopped where someone else stopped it (a shell's
    Ctrl-Z, a debugger: before the migration or during it); say what happened to it. `ours`: [pid]
    where the final dump's thaw stopped it with ckpt's own SIGSTOP (ckpt.ptrace.freeze.thaw_all)."""
    if _exited(pid):
        return f"the original process {pid} has exited"
    note = ""
    # Stopped again by someone else while in ckpt's stop: their stop signal waits, pending, and the
    # SIGCONT would discard it. Left stopped, as they asked. Read before the untrack, whose freeze
    # takes a pending signal off (its injected calls run the thread into it) and queues it again.
    theirs = bool(ours) and stopped_by_another(pid)
    seen: list[bool] = []  # the untrack's freeze: whether a job-control stop held the process
    if tracked:
        try:
            untrack(pid, on_frozen=lambda fz: seen.append(fz.was_stopped))
        except CkptError as e:
            note = f", but its tracking could not be removed ({e})"
    if ours:
        if not theirs:
            # After untrack: a freeze of a stopped process leaves it stopped, so SIGCONT comes last.
            # Each thread goes back inside the syscall it was stopped in (ptrace/resumestop.py).
            for n in continue_stopped(ours):
                note += f", {n}"
    else:
        # ckpt's final stop never came: any stop is someone else's. (Told by the untrack's freeze
        # where there was one: just after a thaw, the process re-enters its stop running, state R.)
        theirs = seen[-1] if seen else job_stopped(pid)
    if theirs:
        done = (note or " (untracked)") if tracked else " (not touched)"
        return (
            f"the original process {pid} stays stopped, as someone else stopped it (SIGSTOP, Ctrl-Z)"
            f"{done}; kill -CONT {pid} continues it"
        )
    if tracked:
        return f"the original process {pid} runs on" + (note or " (untracked)")
    return f"the original process {pid} was not touched and runs on"

