"""`ckpt service --socket PATH`: a resident fork server that runs ckpt commands for ckpt.client.

Every `ckpt` command starts Python and imports ~110 modules of ckpt and its libraries (numpy, zstd,
rich) before it does anything: 0.1-0.2 s, most of a small dump's wall and the gap to CRIU at 256 MiB.
CRIU answers callers that run it often with `criu service`; this is ckpt's. The service imports what
the served commands need once, starts no thread, and waits in one selector on its listening socket,
each client's connection and each child's pidfd (woken by those events only). Per request a child
(the spare, forked ahead of it while the service was idle: _fork_spare; else forked then) becomes
the command, as `ckpt ARGS` started by the client would have been: the client's
argv, environment, working directory, umask, signal mask and ignored signals, its stdin, stdout and
stderr (passed as descriptors), and Python's standard streams made again over them; the child runs
ckpt.cli's main() and exits with its status, which the service sends back (or the signal that ended
it); the status comes first, once the command is over and before the child's exit (_report).
SIGINT, SIGTERM and SIGHUP that the client gets are passed on to the child (pidfd_send_signal); a
client that disappears (SIGKILL) takes its command with it, as it would have in-process.

Who may ask: the socket is 0600 in a directory 0700, both owned by the service's euid, and every
request's SO_PEERCRED uid must be that euid (else it is refused with one line). A command runs in the
child only where it means the same thing as in the client; otherwise the answer is "run it yourself"
and the client runs it in-process (the same result, only slower). The child is the same as the
client's in-process command when (checked per request, `differs()`): the same namespaces (mnt, net,
pid, ipc, uts, user, cgroup) and root directory; the same credentials (uids, gids, groups,
capabilities, no_new_privs, seccomp, LSM label) and resource limits; the same Python (executable,
flags, the ckpt package, whose source has not changed since the service imported it) and the
variables that Python reads at its start (PYTHON*, LANG, LC_*); and a command that does not depend
on its caller's own process (`served()`): serve and migrate, and a dump of the client itself or of
an ancestor of it or of the service, run in-process. A restore is served with the client's help:
the restored process must be the client's child, in its process group and session, so the client
starts the helper and the child restores into it (ckpt/restore/caller.py; --pidns, --inherit-fd
and process trees run in-process).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import resource
import selectors
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckpt.client import FORWARDED, MAX_FDS, PROTOCOL, python_flags
from ckpt.errors import CkptError
from ckpt.warmbuf import WarmStore, in_child

# Commands served in the child: each depends only on its arguments, files and the target process;
# and restore, whose process the client makes its own child (restore/caller.py).
SERVED = frozenset({"check", "dump", "untrack", "show", "read", "verify", "merge", "diff", "restore"})
# What the commands import, once here (the rest of what they import comes lazily, in the child).
PRELOAD = (
    "ckpt.cli", "ckpt.api", "ckpt.dump", "ckpt.image", "ckpt.prefault", "ckpt.show", "ckpt.diff",
    "ckpt.diffview", "ckpt.check", "ckpt.mergetree", "ckpt.teach.commands", "rich.console", "rich.table",
    "rich.progress", "ckpt.restore.run", "ckpt.restore.pipes", "ckpt.readahead",
)  # fmt: skip
NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup")
# /proc/PID/status lines that are the process's credentials and confinement.
CRED_FIELDS = (
    "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
)  # fmt: skip
SO_PEERPIDFD = 77  # Linux >= 6.5: a pidfd of the peer, so that its /proc reads are checked as its own
MAX_REQUEST = 4 << 20


class ServiceError(CkptError):
    pass


@dataclass
class Request:
    umask: int
    sig_ignored: int
    sig_blocked: int
    executable: str  # sys.executable, and ckpt/__init__.py's path, as the client has them (unresolved)
    package: str
    flags: str
    argv0: bytes
    fd_numbers: list[int]
    argv: list[bytes]
    env: dict[bytes, bytes]

    @classmethod
    def parse(cls, data: bytes) -> Request:
        f = data.split(b"\0")
        if len(f) < 10 or f[0] != PROTOCOL:
            raise ValueError("not a request of this ckpt (protocol)")
        numbers = [int(x) for x in f[8].split(b",") if x]
        if any(not 0 <= x < 1 << 30 for x in numbers):
            raise ValueError("descriptor numbers")
        n = int(f[9])
        if not 0 <= n <= len(f) - 10:
            raise ValueError("argument count")
        env: dict[bytes, bytes] = {}
        for kv in f[10 + n :]:
            k, eq, v = kv.partition(b"=")
            if eq:
                env.setdefault(k, v)
        return cls(
            int(f[1], 8), int(f[2], 16), int(f[3], 16), os.fsdecode(f[4]), os.fsdecode(f[5]),
            f[6].decode(), f[7], numbers, f[10 : 10 + n], env,
        )  # fmt: skip


@dataclass
class Conn:
    sock: socket.socket
    peer_pid: int
    peer_pidfd: int | None
    child: int = 0
    child_pidfd: int = -1
    number: int = 0  # the request's, in the service's log
    gone: bool = False  # the client hung up while its command ran
    refusal: str = ""  # another user's: the line it gets
    argv: list[str] = field(default_factory=list)
    full_dump: bool = False  # a full dump's: it may be lent the warm buffer (ckpt/warmbuf.py)
    warm: int = -1  # the warm buffer's bytes allocated when it was lent to this child; -1: not lent
    channel: socket.socket | None = None  # a served restore's: the child's end (restore/caller.py)
    cmd: str = ""
    here: str = ""  # a served restore the client ran itself after all: why (restore/caller.py)
    spare: bool = False  # run by the spare (forked before the request), not a child forked for it
    # The child's report of its status once its command is over (before its exit: _report), and
    # whether the client was told it so.
    report: socket.socket | None = None
    told: bytes = b""


@dataclass
class Spare:
    """A child forked ahead of the next request (Service._fork_spare), waiting for it on ``sock``."""

    pid: int
    pidfd: int
    sock: socket.socket  # the service's end


SPARE_COMM = b"ckpt-spare"  # a spare's name (comm) until it takes a request


def _set_comm(name: bytes) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME


def _rights(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried (recvmsg's ancillary data)."""
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])
    return fds


