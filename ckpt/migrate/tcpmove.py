"""Established TCP connections across a migration (`ckpt migrate --tcp-established`; CRIU + P.Haul's
--tcp-established).

The live rounds leave the connections alone: they are no state of a round (proc/tcp.py: a pre-dump
neither refuses nor touches them), and they carry traffic as before while the memory is copied.
The final round's dump takes them as `dump --kill` does (the nftables lock, repair mode, their
state read), but keeps them, in repair mode and locked, while the process stays stopped:

  READY     the destination has built the copy, its sockets made and bound in repair mode but not
            connected (restore/tcp.py): on one machine the original's sockets still hold the same
            address pairs, and a second connect of a pair in use is EADDRNOTAVAIL.
  commit    just before COMMIT goes out, the original's sockets let go of their address pairs with
            a repair-mode disconnect (connect(AF_UNSPEC): no FIN, no reset; the socket stays the
            process's, closed). The destination connects its sockets, fills their queues, takes
            them out of repair mode and lifts the lock as the last step before its copy runs.
  RUNNING   the original is killed: its sockets, in repair mode and closed, go without a word.

Every way back leaves the original with its connections: before the commit they were only in
repair mode (taken off, the lock lifted, then SIGCONT); after the disconnect, if the destination
says its copy is gone (it closed its sockets in repair mode first), the same sockets are connected
again in repair mode from the records the dump read (restore/tcp.py's rebuild), then taken out of it.

The lock has one name, the one the dump chose, recorded with each connection. On one machine the
source and the destination share it: the destination finds it there and lifts it when its copy
runs; the source's unlock after the kill finds it gone. On two machines the destination makes its
own lock of that name before it connects (netlock.ensure) and lifts it when its copy runs; the
source lifts its own after the kill. Across two machines or network namespaces the addresses must
move too, so that the peer's packets reach the destination: the caller's --on-commit command does
it at the commit, after the original let go, and --on-abort moves them back (netmove.py). A
listener of the process is not handled here: on one machine the copy takes over the same socket
(restore/listenshare.py), elsewhere it is bound again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ckpt import netlock
from ckpt.errors import CkptError, RestoreError
from ckpt.image.tcp import TcpRecord
from ckpt.migrate.netmove import run_hook
from ckpt.proc.tcp import SOL_TCP, TCP_ESTABLISHED, TCP_INFO, TcpDump, repair_off
from ckpt.restore.tcp import go_live, prepare, rebuild

if TYPE_CHECKING:
    from ckpt.migrate.guard import Guard
    from ckpt.proc.fds import FdInfo

_libc = ctypes.CDLL(None, use_errno=True)
_UNSPEC = struct.pack("=H14x", socket.AF_UNSPEC)  # a sockaddr of family AF_UNSPEC: disconnect


def _disconnect(s: socket.socket) -> None:
    if _libc.connect(s.fileno(), _UNSPEC, len(_UNSPEC)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class TcpHandover:
    """The source's connections from the final round's dump until the migration ends: one TcpDump
    per process dumped (a tree's members each have theirs)."""

    def __init__(self, on_commit: str | None = None, on_abort: str | None = None) -> None:
        self.dumps: list[TcpDump] = []
        self.detached = False
        # The network's own step (migrate --on-commit / --on-abort): the connections' addresses
        # moved to the destination once the original has let go of them, and back if the original
        # must take them again (netmove.py).
        self.on_commit, self.on_abort = on_commit, on_abort
        self.moved = False
        # The migration's guard (guard.py), told what is done to the connections before it is
        # done, and a private file of the records it needs to connect them again (stash()).
        self.guard: Guard | None = None
        self.stash_dir: Path | None = None
        netlock.prepare()  # (not in the final freeze)

    def member(self) -> TcpDump:
        """A TcpDump for one process's final dump. keep: it leaves the connections in repair mode
        and locked, and records the lock's name for the destination; this object is their owner."""
        d = TcpDump(True, keep=True, command="migrate", hold=True)
        if self.guard is not None:
            d.announce = self._announce
        self.dumps.append(d)
        return d

    def _announce(self, pid: int, lock: str, inos: list[int], reuse: list[int]) -> None:
        """To the guard, before the lock is made and the sockets put in repair mode (in the freeze:
        a pipe write each), with those whose SO_REUSEADDR is on (repair mode resets it)."""
        assert self.guard is not None
        for i in range(0, max(len(inos), 1), 100):  # (each message below PIPE_BUF)
            part = inos[i : i + 100]
            self.guard.tell({"tcp": [pid, lock, part, [x for x in part if x in reuse]]})

    def stash(self) -> None:
        """The records of the connections (their queues, sequence numbers, windows), into a private
        file the guard is told of: from the commit's let-go on, the original's sockets are
        disconnected, and a ckpt that dies then leaves only these to connect them again with
        (guardtcp.py). Written while the destination builds its copy, before READY: not in the
        downtime's path."""
        if self.guard is None or self.stash_dir is None or not self.dumps:
            return
        import msgpack

        path = self.stash_dir / "tcp-records"
        recs = [rec for d in self.dumps for _, rec in d.taken]
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(msgpack.packb(recs, use_bin_type=True))
        except OSError:
            # (/dev/shm full): the migration goes on; only a death after the let-go would then
            # leave the original's connections disconnected. Not told: the guard finds no stash.
            with contextlib.suppress(OSError):
                path.unlink()
            return
        self.guard.tell({"tcp_records": str(path)})

    @property
    def locks(self) -> list[str]:
        return [d.lock for d in self.dumps if d.lock]

    def let_go(self) -> None:
        """At the commit: the original's sockets give up their address pairs, silently."""
        self.detached = True  # (before: a failure half-way takes each back, detached or not)
        for d in self.dumps:
            for s, rec in d.taken:
                try:
                    _disconnect(s)
                except OSError as e:
                    what = TcpRecord.from_dict(rec, "tcp").label()
                    raise CkptError(f"letting go of {what} at the commit failed: {e.strerror}") from None
        if self.on_commit:
            self.moved = True  # (before: a hook that fails half-way is undone by --on-abort too)
            if self.guard is not None:
                self.guard.tell({"tcp_moved": self.on_abort or ""})
            run_hook(self.on_commit, "commit", self.records())

    def records(self) -> list[TcpRecord]:
        return [TcpRecord.from_dict(rec, "tcp") for d in self.dumps for _, rec in d.taken]

    def take_back(self) -> str:
        """The migration failed and the original runs on: its connections as they were, out of
        repair mode, the locks lifted. Returns what could not be taken back ("" if all was)."""
        failed: list[str] = []
        if self.moved and self.on_abort:
            try:
                run_hook(self.on_abort, "abort", self.records())
                if self.guard is not None:
                    self.guard.tell({"tcp_moved": None})  # (moved back: not again)
            except CkptError as e:
                failed.append(str(e))
        for d in self.dumps:
            for s, rec in d.taken:
                r = TcpRecord.from_dict(rec, "tcp")
                try:
                    if self.detached and _state(s) != TCP_ESTABLISHED:
                        # Connected again on the same socket, from what the dump read of it: the
                        # disconnect emptied its queues. (SO_ERROR: the disconnect left
                        # ECONNABORTED, which the process would read once.)
                        prepare(s, r, beside_listener=True)  # its own listener may be on the port
                        rebuild(s, r)
                        s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        go_live(s, r)
                    else:
                        repair_off(s, r.reuseaddr())
                except (OSError, RestoreError) as e:
                    failed.append(f"{r.label()}: {getattr(e, 'strerror', None) or e}")
            d.taken = []
            d.repair = []  # out of repair mode above: release() must not touch them again
            with contextlib.suppress(CkptError):
                d.release()  # ckpt's copies closed, the lock lifted
        return "; ".join(failed)

    def undecided(self) -> str:
        """For the message when whether the copy runs is unknown (the original is kept stopped)."""
        if not self.detached or not self.locks:
            return ""
        names = " ".join(self.locks)
        return (
            f"; its TCP connections were let go at the commit (the copy takes them up), and the "
            f"network lock {names} is left for the copy to lift (if the copy does not run: "
            f"nft delete table inet NAME)"
        )

    def finished(self) -> None:
        """The copy runs and the original was killed: ckpt's copies go (in repair mode: nothing is
        sent), and the locks too if they are still here (the destination is another machine)."""
        for d in self.dumps:
            d.killed()
            lock, d.lock = d.lock, ""
            d.release()
            if lock:
                with contextlib.suppress(CkptError):
                    netlock.unlock(lock)


def _state(s: socket.socket) -> int:
    """TCP_INFO's tcpi_state (1: established)."""
    try:
        return s.getsockopt(SOL_TCP, TCP_INFO, 1)[0]
    except OSError as e:
        if e.errno == errno.EBADF:
            raise
        return 0


MAX_ARG_STRLEN = 32 * 4096  # bytes of one exec argument, its NUL included (linux/binfmts.h)


def check_on_commit(command: str | None) -> None:
    """Refused before anything is done: --on-commit longer than /bin/sh -c can be given (one
    exec argument), which would fail only at the commit, inside the downtime."""
    if command and len(command.encode()) + 1 > MAX_ARG_STRLEN:
        raise CkptError(
            f"--on-commit is too long: {len(command.encode())} bytes, more than one argument of "
            f"/bin/sh -c takes ({MAX_ARG_STRLEN - 1}); put the commands in a script and give its path"
        )


def check_on_abort(command: str | None) -> None:
    """Refused before anything is done: --on-abort too long to be told to the guard, which runs
    it if ckpt dies after --on-commit ran, in one message ({"tcp_moved": CMD}, written whole only up
    to PIPE_BUF: a longer write may interleave with another thread's message, and the guard would
    drop both). Told at the commit, in the downtime: one message, never split."""
    if not command:
        return
    import select

    from ckpt.migrate.guard import line

    n = len(line({"tcp_moved": command}))
    if n > select.PIPE_BUF:
        over = n - select.PIPE_BUF
        raise CkptError(
            f"--on-abort is too long: {len(command.encode())} bytes, {over} more than its message to "
            f"the migration's guard takes ({select.PIPE_BUF} bytes as JSON, non-ASCII and quotes "
            "escaped); put the commands in a script and give its path"
        )


def check_connections(pid: int, enabled: bool, fds: Sequence[FdInfo] | None = None) -> None:
    """Before the first round: a process with established connections is refused at once without
    --tcp-established (not after the live rounds, by the final dump), naming them. `fds`: the
    process's, when the caller has read them (refuse.walk)."""
    if enabled:
        return
    from ckpt.migrate.source import MigrationFailed
    from ckpt.proc.fds import list_fds

    try:
        with TcpDump(False, keep=False, command="migrate") as probe:
            probe.collect(pid, list_fds(pid) if fds is None else fds)
    except CkptError as e:
        raise MigrationFailed(f"{e}; the process was not touched and runs on") from None


def check_hooks_env(pid: int, hooks: bool, fds: Sequence[FdInfo] | None = None) -> None:
    """Before the first round, with --on-commit/--on-abort: the process's established connections,
    as the hooks would get them in CKPT_TCP_CONNECTIONS, fit in one environment string
    (netmove.check_connections_env), or the migration is refused now, not at the commit. (Read
    without repair mode: the addresses only.)"""
    if not hooks:
        return
    from ckpt.migrate.netmove import check_connections_env
    from ckpt.migrate.source import MigrationFailed
    from ckpt.proc.fds import list_fds
    from ckpt.proc.tcp import _ends, established

    pairs: list[str] = []
    for _, _, _, s in established(pid, list_fds(pid) if fds is None else fds):
        with s, contextlib.suppress(OSError):
            pairs.append(_ends(s, ">"))
    try:
        check_connections_env(pairs)
    except CkptError as e:
        raise MigrationFailed(f"{e}; the process was not touched and runs on") from None


def on_commit(handover: TcpHandover | None) -> Callable[[], None] | None:
    """What the committer does just before COMMIT goes out (the final dump has taken the
    connections by then)."""
    return handover.let_go if handover is not None else None
