"""The `ckpt` program (bin/ckpt): through a `ckpt service` when CKPT_SERVICE names its socket, else here.

Without CKPT_SERVICE this only hands over to ckpt.cli (nothing changes for anyone who does not ask).
With it, the command is sent to the resident service (ckpt/service.py), which forks a child of its
own that runs it with this process's argv, environment, working directory, umask, signal mask and
ignored signals, and with this process's descriptors that an exec would keep (stdin, stdout, stderr
and any other not close-on-exec, passed as descriptors at the same numbers); this
process waits for the child's status and exits with it (or dies by its signal), passing on SIGINT,
SIGTERM and SIGHUP meanwhile. The point is the start: Python with ckpt's imports costs each command
~0.1-0.2 s, the service paid for them once.

So this module must stay light: it imports only builtin modules (_socket and _signal rather than
socket and signal, whose enums cost more than the rest of the client), and `import ckpt` before it
imports nothing (ckpt/__init__.py). The service answers "run it yourself" when the command would not
mean the same thing in its child (another namespace, other credentials or limits, a command tied to
its caller such as serve: docs/service.md); the command then runs here, silently, as without the
service. A restore's process must be this process's child: the service's child has this process
start the helper (ckpt/stubelf.py, the only other module imported then) and restores into it, then
hands the wait for it back here (_served_restore, _wait_for; the protocol: ckpt/restore/caller.py).
A socket that was named but cannot be used (no service, refused, stale) gets one line on stderr and
the command runs here too.
"""

import posix  # (not os: bin/ckpt's Python without `site` has not imported it, ~2.4 ms here)
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket

ENV = "CKPT_SERVICE"
PROTOCOL = b"ckpt-service 1"
FORWARDED = (2, 15, 1)  # SIGINT, SIGTERM, SIGHUP: passed on to the command's process
_SOL_SOCKET, _SCM_RIGHTS, _MSG_CMSG_CLOEXEC = 1, 1, 0x40000000
MAX_FDS = 252  # SCM_MAX_FD (253) less the working directory's


_site_deferred = False  # bin/ckpt started Python without `site` (-S), and runs it if it must


def run(site_deferred: bool = False) -> None:
    """The `ckpt` program (bin/ckpt and `python -m ckpt`). `site_deferred`: Python started without
    `site` (bin/ckpt's -S) only for this client's sake: a command served is the same as with it
    (python_flags), and one run here gets it first, as a Python started without -S would have."""
    global _site_deferred
    _site_deferred = site_deferred
    raw = posix.environ.get(ENV.encode())
    path = _fsdecode(raw) if raw else ""
    if path:
        try:
            code = through_service(path, sys.argv[1:])
        except KeyboardInterrupt:
            # A Ctrl-C that came before the service took the command, raised again here (the
            # command runs here after all): as the command's own Ctrl-C ends, one line, not a
            # traceback from this module.
            _say("ckpt: interrupted")
            raise SystemExit(130) from None
        if code is not None and code < 0:
            _die_by(-code)  # as `ckpt` itself would have ended: killed by that signal
            code = 128 - code
        if code is not None:
            _leave(code)
    if site_deferred:
        import site

        site.main()  # (sys.prefix the venv's, its .pth files' imports, sitecustomize: as without -S)
    from ckpt.cli import run as run_here

    run_here()