def _status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status", "rb") as f:
        text = f.read().decode("ascii", "replace")
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _identity(pid: int | str) -> dict[str, object]:
    """What the service and the client must share for a command to mean the same in both."""
    out: dict[str, object] = {}
    for ns in NAMESPACES:
        out[f"{ns} namespace"] = os.stat(f"/proc/{pid}/ns/{ns}").st_ino
    root = os.stat(f"/proc/{pid}/root/")
    out["root directory"] = (root.st_dev, root.st_ino)
    st = _status(pid)
    for k in CRED_FIELDS:
        out[k] = st.get(k)
    out["resource limits"] = _read(f"/proc/{pid}/limits")
    out["LSM label"] = _read(f"/proc/{pid}/attr/current")
    return out


def _may_seize_others() -> bool:
    """Can this process seize a process that is not its descendant (a client's restore helper)?
    Yama's ptrace_scope 1 and 2 want CAP_SYS_PTRACE for it, 3 forbids it."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
    except (OSError, ValueError):
        return True  # no Yama: the ordinary rules (same uid, or CAP_SYS_PTRACE)
    if scope == 0:
        return True
    return scope < 3 and bool(int(_status("self").get("CapEff", "0"), 16) >> 19 & 1)


def _ancestors(pid: int) -> set[int]:
    """pid and its ancestors (in our pid namespace, which is the client's)."""
    out = set()
    while pid > 0 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _names_caller(arg: bytes, pid: int) -> bool:
    """A path through the caller's own /proc entry (its fds are passed at their numbers, so
    /dev/fd/N and /proc/self/fd/N name the same files in the child; nothing else there does)."""
    for own in (b"/proc/self/", b"/proc/thread-self/", b"/proc/%d/" % pid):
        i = arg.find(own)
        if i >= 0 and not arg[i + len(own) :].startswith(b"fd/"):
            return True
    return False


def _startup_env(env: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The variables read as a process starts: by Python (encodings, locale, flags) and by the
    dynamic loader and the C library (LD_PRELOAD, LD_LIBRARY_PATH, GLIBC_TUNABLES, MALLOC_*), which a
    forked child never reads again: fixed in the service."""
    start = (b"PYTHON", b"LC_", b"LD_", b"MALLOC_")
    names = (b"LANG", b"LANGUAGE", b"GLIBC_TUNABLES")
    return {k: v for k, v in env.items() if k.startswith(start) or k in names}


class Service:
    def __init__(
        self,
        path: str,
        emit: Callable[[dict[str, object]], None],
        warm: WarmStore | None = None,
        spares: bool = True,
    ) -> None:
        self.path = os.path.abspath(path)
        self.warm = warm or WarmStore()
        self.emit = emit
        self.euid = os.geteuid()
        self.pid = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.children: dict[int, Conn] = {}  # by pidfd
        self.stopping = False
        self.requests = 0
        self.rehearsals = 0  # (preload's: with none, no served dump makes its pages its own either)
        self.me = _identity("self")
        self.env = _startup_env(dict(os.environb))
        self.flags = python_flags()
        self.executable = os.path.realpath(sys.executable)
        self.package = os.path.dirname(os.path.realpath(__file__))
        self.sources: dict[str, tuple[int, int]] = {}
        self.listener: socket.socket | None = None
        self.inode = 0
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.spares = spares  # fork each request's child ahead of it (_fork_spare)
        self.spare: Spare | None = None
        with open("/proc/self/comm", "rb") as f:
            self.comm = f.read().rstrip(b"\n")

    # -- setting up ------------------------------------------------------------------------------
    def bind(self) -> None:
        d = os.path.dirname(self.path)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ServiceError(f"cannot make the socket's directory {d}: {e.strerror}") from None
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != self.euid or st.st_mode & 0o077:
            raise ServiceError(
                f"the socket's directory {d} must be a directory owned by uid {self.euid} with mode 0700 "
                f"(it is {stat.filemode(st.st_mode)}, uid {st.st_uid})"
            )
        if os.path.lexists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(self.path)
            except ConnectionRefusedError:
                os.unlink(self.path)  # a service that died left it
            except OSError as e:
                raise ServiceError(
                    f"{self.path} exists and is not a service's socket ({e.strerror})"
                ) from None
            else:
                raise ServiceError(f"a service already listens on {self.path}")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600, never wider for a moment
        try:
            s.bind(self.path)
        except OSError as e:
            raise ServiceError(f"cannot listen on {self.path}: {e.strerror}") from None
        finally:
            os.umask(old)
        self.inode = os.lstat(self.path).st_ino
        os.chmod(self.path, 0o600)
        s.listen(64)
        s.setblocking(False)
        self.listener = s

    def preload(self, rehearsals: int = 0) -> dict[str, object]:
        """The commands' imports, then ``rehearsals`` incremental dumps of a helper (forkwarm.py)
        after a full one; what the rehearsal did (or why it did not), for the listening line."""
        # ckpt uses no linear algebra; one OpenBLAS thread means none started (a fork server must
        # have no other thread: fork() copies only the caller).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        import importlib

        for m in PRELOAD:
            importlib.import_module(m)
        from ckpt.cli import _WIDTH, parser

        # The parser every request is parsed with (served()), its children's too, made now, and the
        # commands served most completed (a command's parser adds its arguments on first use).
        for argv in (["dump", "--pid", "1", "-D", "."], ["restore", "layer"]):
            with contextlib.suppress(SystemExit):
                parser().parse_args(argv)
        _WIDTH.clear()
        from ckpt.proc.props import guard_flag

        guard_flag()  # (the kernel's answer, probed once here: every child inherits it)
        rehearsal: dict[str, object] = {"dumps": 0}
        self.rehearsals = rehearsals
        if rehearsals > 0:
            from ckpt import forkwarm
            from ckpt.ptrace.sigchld import blocked

            try:
                with blocked():  # (as the CLI does before a dump starts its threads)
                    # (a stop asked meanwhile ends it at its next step: serve()'s handlers)
                    rehearsal = forkwarm.rehearse(rehearsals, stop=lambda: self.stopping)
            except forkwarm.Stopped:
                rehearsal = {"dumps": 0, "stopped": True}
            except (CkptError, OSError) as e:
                rehearsal = {"dumps": 0, "failed": str(e)}
        import gc

        from ckpt.proc import grab

        grab.end_workers()  # (a rehearsal's dumps made them, a failed one too: threads of C's own)
        gc.collect()
        gc.freeze()  # what the imports made, out of every child's collections (and their copies)
        tasks = os.listdir("/proc/self/task")
        if len(tasks) != 1:
            raise ServiceError(f"the imports started {len(tasks) - 1} thread(s); a fork server cannot run")
        for name, mod in list(sys.modules.items()):
            f = getattr(mod, "__file__", None)
            if (name == "ckpt" or name.startswith("ckpt.")) and f:
                with contextlib.suppress(OSError):
                    st = os.stat(f)
                    self.sources[f] = (st.st_mtime_ns, st.st_size)
        return rehearsal

    def stale(self) -> bool:
        """Has ckpt's source changed since it was imported here (an upgrade, an edit)?"""
        for f, was in self.sources.items():
            try:
                st = os.stat(f)
            except OSError:
                return True
            if (st.st_mtime_ns, st.st_size) != was:
                return True
        return False

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        assert self.listener is not None
        self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
        self.sel.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        old = {s: signal.signal(s, self._on_stop) for s in stops}
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        try:
            while not (self.stopping and not self.conns):
                if self.spares and self.spare is None and not (self.stopping or self.conns or self.children):
                    self._fork_spare()
                for key, _ in self.sel.select(None if self.stopping else self.warm.timeout()):
                    if self.sel.get_map().get(key.fd) is not key:
                        # Unregistered by an earlier event of this wakeup: a child's end closes its
                        # connection and report socket, and its client's hang-up (it left with its
                        # early status) or its report may have come in the same wakeup.
                        continue
                    what, conn = key.data
                    if what == "listen":
                        self._accept()
                    elif what == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self.wake_r, 512)
                    elif what == "conn":
                        self._readable(conn)
                    elif what == "child":
                        self._child_done(conn)
                    elif what == "report":
                        self._reported(conn)
                    elif what == "spare":
                        self._dismiss_spare()  # (it died idle: another is forked when all is quiet)
                if not self.stopping and (freed := self.warm.step()) is not None:
                    self.emit(freed)  # (the warm buffer idle for its time: ckpt/warmbuf.py)
                if self.stopping and self.listener is not None:
                    self._stop_listening()
                    self.emit({"stopping": self.path, "running": len(self.children)})
                    for c in [c for c in self.conns.values() if not c.child]:
                        self._close(c)  # (its client runs the command itself)
                if self.stopping:
                    self._dismiss_spare()
        finally:
            self._dismiss_spare()
            signal.set_wakeup_fd(-1)
            for s, h in old.items():
                signal.signal(s, h)
            self._stop_listening()

    def _on_stop(self, signum: int, frame: object) -> None:
        # Stop taking requests; the commands running finish and their clients get their statuses.
        self.stopping = True

    def _stop_listening(self) -> None:
        if self.listener is None:
            return
        with contextlib.suppress(KeyError):  # (not yet registered: stopped before it listened)
            self.sel.unregister(self.listener)
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:  # ours, not one that replaced it
                os.unlink(self.path)
        self.listener.close()
        self.listener = None

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        refusal = ""
        if uid != self.euid:
            # Said once its request is read: a socket closed with a request unread would reset the
            # client's connection (ECONNRESET) before it could read the answer.
            refusal = f"ckpt: service {self.path}: refused: uid {uid} is not the service's ({self.euid})"
        pidfd: int | None
        try:
            pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        except OSError:
            pidfd = None
        sock.setblocking(False)
        c = Conn(sock, pid, pidfd, refusal=refusal)
        self.conns[sock.fileno()] = c
        self.sel.register(sock, selectors.EVENT_READ, ("conn", c))

    def _close(self, c: Conn) -> None:
        if not c.gone:
            self.sel.unregister(c.sock)
        self.conns.pop(c.sock.fileno(), None)
        c.sock.close()
        if c.peer_pidfd is not None:
            os.close(c.peer_pidfd)
            c.peer_pidfd = None

    def _readable(self, c: Conn) -> None:
        try:
            data, anc, flags, _ = c.sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * (MAX_FDS + 1)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc, flags = b"", [], 0
        fds = _rights(anc)
        try:
            if c.child:
                if not data:  # the client is gone: as if its own process had been killed
                    if not c.told:  # (told: it left with its command's status, as it should)
                        with contextlib.suppress(OSError):
                            signal.pidfd_send_signal(c.child_pidfd, signal.SIGKILL)
                    self.sel.unregister(c.sock)
                    c.gone = True
                    return
                if data[:1] == b"S":
                    with contextlib.suppress(OSError, ValueError):
                        signal.pidfd_send_signal(c.child_pidfd, int(data[1:]))
                elif data[:1] == b"R":  # the client restores it itself after all (caller.py)
                    c.here = data[1:].decode(errors="replace")
                return
            if not data:
                self._close(c)
                return
            if c.refusal:
                self.requests += 1
                c.number = self.requests
                self._answer(c, b"N", c.refusal, "refused", None)
                return
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                self.requests += 1
                c.number = self.requests
                self._answer(c, b"R", "the request or its descriptors did not fit", "in-process", None)
                return
            self._request(c, data, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _answer(self, c: Conn, kind: bytes, text: str, outcome: str, req: Request | None) -> None:
        self.emit({"request": c.number, "peer": c.peer_pid, "outcome": outcome, "why": text,
                   "argv": [os.fsdecode(a) for a in req.argv] if req else []})  # fmt: skip
        with contextlib.suppress(OSError):
            c.sock.send(kind + text.encode())
        self._close(c)

    def _request(self, c: Conn, data: bytes, fds: list[int]) -> None:
        self.requests += 1
        c.number = self.requests
        try:
            req = Request.parse(data)
        except (ValueError, UnicodeDecodeError) as e:
            self._answer(c, b"R", f"unreadable request: {e}", "in-process", None)
            return
        if len(fds) != 1 + len(req.fd_numbers) or len(set(req.fd_numbers)) != len(req.fd_numbers):
            self._answer(c, b"R", "the descriptors passed are not those the request names", "in-process", req)
            return
        why = self.differs(c, req)
        if why is None and self.stale():
            line = f"ckpt: service {self.path}: ckpt changed since the service started"
            self._answer(c, b"N", line, "stale", req)
            return
        if why is None:
            why = self.served(c, req)
        # The child moves the passed descriptors above every number first (_setup_child): that
        # needs room under the descriptor limit (the client's too, differs() saw to it), and one
        # more for a restore's channel; a client with one near its limit (`ckpt show
        # /dev/fd/1023`) runs it itself.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        room = 2 if c.cmd == "restore" else 1
        if why is None and max([*req.fd_numbers, *fds, 2]) + room + len(fds) > soft:
            why = "a descriptor too near the descriptor limit to be moved"
        if why is not None:
            self._answer(c, b"R", why, "in-process", req)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        # The signals the client passes on stay blocked in the child until its command's handlers
        # are in place (_run_cli): one sent as it starts would otherwise meet this service's own
        # handler (_on_stop) in the child and be lost, and the command would run on.
        ours: socket.socket | None = None
        if c.cmd == "restore":
            # The channel to the client that starts the restore's helper (restore/caller.py).
            ours, c.channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        warm = self.warm.lend() if c.full_dump else -1
        # (what it holds as it is lent: read before its process can run, which a spare does at once)
        allocated = self.warm.allocated() if warm >= 0 else -1
        handed = self._hand_to_spare(c, data, fds, warm)
        report: socket.socket | None
        if handed is not None:
            pid, pidfd, report = handed
            c.spare = True
        else:
            report = theirs = None
            if c.cmd != "restore":  # (a restore ends by its own protocol: restore/caller.py)
                with contextlib.suppress(OSError):  # (none: its status comes with its exit)
                    report, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
            pid = os.fork()
            if pid == 0:
                if ours is not None:
                    ours.close()
                if report is not None:
                    report.close()
                self._become(req, fds, c, warm >= 0, report=theirs)  # never returns
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if theirs is not None:
                theirs.close()
            pidfd = os.pidfd_open(pid)
        if c.cmd == "restore" and report is not None:
            report.close()  # (the spare's: it closes its end too)
        elif report is not None:
            c.report = report
            self.sel.register(report, selectors.EVENT_READ, ("report", c))
        if warm >= 0:
            self.warm.lent(pid)
            c.warm = allocated
        c.child, c.child_pidfd = pid, pidfd
        c.argv = [os.fsdecode(a) for a in req.argv]
        self.children[c.child_pidfd] = c
        self.sel.register(c.child_pidfd, selectors.EVENT_READ, ("child", c))
        with contextlib.suppress(OSError):
            if ours is None:
                c.sock.send(b"P%d" % pid)
            else:
                passed = struct.pack("i", ours.fileno())
                c.sock.sendmsg([b"P%d" % pid], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)])
        if ours is not None:
            ours.close()
            assert c.channel is not None
            c.channel.close()
            c.channel = None

    def differs(self, c: Conn, req: Request) -> str | None:
        """Why the child would not be the client's command as it would run in-process; None: it is."""
        python, package = os.path.realpath(req.executable), os.path.dirname(os.path.realpath(req.package))
        if python != self.executable or package != self.package or req.flags != self.flags:
            return "another Python or another ckpt"
        if _startup_env(req.env) != self.env:
            return "other PYTHON*/locale/loader variables"
        try:
            peer = _identity(c.peer_pid)
            if c.peer_pidfd is not None:
                signal.pidfd_send_signal(c.peer_pidfd, 0)  # still the process those files were of
        except OSError as e:
            return f"the client's /proc: {e.strerror}"
        for k, v in self.me.items():
            if peer[k] != v:
                return f"another {k}"
        if peer["Seccomp"] not in (None, "0"):
            # The status says a filter is there, not which: two different filters compare equal
            # (a client confined by its own would have its command run under the service's).
            return "a seccomp filter (which cannot be compared with the service's)"
        return None

    def served(self, c: Conn, req: Request) -> str | None:
        """None if the command is one the child runs as the client would; else why not."""
        from ckpt.cli import _WIDTH, parser

        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                args = parser().parse_args([os.fsdecode(a) for a in req.argv])
        except SystemExit:
            return "the arguments do not parse (the error is the in-process command's)"
        finally:
            _WIDTH.clear()  # (the help width is the client's terminal's, found in the child)
        cmd = getattr(args, "cmd", None)
        c.cmd = str(cmd)
        if any(_names_caller(a, c.peer_pid) for a in req.argv):
            return "an argument names the calling process through /proc"
        if cmd not in SERVED:
            return f"{cmd} depends on its caller's process"
        if cmd in ("dump", "untrack") and args.pid in (_ancestors(c.peer_pid) | _ancestors(os.getpid())):
            return "a dump of the client, the service or an ancestor of either"
        c.full_dump = cmd == "dump" and not (args.incremental or args.pre_dump)
        if cmd == "restore":
            # --pidns: the namespace's init is forked by a helper of ckpt's; --inherit-fd: pipes
            # taken from ckpt's own descriptors. Both run in-process (so does a tree, found by the
            # child once it reads the layer: restore/caller.py RunHere).
            if args.pidns or args.inherit_fd:
                return "restore --pidns or --inherit-fd depends on its caller's process"
            if not _may_seize_others():
                return "restore: the service may not ptrace its client's helper (Yama ptrace_scope)"
        return None

    # -- the spare: the next request's child, forked while the service is idle ---------------------
    def _fork_spare(self) -> None:
        """Fork the next request's child now, while nothing runs: its fork, and the faults that make
        the service's pages its own (forkwarm.own_pages), no longer lie between a request and its
        command (~10 ms of each served command here, and the copies a full dump's freeze took)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        _set_comm(SPARE_COMM)  # (inherited: named so from its first instant, for ps and the tests)
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            ours.close()
            self._spare_main(theirs)  # never returns
        _set_comm(self.comm)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        if pid < 0:
            ours.close()
            self.spares = False  # (no process to be had: each request forks its own, as before)
            return
        pidfd = os.pidfd_open(pid)
        self.spare = Spare(pid, pidfd, ours)
        self.sel.register(pidfd, selectors.EVENT_READ, ("spare", None))

    def _dismiss_spare(self) -> None:
        """The spare killed and reaped (the service stops, or it died while it waited)."""
        sp, self.spare = self.spare, None
        if sp is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sp.pidfd)
        sp.sock.close()
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(sp.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(sp.pid, 0)
        os.close(sp.pidfd)

    def _hand_to_spare(
        self, c: Conn, data: bytes, fds: list[int], warm: int
    ) -> tuple[int, int, socket.socket] | None:
        """The request given to the spare, which becomes its command's process: (pid, pidfd, the
        socket it reports its status on, the one it got the request on); None where there is no
        spare, or it is gone (the caller forks)."""
        sp, self.spare = self.spare, None
        if sp is None:
            return None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sp.pidfd)
        extra = ([warm] if warm >= 0 else []) + ([c.channel.fileno()] if c.channel is not None else [])
        head = b"%s\0%d\0%d\0%d\0" % (c.cmd.encode(), c.peer_pid, warm >= 0, c.channel is not None)
        passed = [*fds, *extra]
        try:
            sp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(1 << 16, 2 * (len(head) + len(data))))
            rights = struct.pack(f"{len(passed)}i", *passed)
            sp.sock.sendmsg([head + data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        except OSError:
            self.spare = sp
            self._dismiss_spare()
            return None
        return sp.pid, sp.pidfd, sp.sock

    def _spare_main(self, sock: socket.socket) -> None:
        """In the spare: its pages made its own while it waits, then the request, then _become."""
        code = 70
        try:
            self._die_with_service()
            if self.rehearsals:
                from ckpt import forkwarm

                forkwarm.own_pages()  # (stopped as any freeze begins, or below for other commands)
            space = socket.CMSG_SPACE(4 * (MAX_FDS + 3))
            data, anc, flags, _ = sock.recvmsg(MAX_REQUEST + 4096, space)
            got = _rights(anc)
            if not data:
                os._exit(0)  # dismissed: the service closed its end
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                os._exit(70)  # (never: sized for the largest; the client's status says "internal")
            _set_comm(self.comm)
            cmd, peer, lent, chan, rest = data.split(b"\0", 4)
            channel = socket.socket(fileno=got.pop()) if chan == b"1" else None
            if self.warm.fd >= 0:
                os.close(self.warm.fd)  # (the service's, inherited; the lent one comes with the request)
                self.warm.fd = -1
            if lent == b"1":
                self.warm.fd = got.pop()
            c = Conn(sock, int(peer), None, cmd=cmd.decode(), channel=channel)
            self._become(Request.parse(rest), got, c, lent == b"1", spare=True, report=sock)
        except BaseException:
            with contextlib.suppress(BaseException):
                import traceback

                traceback.print_exc()
        finally:
            os._exit(code)

    def _child_done(self, c: Conn) -> None:
        self.sel.unregister(c.child_pidfd)
        self.children.pop(c.child_pidfd, None)
        _, status = os.waitpid(c.child, 0)
        os.close(c.child_pidfd)
        self.warm.returned(c.child)
        if os.WIFSIGNALED(status):
            msg = b"K%d" % os.WTERMSIG(status)
        else:
            msg = b"X%d" % os.waitstatus_to_exitcode(status)
        while c.cmd == "restore" and not c.gone and not c.here:  # (an R sent before the child ended)
            try:
                data = c.sock.recv(4096, socket.MSG_DONTWAIT)
            except OSError:
                break
            if data[:1] == b"R":
                c.here = data[1:].decode(errors="replace")
            elif not data:
                break
        if c.here:
            self.emit({"request": c.number, "peer": c.peer_pid, "outcome": "in-process", "why": c.here,
                       "argv": c.argv})  # fmt: skip
        else:
            warm = {"warm": c.warm} if c.warm >= 0 else {}  # (the bytes of it allocated when lent)
            # "early": the client had its status before the child's exit (_report); "told" only
            # where that status is not the exit's (a signal that came in between).
            told: dict[str, object] = {"spare": c.spare, "early": bool(c.told)}
            if c.told not in (b"", msg):
                told["told"] = c.told.decode()
            self.emit({"request": c.number, "peer": c.peer_pid, "pid": c.child, "argv": c.argv,
                       "outcome": "ran", "status": msg.decode(), **told, **warm})  # fmt: skip
        if not c.gone and not c.told:
            with contextlib.suppress(OSError):
                c.sock.send(msg)
        self._drop_report(c)
        self._close(c)

    def _reported(self, c: Conn) -> None:
        """The child's status, sent by it once its command is over and before its exit (_report):
        passed on to the client at once. Its exit, which unmaps what the command mapped and closes
        what it held (4-6 ms here, for a process forked from the service), then happens while the
        client is already gone; what the client could still notice of the child (its
        descriptors, its directory) it had given up before reporting."""
        assert c.report is not None
        try:
            data = c.report.recv(64, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._drop_report(c)
        if data[:1] == b"X" and data[1:].isdigit() and not c.gone:
            with contextlib.suppress(OSError):
                c.sock.send(data)
            c.told = data

    def _drop_report(self, c: Conn) -> None:
        if c.report is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(c.report)
            c.report.close()
            c.report = None

    # -- in the child ----------------------------------------------------------------------------
    def _become(
        self, req: Request, fds: list[int], c: Conn, warm: bool, spare: bool = False,
        report: socket.socket | None = None,
    ) -> None:  # fmt: skip
        code = 70
        try:
            if report is not None and c.cmd == "restore":
                report.close()  # (the service reads no report of a restore's)
                report = None
            channel, report = self._setup_child(req, fds, c.channel, warm, report)
            if self.rehearsals:
                from ckpt import forkwarm

                if not spare and c.cmd == "dump":
                    forkwarm.own_pages()  # (stopped as any freeze begins: forkwarm.ready())
                elif spare and c.cmd != "dump":
                    forkwarm.ready()  # (a spare's, begun as it waited: no freeze here to use them)
            if channel is not None:
                from ckpt.restore import caller

                caller.serve_for(c.peer_pid, channel)
            code = _run_cli([os.fsdecode(a) for a in req.argv], req.sig_blocked, channel)
            if report is not None:
                _report(report, code)
        except BaseException:
            with contextlib.suppress(BaseException):
                import traceback

                traceback.print_exc()
        finally:
            os._exit(code)

    def _die_with_service(self) -> None:
        """In a child: a service killed (SIGKILL, OOM) takes its commands with it (its client, which
        says so and exits 70, must not leave behind a command that goes on writing to its files),
        and the service's wakeup fd is not the child's."""
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != self.pid:
            os._exit(70)  # (it died before the prctl)
        signal.set_wakeup_fd(-1)

    def _setup_child(
        self,
        req: Request,
        fds: list[int],
        channel: socket.socket | None,
        warm: bool,
        report: socket.socket | None = None,
    ) -> tuple[socket.socket | None, socket.socket | None]:
        """The child made the client's command's process; its channel and report socket, moved
        above the numbers the client's descriptors take (None: none, or no number left for it)."""
        self._die_with_service()  # (a spare did at its start; once more costs nothing)
        keep = set(fds)
        own = [self.wake_r, self.wake_w, self.sel.fileno()]
        own += [c.sock.fileno() for c in self.conns.values()]
        own += [c.peer_pidfd for c in self.conns.values() if c.peer_pidfd is not None]
        own += [c.report.fileno() for c in self.conns.values() if c.report is not None]  # (others')
        own += list(self.children)
        if self.listener is not None:
            own.append(self.listener.fileno())
        for fd in own:
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        # Each passed descriptor to the number it had in the client: first all of them (the
        # working directory's too) above every number in use, as a received one may sit on
        # another's number, then into place.
        top = max([*req.fd_numbers, *fds, 2]) + 1
        kept: socket.socket | None = None
        if channel is not None:  # (above every number the client's descriptors take, too)
            kept = socket.socket(fileno=fcntl.fcntl(channel.fileno(), fcntl.F_DUPFD_CLOEXEC, top))
            channel.close()
        # The warm buffer's: closed, or kept above the numbers the client's take here and below
        # (a full dump's; a restore's channel is never beside it)
        in_child(self.warm, warm, top + len(fds))
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in fds]
        for fd in fds:
            os.close(fd)
        high_report: socket.socket | None = None
        if report is not None:  # (likewise, with what is left: none under the limit, the status
            with contextlib.suppress(OSError):  # goes with the exit, as without a report)
                high_report = socket.socket(fileno=fcntl.fcntl(report.fileno(), fcntl.F_DUPFD_CLOEXEC, top))
            report.close()
        cwd = high[0]
        for fd, want in zip(high[1:], req.fd_numbers, strict=True):
            os.dup2(fd, want, inheritable=True)
            os.close(fd)
        # What the service itself had open and the client does not pass (its own 0, 1, 2 among
        # them) is not the command's; close-on-exec ones are the imported modules' own.
        ours = {s.fileno() for s in (kept, high_report) if s is not None}
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd != cwd and fd not in req.fd_numbers and fd not in ours:
                with contextlib.suppress(OSError):
                    if os.get_inheritable(fd) or fd < 3:
                        os.close(fd)
        os.fchdir(cwd)
        os.close(cwd)
        os.umask(req.umask)
        os.environb.clear()
        os.environb.update(req.env)
        import time

        time.tzset()  # TZ: the C library's zone as a Python started with this environment has it
        sys.argv = [os.fsdecode(req.argv0), *map(os.fsdecode, req.argv)]
        _python_signals(req.sig_ignored, req.sig_blocked)
        _std_streams()
        return kept, high_report


