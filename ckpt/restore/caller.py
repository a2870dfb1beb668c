"""A restore run by a `ckpt service` for its client (ckpt/service.py, ckpt/client.py): the restored
process is the client's child, as it is `ckpt restore`'s own in-process.

The restored process must be the child of the `ckpt` process its caller started, in that process's
group and session (a terminal's Ctrl-C reaches it; after --detach the caller's subreaper adopts it),
which no child of the service can make. So the client starts the helper itself (ckpt/stubelf.py:
the stub's clone3 with CLONE_PARENT makes it the client's child), passes a pidfd of it, and the
service's child seizes it and runs the ordinary restore into it. The two talk over a socketpair
("the channel", SOCK_SEQPACKET: one message each), the service's child asking:

    H<set_tid>   start a helper (with that pid, 0: any)  ->  h<clone3's result> [+ its pidfd] | e<why>
    L<pid>       the helper is the restored process now: never kill it
    W<pid>       wait for it: its status is the command's (restore/run.py wait_status's rules)
                 ->  w once the client's signal handlers stand in for it (then the child ends)
    R<why>       restore it yourself, in-process (a process tree: docs/service.md)

The service runs as root and seizes what it is given, so it takes only the stub its client just
started (check_given, check_seized): the answer was sent by the client itself (SCM_CREDENTIALS,
with the service's uid), the pidfd's process has the pid the client named, is the
client's child, has the service's uids and gids, nobody traces it, it runs the stub's program
(/proc/PID/exe is the stub's memfd) and sleeps (pause(), or is on its way there); once seized,
the pidfd's process has not gone (so the pid seized is still the pidfd's) and its code at the
stub's address is the stub's.
Anything else is refused with one line and left as it was (never killed, never kept traced).
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckpt.errors import RestoreError
from ckpt.stubelf import CODE, CODE_OFFSET, EXE_LINK, STUB_BASE

if TYPE_CHECKING:
    import socket
else:
    from ckpt.lightstd import socket  # (imported at its first use: an in-process restore never)


class RunHere(BaseException):  # (not an error: the client runs the command itself)
    """Raised where a served restore cannot be the client's own (a tree): nothing started yet."""


@dataclass
class _Served:
    client: int  # the client's pid: the `ckpt` process the restore stands for
    channel: socket.socket
    pidfds: dict[int, int] = field(default_factory=dict)  # helper pid -> the pidfd the client gave


_served: _Served | None = None


def serve_for(client: int, channel: socket.socket) -> None:
    """(the service's child) Restores here are the client's: its helpers, its pid."""
    global _served
    # SCM_CREDENTIALS on every message received: who sent the answer, as the kernel saw it (the
    # client might have handed its end to another process)
    channel.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    _served = _Served(client, channel)


def served() -> bool:
    return _served is not None


def pid() -> int:
    """The pid of the `ckpt` process the restore stands for: ours, or the served client's."""
    return _served.client if _served is not None else os.getpid()


def not_served(why: str) -> None:
    """A restore that the client must run itself (before anything of it started)."""
    if _served is not None:
        raise RunHere(why)


def _send(msg: bytes) -> None:
    assert _served is not None
    try:
        _served.channel.send(msg)
    except OSError as e:
        raise RestoreError(f"the client of the service went away ({e.strerror})") from None