def _leave(code: int) -> None:
    """Exit with the served command's status without the interpreter's teardown (~7 ms of every
    served command here, for a process that only waited): nothing of this module's needs it (no
    thread, no exit handler, no file but the standard streams, flushed here). A flush that fails
    (stdout a closed pipe) takes the ordinary exit, which reports it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        raise SystemExit(code) from None
    posix._exit(code & 0xFF)


def _die_by(sig: int) -> None:
    """End this process by the signal that ended the command's (a parent's waitpid sees the same
    WIFSIGNALED status as for an in-process `ckpt`, not an exit code); returns if it does not."""
    import _signal

    try:
        sys.stdout.flush()
        sys.stderr.flush()
        _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {sig})
        posix.kill(posix.getpid(), sig)
    except (OSError, ValueError):
        pass


def python_flags() -> str:
    """What of the interpreter's options changes what a command does: sys.flags, and -W and -X
    (not in sys.flags: `python -W error -m ckpt` turns a warning into an error)."""
    flags = list(sys.flags)
    if _site_deferred:
        flags[sys.flags.__match_args__.index("no_site")] = 0
    return repr((tuple(flags), sys.warnoptions, sorted(sys._xoptions.items(), key=str)))


def _status_fields() -> dict[str, str]:
    with open("/proc/self/status", "rb") as f:
        text = f.read().decode("ascii", "replace")
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _fsencode(s: str) -> bytes:
    return s.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _fsdecode(b: bytes) -> str:
    return b.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _package_file() -> str:
    import ckpt

    return ckpt.__file__ or ""


def inherited_fds() -> list[int]:
    """The descriptors an exec'd `ckpt` would have: this process's that are not close-on-exec
    (0, 1 and 2, and whatever the caller passed down: `ckpt show /dev/fd/63`, a test's pipe)."""
    out = []
    for name in posix.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if posix.get_inheritable(fd):
                out.append(fd)
        except OSError:
            pass  # (the listing's own descriptor, closed by now)
    return sorted(out)


def request(argv: list[str], fds: list[int]) -> bytes:
    """The request: NUL-separated fields (none can hold a NUL: argv, environment, paths)."""
    st = _status_fields()
    env = [k + b"=" + v for k, v in posix.environ.items()]
    fields = [
        PROTOCOL,
        st.get("Umask", "0022").encode(),
        st.get("SigIgn", "0").encode(),
        st.get("SigBlk", "0").encode(),
        _fsencode(sys.executable),  # (resolved by the service: os.path is not imported here)
        _fsencode(_package_file()),
        python_flags().encode(),
        _fsencode(sys.argv[0] if sys.argv else "ckpt"),
        b",".join(b"%d" % fd for fd in fds),  # the numbers of the descriptors passed after cwd's
        str(len(argv)).encode(),
        *map(_fsencode, argv),
        *env,
    ]
    return b"\0".join(fields)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _send(s: "_socket.socket", msg: bytes) -> None:
    # (no contextlib.suppress: contextlib is not among the builtin modules this file keeps to)
    try:  # noqa: SIM105
        s.send(msg)
    except OSError:  # gone: what follows on the connection says so
        pass


def _served_restore(chan: "_socket.socket", helpers: dict[int, int]) -> tuple[bytes, int, bytes]:
    """A restore served for us (ckpt/restore/caller.py has the protocol): we start its helper, our
    child as in-process; the service's child restores into it. Answered until the channel closes
    (b"", 0, b""), or the restored process is ours to wait for (b"W", its pid, b""), or we are to
    restore it ourselves (b"R", 0, why)."""
    while True:
        try:
            msg = chan.recv(4096)
        except OSError:
            msg = b""
        kind, body = msg[:1], msg[1:]
        if kind == b"H":
            from ckpt.stubelf import run_stub

            pid, why = run_stub(int(body))
            if why:
                _send(chan, b"e" + why.encode())
            elif pid > 0:
                # Kept, to kill it by: our child, in its pause() until the service's child seizes
                # it, so the pidfd is of this process even when SIGCHLD is ignored (its pid, once it
                # ends, may be given to another before our finally).
                pidfd = posix.pidfd_open(pid)
                helpers[pid] = pidfd
                given = [(_SOL_SOCKET, _SCM_RIGHTS, pidfd.to_bytes(4, sys.byteorder))]
                try:  # noqa: SIM105 (our child, not yet reaped: the pidfd is of this process)
                    chan.sendmsg([b"h%d" % pid], given)
                except OSError:
                    pass  # (the service's child is gone: its status says what became of it)
            else:
                _send(chan, b"h%d" % pid)
        elif kind == b"L":
            fd = helpers.pop(int(body), -1)  # the restored process: never killed by us
            if fd >= 0:
                posix.close(fd)
        elif kind == b"W":
            return kind, int(body), b""
        elif kind == b"R":
            return kind, 0, body
        else:
            return b"", 0, b""


def exit_status_of(pid: int) -> int:
    """Our child `pid` waited for until it ends, its status the way a shell gives it: the exit
    status, 128 + N for a signal N (0 if another waiter took it). The in-process restore's wait
    too (restore/run.py), so that both give the same."""
    while True:
        try:
            _, status = posix.waitpid(pid, 0)
        except ChildProcessError:
            return 0
        if posix.WIFEXITED(status):
            return posix.WEXITSTATUS(status)
        if posix.WIFSIGNALED(status):
            return 128 + posix.WTERMSIG(status)


def _wait_for(pid: int, chan: "_socket.socket") -> int:
    """The restored process, our child, waited for as `ckpt restore` does (restore/run.py
    wait_status): its exit status, 128 + N for a signal N; SIGINT and SIGQUIT ignored meanwhile (a
    terminal sends them to the whole foreground group, the process included), SIGTERM, SIGHUP,
    SIGUSR1 and SIGUSR2 passed on to it. The service's child waits for our word that they are in
    place before it ends (a signal sent once its command has ended is the process's)."""
    import _signal

    def forward(signum: int, frame: object) -> None:
        try:  # noqa: SIM105
            posix.kill(pid, signum)
        except ProcessLookupError:
            pass

    old = {sig: _signal.signal(sig, _signal.SIG_IGN) for sig in (2, 3)}
    old.update({sig: _signal.signal(sig, forward) for sig in (15, 1, 10, 12)})
    _send(chan, b"w")
    try:
        return exit_status_of(pid)
    finally:
        for sig, h in old.items():
            _signal.signal(sig, h)


def through_service(path: str, argv: list[str]) -> int | None:
    """The command's exit status through the service at `path` (-N: it was killed by signal N);
    None: run it here."""
    import _signal
    import _socket

    ignored = int(_status_fields().get("SigIgn", "0"), 16)
    inherited = inherited_fds()
    if len(inherited) > MAX_FDS:
        return None  # more than one message carries: here, silently, as without the service
    try:
        msg = request(argv, inherited)
    except (OSError, ValueError):
        return None  # (an argument with a NUL cannot come from a command line)
    try:
        cwd = posix.open(".", posix.O_PATH | posix.O_DIRECTORY | posix.O_CLOEXEC)
    except OSError:
        return None  # as the command would find it: it runs here
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    # Signals not yet known to have reached a command of the service's: ours again (raised once
    # our handlers are gone) if the command runs here after all.
    pending: list[int] = []
    sent_request = False
    started = False
    helpers: dict[int, int] = {}  # a served restore's helpers (pid: pidfd), ours until they are its process
    channel: _socket.socket | None = None

    def forward(signum: int, frame: object) -> None:
        if not started:
            pending.append(signum)
        if sent_request:
            _send(s, b"S%d" % signum)

    old: dict[int, object] = {}
    try:
        try:
            s.connect(path)
        except OSError as e:
            _say(f"ckpt: service {path}: {e.strerror or e}; running here")
            return None
        try:
            # Who listens there gets our environment and descriptors and says what our status is:
            # only a service of our own user (a socket left, or made, by another user at that path
            # would otherwise get them). SO_PEERCRED: the listener's credentials as it listened.
            owner = int.from_bytes(s.getsockopt(_SOL_SOCKET, 17, 12)[4:8], sys.byteorder)
            if owner != posix.geteuid():
                _say(f"ckpt: service {path}: listened on by uid {owner}, not {posix.geteuid()}; running here")
                return None
            # Its size is bounded by the socket's send buffer: a larger one (an environment of
            # hundreds of KiB) is refused by the kernel with EMSGSIZE and runs here.
            s.setsockopt(_SOL_SOCKET, 7, max(1 << 16, 2 * len(msg)))  # SO_SNDBUF
            for sig in FORWARDED:
                if not ignored & (1 << (sig - 1)):  # an ignored one stays ignored, as here
                    old[sig] = _signal.signal(sig, forward)
            fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (cwd, *inherited))
            s.sendmsg([msg], [(_SOL_SOCKET, _SCM_RIGHTS, fds)])
        except OSError as e:
            _say(f"ckpt: service {path}: {e.strerror or e}; running here")
            return None
        sent_request = True
        for sig in pending:
            _send(s, b"S%d" % sig)  # (the service passes them on once the command's process runs)
        while True:
            try:
                # (MSG_CMSG_CLOEXEC: a received channel is not the restore helper's to inherit)
                answer, anc, _, _ = s.recvmsg(65536, _socket.CMSG_SPACE(4), _MSG_CMSG_CLOEXEC)
            except OSError:  # (ECONNRESET: it went away with our request unread)
                answer, anc = b"", []
            for _, _, data in anc:  # a restore's channel, with its P: _served_restore
                channel = _socket.socket(fileno=int.from_bytes(data[:4], sys.byteorder))
            if not answer:
                if not started:
                    _say(f"ckpt: service {path}: closed the connection; running here")
                    return None
                _say(f"ckpt: service {path}: closed the connection before the command's status")
                return 70  # EX_SOFTWARE, as an internal error of ckpt's
            kind, body = answer[:1], answer[1:]
            if kind == b"P":
                started = True
                pending.clear()
                if channel is not None:
                    how, pid, why = _served_restore(channel, helpers)
                    if how == b"W":
                        return _wait_for(pid, channel)
                    if how == b"R":  # (a process tree: nothing of it started)
                        _send(s, b"R" + why)  # (for the service's log; before the child ends)
                        _send(channel, b"r")
                        return None
                    channel.close()
                    channel = None
            elif kind == b"X":
                return int(body)
            elif kind == b"K":
                return -int(body)  # (run() ends this process by the signal)
            elif kind == b"R":  # run it yourself: the command means something else there
                return None
            elif kind == b"N":  # refused: its one line
                _say(body.decode(errors="replace") + "; running here")
                return None
    finally:
        s.close()
        posix.close(cwd)
        if channel is not None:
            channel.close()
        for pidfd in helpers.values():  # a restore that failed or was cut short: its helper goes
            try:  # (by its pidfd: a SIGCHLD ignored by our caller reaps it, its pid then another's)
                _signal.pidfd_send_signal(pidfd, 9)
                posix.waitid(posix.P_PIDFD, pidfd, posix.WEXITED)
            except OSError:
                pass  # (ChildProcessError: reaped already, SIGCHLD ignored)
            posix.close(pidfd)
        for sig, h in old.items():
            _signal.signal(sig, h)
        for sig in pending:  # arrived before the service took the command: ours, as without it
            posix.kill(posix.getpid(), sig)