def _report(sock: socket.socket, code: int) -> None:
    """The command is over (its output flushed, its exit handlers run): its status to the service,
    which tells the client at once, before this process's exit (Service._reported). What the
    client could notice of this process goes first: every descriptor (the client's stdout, which
    a `$(ckpt ...)` reads to its end; a layer's files and locks) and the working directory (the
    client's, which a umount would find busy). No signal is taken in between: the status sent is
    the exit's."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
    with contextlib.suppress(OSError):
        os.chdir("/")
    # (the numbers open, not every number under the limit: without close_range, closerange
    # would try each of them, and a limit may be in the millions)
    top = max(map(int, os.listdir("/proc/self/fd")), default=0)
    fd = sock.fileno()
    os.closerange(0, fd)
    os.closerange(fd + 1, top + 1)
    with contextlib.suppress(OSError):
        sock.send(b"X%d" % code)


def _python_signals(ignored: int, blocked: int) -> None:
    """The dispositions a Python started by the client would have: what the client inherited as
    ignored stays ignored (Python's own SIGPIPE and SIGXFSZ among them), SIGINT raises
    KeyboardInterrupt, every other one is the default; the client's mask."""
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if ignored & (1 << (sig - 1)):
            h: object = signal.SIG_IGN
        elif sig == signal.SIGINT:
            h = signal.default_int_handler
        else:
            h = signal.SIG_DFL
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, h)  # type: ignore[arg-type]
    # (the forwarded ones stay blocked until the command starts: _run_cli)
    signal.pthread_sigmask(signal.SIG_SETMASK, _mask(blocked) | set(FORWARDED))