def start_stub(set_tid: int) -> int:
    """The client runs the stub: clone3's result (the helper's pid, or -errno), checked."""
    assert _served is not None
    _send(b"H%d" % set_tid)
    fds = array.array("i")
    try:
        data, anc, _flags, _ = _served.channel.recvmsg(4096, socket.CMSG_SPACE(4 * 4) + socket.CMSG_SPACE(12))
    except OSError as e:
        raise RestoreError(f"the client of the service went away ({e.strerror})") from None
    sender = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % 4])
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
            sender = struct.unpack("3i", payload[:12])
    try:
        if not data:
            raise RestoreError("the client of the service went away as the restore helper started")
        if sender is None or sender[0] != _served.client or sender[1] != os.geteuid():
            raise RestoreError(
                f"the restore helper's start was answered by pid {sender[0] if sender else '?'}, "
                f"not the client ({_served.client})"
            )
        if data[:1] == b"e":
            raise RestoreError(data[1:].decode(errors="replace"))
        try:
            result = int(data[1:]) if data[:1] == b"h" else None
        except ValueError:
            result = None
        if result is None or (result > 0) != (len(fds) == 1):
            raise RestoreError("the client of the service answered the restore helper's start wrongly")
        if result <= 0:
            return result
        check_given(fds[0], result)
        _served.pidfds[result] = fds.pop()
        return result
    finally:
        for fd in fds:
            os.close(fd)


def _refuse(pid: int, why: str) -> RestoreError:
    return RestoreError(f"the restore helper the client gave (pid {pid}) is not one it just started: {why}")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", "rb") as f:
        text = f.read().decode("ascii", "replace")
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def check_given(pidfd: int, pid: int) -> None:
    """The process of `pidfd` is the stub's child the client just started (module docstring)."""
    assert _served is not None
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            info = {k: v.strip() for k, _, v in (ln.partition(b":") for ln in f.read().splitlines())}
    except OSError as e:
        raise _refuse(pid, f"its descriptor: {e.strerror}") from None
    if info.get(b"Pid") != str(pid).encode():
        raise _refuse(pid, "the descriptor passed is not a pidfd of that process")
    try:
        st = _status(pid)
        exe = os.readlink(f"/proc/{pid}/exe")
        me = _status(os.getpid())
        signal.pidfd_send_signal(pidfd, 0)  # still the pidfd's process: what was read was its
    except OSError as e:
        raise _refuse(pid, e.strerror or str(e)) from None
    if st.get("PPid") != str(_served.client):
        raise _refuse(pid, f"its parent is {st.get('PPid')}, not the client ({_served.client})")
    for k in ("Uid", "Gid"):
        if st.get(k) != me.get(k):
            raise _refuse(pid, f"its {k} line is {st.get(k)!r}, not the service's {me.get(k)!r}")
    if st.get("TracerPid") != "0":
        raise _refuse(pid, f"it is traced by {st.get('TracerPid')}")
    if exe != EXE_LINK:
        raise _refuse(pid, f"it runs {exe}, not the restore helper's program")
    if st.get("State", "")[:1] not in ("S", "R"):  # (R: not yet in its pause())
        raise _refuse(pid, f"its state is {st.get('State')}, not the helper's wait")


def check_seized(pid: int) -> None:
    """After the seize: the pid seized is still the checked pidfd's process, running the stub."""
    assert _served is not None
    pidfd = _served.pidfds.get(pid)
    if pidfd is None:
        raise _refuse(pid, "not the helper the client gave")
    try:
        signal.pidfd_send_signal(pidfd, 0)  # not reaped: its pid was not given to another since
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            code = os.pread(fd, len(CODE), STUB_BASE + CODE_OFFSET)
        finally:
            os.close(fd)
    except OSError as e:
        raise _refuse(pid, e.strerror or str(e)) from None
    if code != CODE:
        raise _refuse(pid, "its code is not the restore helper's")


def restored(pid: int) -> None:
    """The helper `pid` is the restored process now: the client must never kill it."""
    if _served is not None:
        _send(b"L%d" % pid)
        with contextlib.suppress(OSError):
            os.close(_served.pidfds.pop(pid, -1))


def wait_by_client(pid: int) -> int:
    """The client waits for its child `pid` (as restore/run.py wait_status does) and ends with its
    status; our own exit status is then the service's log's only."""
    _send(b"W%d" % pid)
    assert _served is not None
    with contextlib.suppress(OSError):
        _served.channel.recv(1)  # its handlers in place (or it went away): our command has ended
    return 0