def _mask(blocked: int) -> set[int]:
    return {s for s in range(1, signal.NSIG) if blocked & (1 << (s - 1))}


def _std_streams() -> None:
    """sys.stdin, stdout and stderr over fds 0-2 as Python's start makes them (the encodings are
    the service's, which the same PYTHON*/locale variables made; the buffering is the new files')."""
    # -u or PYTHONUNBUFFERED (the same for the client, differs() saw to it): write-through streams
    unbuffered = bool(getattr(sys.__stdout__, "write_through", False))
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        was = getattr(sys, f"__{name}__") or getattr(sys, name)
        enc = getattr(was, "encoding", None) or "utf-8"
        errors = getattr(was, "errors", None) or "strict"
        try:
            raw = io.FileIO(fd, "rb" if fd == 0 else "wb", closefd=False)
        except OSError:
            setattr(sys, name, None)
            setattr(sys, f"__{name}__", None)
            continue
        tty = raw.isatty()
        buf: Any = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(
            buf, encoding=enc, errors=errors, newline=None if fd == 0 else "\n",
            line_buffering=fd == 2 or (fd == 1 and tty and not unbuffered),
            write_through=unbuffered and fd != 0,
        )  # fmt: skip
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _run_cli(argv: list[str], blocked: int, channel: socket.socket | None = None) -> int:
    """ckpt.cli's main() and exit, as `ckpt ARGS` ends: other threads joined, the exit handlers,
    the streams flushed (a flush that fails is Python's exit status 120)."""
    from ckpt import cli

    code: object
    try:
        # The client's mask: a SIGINT passed on while the child was being set up is taken here,
        # as by a command interrupted as it starts (SIGTERM/SIGHUP: their default, as there).
        signal.pthread_sigmask(signal.SIG_SETMASK, _mask(blocked))
    except KeyboardInterrupt:
        print("ckpt: interrupted", file=sys.stderr)
        code = 130
    else:
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            from ckpt.restore.caller import RunHere

            if not isinstance(e, RunHere) or channel is None:
                raise
            # (before anything of the restore started or was said: the client runs it itself, once
            # it has told the service so: the service's log says "in-process")
            with contextlib.suppress(OSError):
                channel.send(b"R" + str(e).encode())
                channel.recv(1)
            code = 0
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        print(code, file=sys.stderr)
        status = 1
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()  # as the interpreter does at its exit
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            status = 120
    return status


def serve(
    path: str,
    *,
    as_json: bool = False,
    warm: WarmStore | None = None,
    rehearsals: int = 0,
    spares: bool = True,
) -> int:
    def emit(obj: dict[str, object]) -> None:
        if as_json:
            line = json.dumps(obj)
        elif "listening" in obj:
            line = f"listening on {obj['listening']} (pid {obj['pid']})"
            if isinstance(r := obj.get("rehearsal"), dict) and r.get("dumps"):
                line += f"; rehearsed {r['dumps']} dumps in {r['ms']} ms"
        elif "stopping" in obj:
            line = f"stopped listening on {obj['stopping']}; {obj['running']} command(s) still running"
        elif "warm_buffer" in obj:
            why = f" ({obj['why']})" if "why" in obj else ""
            line = f"warm copy buffer: {obj['warm_buffer']} bytes{why}"
        else:
            argv = obj.get("argv")
            what = " ".join(map(str, argv)) if isinstance(argv, list) else ""
            tail = f": {obj['status']}" if "status" in obj else f": {obj['why']}"
            line = f"request {obj['request']} from pid {obj['peer']} ({what}): {obj['outcome']}{tail}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    svc = Service(path, emit, warm, spares)
    svc.bind()
    # SIGTERM, SIGINT or SIGHUP from here on stops the service as once it listens (_on_stop): during
    # the imports and the rehearsal too, which then ends at its next step (its helper killed, its
    # directory removed), and the service exits 0 having listened to nothing. (A handler that
    # raised instead could land inside the standard library's own cleanup: tempfile's probe file.)
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {sig: signal.signal(sig, svc._on_stop) for sig in stops}
    try:
        rehearsal = svc.preload(rehearsals)
        if svc.stopping:
            return 0  # (its socket removed below)
        if "failed" in rehearsal:
            why = rehearsal["failed"]
            print(f"ckpt service: no rehearsal ({why}): served dumps run cold", file=sys.stderr)
        emit({"listening": svc.path, "pid": os.getpid(), "rehearsal": rehearsal})
        svc.run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        svc._stop_listening()
        svc.warm.close()
    return 0
