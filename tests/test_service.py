"""`ckpt service` (ckpt/service.py) and the client in the `ckpt` program (ckpt/client.py): a command
run through the service gives what it gives in-process (layers, output, exit codes, Ctrl-C), and
where it could not (another namespace, another user, a command tied to its caller) it runs in-process.

Every service here is a real `python -m ckpt service` with its own socket in tmp_path; its --json
log (one line per request) says what became of each request, so each test asserts that the path it
means was the one taken. Teardown SIGTERMs it and checks it removed its socket and left no child.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from ckpt.image import find_layers
from tests.util import ROOT, LineChannel, Target, assert_view_equals_memory

WAIT = 120
ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="200")
UFFD = "anon_inode:[userfaultfd]"


class Service:
    def __init__(
        self, sock: Path, rehearsed: bool = True, extra: Sequence[str] = (), **popen: object
    ) -> None:
        self.sock = sock
        self.stderr_text = ""  # (what it wrote on stderr, once stopped)
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            [sys.executable, "-m", "ckpt", "service", "--socket", str(sock), "--json", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
            **popen,
        )  # fmt: skip
        self.log = LineChannel(self.proc, WAIT, lambda: f"; stderr: {self._stderr()}")  # type: ignore[arg-type]
        self.first = json.loads(self.log.readline())
        if rehearsed:
            listening(dict(self.first), sock, self.proc.pid)

    def _stderr(self) -> str:
        return "" if self.proc.poll() is None else (self.proc.stderr.read() or b"").decode()  # type: ignore[union-attr]

    def next(self) -> dict[str, object]:
        """The log line of the next request the service finished with."""
        return json.loads(self.log.readline())  # type: ignore[no-any-return]

    def all_children(self) -> list[str]:
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return f.read().split()

    def children(self) -> list[str]:
        """Its children but its spare (the next request's, forked while it is idle, named so)."""
        return [pid for pid in self.all_children() if not _is_spare(pid)]

    def reaped(self) -> bool:
        """Whether every command's process was reaped, once the log lines of those still exiting
        are read (each is the service's at its reap): a client has its status before its
        command's process has exited (Service._reported), so a test that returns as its last
        client does may find that process still there. A process never reaped times the read out."""
        while self.proc.poll() is None and self.children():
            self.next()
        return self.proc.poll() is not None or self.children() == []

    def stop(self) -> None:
        if self.proc.stderr is not None and self.proc.stderr.closed:
            return  # (stopped already: a test's own stop, then the fixture's)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(WAIT) == 0, self._stderr()
        self.stderr_text = self._stderr()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def _is_spare(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "ckpt-spare"
    except OSError:
        return False  # (gone)


def listening(first: dict[str, object], sock: Path, pid: int, rehearsals: int = 8) -> None:
    """The service's first line: listening, after its rehearsal (ckpt/forkwarm.py) of a full dump
    and ``rehearsals`` incremental ones of a helper, which worked."""
    rehearsal = first.pop("rehearsal")
    assert first == {"listening": str(sock), "pid": pid}
    assert isinstance(rehearsal, dict) and "failed" not in rehearsal, rehearsal
    assert rehearsal["dumps"] == (rehearsals + 1 if rehearsals else 0)
    if rehearsals:
        assert rehearsal["hot_pages"] > 0  # the pages a served freeze writes, learned (forkwarm.learn)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    sock = tmp_path / "svc" / "sock"
    s = Service(sock)
    try:
        assert (os.stat(sock.parent).st_mode & 0o777, os.stat(sock).st_mode & 0o777) == (0o700, 0o600)
        assert s.children() == []
        yield s
        if s.proc.poll() is None:
            assert s.reaped()  # every command's process reaped
    finally:
        s.stop()
    assert not sock.exists()  # SIGTERM: the socket removed


def ckpt(*args: str, service: Service | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    env = dict(ENV)
    env.pop("CKPT_SERVICE", None)
    env.update(kw.pop("env", {}))  # type: ignore[call-overload]
    if service is not None:
        env["CKPT_SERVICE"] = str(service.sock)
    text = kw.pop("text", True)
    return subprocess.run(
        [sys.executable, "-m", "ckpt", *args], capture_output=True, text=text, timeout=WAIT, env=env,
        cwd=ROOT, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def _untouched(t: Target) -> None:
    assert t.state() in ("S", "R")
    for tid in os.listdir(f"/proc/{t.pid}/task"):
        with open(f"/proc/{t.pid}/task/{tid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
    assert UFFD not in [os.readlink(f"/proc/{t.pid}/fd/{n}") for n in os.listdir(f"/proc/{t.pid}/fd")]


def _comparable(show: dict[str, object]) -> dict[str, object]:
    """`show --json` of a layer without what differs between two dumps of the same idle process:
    the moment and the durations, the layer's own name and digest."""
    drop = {"created", "created_at", "timestamp", "time", "freeze_ms", "elapsed_ms", "phases_ms", "digest",
            "path", "layer", "timings_ms", "dumped_at", "id", "uuid", "chain", "file_bytes"}  # fmt: skip

    def clean(o: object) -> object:
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if k not in drop and not k.endswith("_ms")}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return clean(show)  # type: ignore[return-value]


def test_dump_through_the_service_equals_in_process(
    tmp_path: Path, spawn: Callable[..., Target], service: Service
) -> None:
    t = spawn("rounds", "256")
    assert t.cmd("mix") == "ok"
    before = t.sum()
    # Stopped for both dumps and the comparison, and on one CPU: a thread that runs again, be it
    # only a dump's injected syscalls, has the kernel rewrite its rseq area (cpu_id) if it ran on
    # another CPU (Target.pin), a change of its memory no dump can foresee.
    t.pin()
    os.kill(t.pid, signal.SIGSTOP)
    assert t.stopped_state() == "T"
    here = ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "here"), "--track", "none", "--json")
    assert here.returncode == 0, here.stderr
    there = ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "there"), "--track", "none", "--json",
                 service=service)  # fmt: skip
    assert there.returncode == 0, there.stderr
    log = service.next()
    assert (log["outcome"], log["status"]) == ("ran", "X0")
    assert there.stderr == here.stderr == ""
    (lh,), (lt,) = find_layers(tmp_path / "here"), find_layers(tmp_path / "there")
    assert json.loads(there.stdout)["layer"] == str(lt)
    assert_view_equals_memory(t.pid, lt)  # (before the target runs again)
    assert t.stopped_state() == "T"  # left stopped, as it was
    os.kill(t.pid, signal.SIGCONT)
    _untouched(t)
    assert t.sum() == before
    # The layers say the same, through `show` run in-process and through the service.
    sh = ckpt("show", str(lh), "--json")
    st = ckpt("show", str(lt), "--json", service=service)
    assert service.next()["outcome"] == "ran"
    assert sh.returncode == st.returncode == 0
    assert _comparable(json.loads(st.stdout)) == _comparable(json.loads(sh.stdout))
    # One layer's `show` text, byte for byte, in-process and through the service.
    a, b = ckpt("show", str(lt)), ckpt("show", str(lt), service=service)
    assert service.next()["outcome"] == "ran"
    assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr)
    assert a.stdout.count("\n") > 10
    # and its memory, byte for byte
    ra = ckpt("read", str(lt), "--addr", hex(t.info()["region"]), "--size", "8192", "--raw", text=False)
    rb = ckpt("read", str(lt), "--addr", hex(t.info()["region"]), "--size", "8192", "--raw", service=service,
              text=False)  # fmt: skip
    assert service.next()["outcome"] == "ran"
    assert ra.stdout == rb.stdout and len(ra.stdout) > 0


def test_restore_through_the_service_restores(
    tmp_path: Path, spawn: Callable[..., Target], service: Service, subreaper: list[int]
) -> None:
    """A restore's process is ckpt restore's child, in its process group and session (after
    --detach its caller's subreaper's): the client starts the helper, the service restores into it
    (tests/test_service_restore.py has the rest), and it is right."""
    t = spawn("rounds", "64")
    assert t.cmd("round").startswith("round 1 ")
    want = t.sum()
    d = tmp_path / "d"
    r = ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--kill", "--json", service=service)
    assert r.returncode == 0, r.stderr
    assert service.next()["outcome"] == "ran"
    assert t.proc.wait(WAIT) == -signal.SIGKILL
    (layer,) = find_layers(d)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, cwd=ROOT,
        env=dict(ENV, CKPT_SERVICE=str(service.sock)),
    )  # fmt: skip
    try:
        chan = LineChannel(p, WAIT)
        pid = int(chan.readline())
        subreaper.append(pid)
        log = service.next()
        assert (log["outcome"], log["status"]) == ("ran", "X0"), log
        assert chan.cmd("sum") == f"sum {want}"
        assert p.wait(WAIT) == 0
        assert p.stderr is not None and p.stderr.read() == b""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
        for f in (p.stdin, p.stdout, p.stderr):
            if f:
                f.close()


def test_descriptors_at_their_numbers(tmp_path: Path, spawn: Callable[..., Target], service: Service) -> None:
    """Every descriptor an exec would keep is the command's at the same number: `ckpt show
    /dev/fd/N` (a shell's `<(...)`), with 40 more open around it (more than the service's own
    descriptors, so that received and wanted numbers collide)."""
    t = spawn("rounds", "16")
    r = ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--json")
    assert r.returncode == 0, r.stderr
    (layer,) = find_layers(tmp_path / "d")
    extra = [os.open(os.devnull, os.O_RDONLY) for _ in range(20)]
    fd = os.open(layer, os.O_RDONLY)
    extra += [os.open(os.devnull, os.O_RDONLY) for _ in range(20)]
    try:
        here = ckpt("show", f"/dev/fd/{fd}", pass_fds=[fd, *extra])
        there = ckpt("show", f"/dev/fd/{fd}", pass_fds=[fd, *extra], service=service)
    finally:
        for n in [fd, *extra]:
            os.close(n)
    assert (service.next()["outcome"], here.returncode) == ("ran", 0)
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)
    assert str(t.pid) in here.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["show", "/nonexistent/layer"],
        ["verify", "/nonexistent/layer"],
        ["dump", "--pid", "999999999", "-D", "{tmp}/d"],
        ["dump", "--pid", "abc", "-D", "{tmp}/d"],
        ["dump", "-D", "{tmp}/d"],
        ["frobnicate"],
        ["read", "{tmp}/none", "--addr", "0", "--size", "0"],
        ["diff", "{tmp}/a", "{tmp}/b"],
        ["untrack", "--pid", "999999999"],
        ["show"],
    ],
)
def test_bad_input_says_the_same(tmp_path: Path, service: Service, args: list[str]) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    here, there = ckpt(*argv), ckpt(*argv, service=service)
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)
    assert here.returncode != 0 and here.stderr.count("\n") == 1, here.stderr
    log = service.next()
    assert log["outcome"] in ("ran", "in-process"), log  # (an argparse error is the client's own)
    if log["outcome"] == "ran":
        assert log["status"] == f"X{here.returncode}"
    assert not (tmp_path / "d").exists()


def _held_dump(t: Target, d: Path, service: Service | None) -> tuple[int, str]:
    """A dump held as it writes its layer (the test hook in cli.py: the process thawed, its
    tracking armed), then a SIGINT to the `ckpt` process: its status and stderr."""
    r, w = os.pipe()
    env = dict(ENV, CKPT_DUMP_TEST_HOLD="compress", CKPT_DUMP_TEST_HOLD_FD=str(w))
    if service is not None:
        env["CKPT_SERVICE"] = str(service.sock)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "dump", "--pid", str(t.pid), "-D", str(d), "--track", "uffd-wp"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, pass_fds=(w,),
    )  # fmt: skip
    os.close(w)
    try:
        with os.fdopen(r, "rb") as hold:
            assert hold.readline() == b"compress\n"  # mid-dump, in whichever process runs it
            p.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches the `ckpt` in the foreground
            out, err = p.communicate(timeout=WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
    assert out == b""
    return p.returncode, err.decode()


def test_ctrl_c_reaches_the_command(tmp_path: Path, spawn: Callable[..., Target], service: Service) -> None:
    t = spawn("rounds", "1024")
    assert t.cmd("mix") == "ok"
    before = t.sum()
    here = _held_dump(t, tmp_path / "here", None)
    there = _held_dump(t, tmp_path / "there", service)
    log = service.next()
    assert (log["outcome"], log["status"]) == ("ran", "X130")
    assert there == here == (130, "ckpt: interrupted\n")
    for d in ("here", "there"):
        p = tmp_path / d
        assert not p.exists() or (find_layers(p) == [] and not [n for n in os.listdir(p) if ".tmp" in n])
    _untouched(t)
    assert t.sum() == before


@pytest.mark.parametrize("ns", ["--net", "--mount"])
def test_other_namespace_runs_in_process(
    tmp_path: Path, spawn: Callable[..., Target], service: Service, ns: str
) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1)")
    t = spawn("rounds", "16")
    d = tmp_path / "d"
    r = ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--json")
    assert r.returncode == 0, r.stderr
    (layer,) = find_layers(d)
    here = ckpt("show", str(layer))
    argv = [unshare, ns, sys.executable, "-m", "ckpt", "show", str(layer)]
    there = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, cwd=ROOT,
                           env=dict(ENV, CKPT_SERVICE=str(service.sock)))  # fmt: skip
    log = service.next()
    kind = {"--net": "net", "--mount": "mnt"}[ns]
    assert (log["outcome"], log["why"]) == ("in-process", f"another {kind} namespace")
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)


def test_dump_of_the_clients_ancestor_runs_in_process(tmp_path: Path, service: Service) -> None:
    """`ckpt dump --pid $$` from a shell: the shell is the client's parent; in the service's child
    the client would be another process of the tree (or none)."""
    script = (
        f'{sys.executable} -m ckpt dump --pid $$ -D {tmp_path}/d --no-tree --track none --json; echo "rc $?"'
    )
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=WAIT, cwd=ROOT,
                       env=dict(ENV, CKPT_SERVICE=str(service.sock)))  # fmt: skip
    log = service.next()
    assert log["outcome"] == "in-process" and "ancestor" in str(log["why"]), log
    # in-process, as without the service: ckpt refuses to dump its own parent
    assert r.stdout == "rc 1\n"
    assert r.stderr.endswith("is ckpt's parent; dumping it would deadlock on our own wait\n"), r.stderr
    assert r.stderr.count("\n") == 1


def _as_nobody(sock: Path, raw: bool = False) -> tuple[int | None, str]:
    """The client's request as user nobody (a forked child that drops to it: the venv's Python is
    not reachable for nobody here): what through_service() returned, and its stderr."""
    from ckpt import client

    who = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # (only os calls and the client's own code: a forked copy of the test runner)
        code = 99
        try:
            os.close(r)
            sys.stderr = open(w, "w")  # noqa: SIM115
            os.setgroups([])
            os.setgid(who.pw_gid)
            os.setuid(who.pw_uid)
            if raw:  # the request as a client that skips its own check of the listener sends it
                import _socket

                c = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
                c.connect(str(sock))
                c.send(client.request(["show", "/nonexistent/layer"], []))
                sys.stderr.write(c.recv(4096).decode() + "\n")
                got = None
            else:
                got = client.through_service(str(sock), ["show", "/nonexistent/layer"])
            sys.stderr.flush()
            code = 100 if got is None else got
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return (None if code == 100 else code), err


@pytest.fixture
def open_service() -> Iterator[Service]:
    """A service whose socket's path another user can search (tmp_path's parents are 0700)."""
    top = Path(tempfile.mkdtemp(prefix="ckpt-svc-"))
    os.chmod(top, 0o755)
    s = Service(top / "svc" / "sock")
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(top)


def test_another_user_is_refused(open_service: Service) -> None:
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user nobody")
    service = open_service
    # As it is set up, another user cannot reach the socket at all (0700 directory): here, one line.
    denied = f"ckpt: service {service.sock}: Permission denied; running here\n"
    assert _as_nobody(service.sock) == (None, denied)
    # Opened up by mistake: the peer's uid is checked, and it is refused with one line.
    os.chmod(service.sock.parent, 0o755)
    os.chmod(service.sock, 0o666)
    # The client sends nothing to a listener of another uid (root's, here): one line.
    assert _as_nobody(service.sock) == (
        None,
        f"ckpt: service {service.sock}: listened on by uid {os.geteuid()}, not {uid}; running here\n",
    )
    # A client that sends anyway: the service checks the peer's uid and refuses with one line.
    got = _as_nobody(service.sock, raw=True)
    log = service.next()
    assert log["outcome"] == "refused"
    assert got == (
        None,
        f"Nckpt: service {service.sock}: refused: uid {uid} is not the service's ({os.geteuid()})\n",
    )


def test_no_service_there(tmp_path: Path) -> None:
    """A socket named but unusable: one line, then the command here; unnamed: not a word."""
    here = ckpt("show", "/nonexistent/layer")
    there = ckpt("show", "/nonexistent/layer", env={"CKPT_SERVICE": str(tmp_path / "none")})
    assert there.returncode == here.returncode == 1
    assert there.stderr == (
        f"ckpt: service {tmp_path / 'none'}: No such file or directory; running here\n" + here.stderr
    )


def test_sigterm_lets_a_running_command_finish(
    tmp_path: Path, spawn: Callable[..., Target], service: Service
) -> None:
    """SIGTERM: no new requests (the socket goes at once), but the command running ends as it would
    have, its client gets its status, and then the service exits."""
    t = spawn("rounds", "64")
    r, w = os.pipe()
    env = dict(ENV, CKPT_DUMP_TEST_HOLD="compress", CKPT_DUMP_TEST_HOLD_FD=str(w))
    env["CKPT_SERVICE"] = str(service.sock)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "dump", "--pid", str(t.pid), "-D", str(tmp_path / "d")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, pass_fds=(w,),
    )  # fmt: skip
    os.close(w)
    try:
        with os.fdopen(r, "rb") as hold:
            assert hold.readline() == b"compress\n"
            service.proc.send_signal(signal.SIGTERM)
            assert service.next() == {"stopping": str(service.sock), "running": 1}
            late = ckpt("show", "/nonexistent/layer", service=service)
            assert late.stderr.startswith(f"ckpt: service {service.sock}: ")
            assert not service.sock.exists()
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
    assert (p.returncode, err) == (130, b"ckpt: interrupted\n")
    assert service.next()["status"] == "X130"
    assert service.proc.wait(WAIT) == 0
    _untouched(t)


def test_the_client_imports_nothing_heavy() -> None:
    """`import ckpt.client` (the console script's entry) loads nothing but the two modules."""
    code = (
        "import sys; before = set(sys.modules); import ckpt.client; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       check=True)  # fmt: skip
    assert r.stdout.split() == ["ckpt", "ckpt.client"]


@pytest.mark.parametrize("no_site", [False, True], ids=["site", "no-site"])
def test_the_ckpt_program_through_a_service_imports_only_the_client(
    tmp_path: Path, service: Service, no_site: bool
) -> None:
    """bin/ckpt, the program pip installs (not a console_scripts wrapper, which imports `re` first:
    ~9 ms of each command), imports nothing but ckpt.client before the service's answer, and ends
    with the command's status and output, the served command's line on its stderr; the venv's
    `ckpt` is that script, its interpreter line given -S by scripts/setup.sh. Started so (no
    `site`), it finds ckpt by the venv's own paths, imports no `site` at all, and is served: the
    service does not take it for another Python. (Its imports are seen by an audit hook: `-X
    importtime` would be another Python to the service, which then answers "run it yourself".)"""
    program = ROOT / "bin" / "ckpt"
    installed = Path(sys.executable).parent / "ckpt"
    if installed.exists():
        first, body = installed.read_text().split("\n", 1)
        assert body == program.read_text().split("\n", 1)[1]
        assert first == f"#!{sys.executable} -S" or first.endswith("/python3 -S"), first
    layer = str(tmp_path / "no-layer.ckpt")
    here = ckpt("show", layer)
    log = tmp_path / "imports"
    run = (
        "import sys\n"
        "def hook(event, args):\n"
        "    if event == 'import':\n"
        f"        with open({str(log)!r}, 'a') as f: f.write(args[0] + '\\n')\n"
        "sys.addaudithook(hook)\n"
        f"sys.argv[0] = {str(program)!r}\n"
        f"exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'), {{'__name__': '__main__'}})\n"
    )
    env = dict(ENV, CKPT_SERVICE=str(service.sock))
    python = [sys.executable, "-S"] if no_site else [sys.executable]
    r = subprocess.run([*python, "-c", run, "show", layer],
                       capture_output=True, text=True, timeout=WAIT, env=env, cwd=ROOT)  # fmt: skip
    assert service.next()["outcome"] == "ran"
    assert (r.returncode, r.stdout, r.stderr) == (here.returncode, here.stdout, here.stderr)
    assert here.returncode != 0 and here.stderr.count("\n") == 1
    imported = set(log.read_text().split())
    assert {"ckpt", "ckpt.client"} <= imported and "re" not in imported, sorted(imported)
    assert not {m for m in imported if m.startswith("ckpt.") and m != "ckpt.client"}, sorted(imported)
    if no_site:
        assert not {"site", "os"} & imported, sorted(imported)
        # Run here (no service): `site` first, then the command, the same.
        alone = subprocess.run([*python, str(program), "show", layer], capture_output=True, text=True,
                               timeout=WAIT, env=ENV, cwd=ROOT)  # fmt: skip
        assert (alone.returncode, alone.stdout, alone.stderr) == (here.returncode, here.stdout, here.stderr)
        if installed.exists():  # the venv's program itself, both ways
            for e in (ENV, env):
                got = subprocess.run([str(installed), "show", layer], capture_output=True, text=True,
                                     timeout=WAIT, env=e, cwd=ROOT)  # fmt: skip
                assert (got.returncode, got.stdout, got.stderr) == (here.returncode, here.stdout, here.stderr)
            assert service.next()["outcome"] == "ran"


def test_a_changed_ckpt_is_no_longer_served(tmp_path: Path) -> None:
    """A service whose ckpt changed after it started (an upgrade, an edit: a source file's mtime or
    size) runs no more commands: each client gets one line and runs its command itself, with the
    new code. A service of a copy of the tree, so that the copy can be changed."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "ckpt", tree / "ckpt", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(ENV, PYTHONPATH=str(tree))
    sock = tmp_path / "svc" / "sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "service", "--socket", str(sock), "--json", "--rehearse", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tree,
    )  # fmt: skip
    try:
        log = LineChannel(proc, WAIT)  # type: ignore[arg-type]
        assert "listening" in json.loads(log.readline())
        layer = str(tmp_path / "no-layer.ckpt")

        def show(service: bool) -> subprocess.CompletedProcess[str]:
            e = dict(env, CKPT_SERVICE=str(sock)) if service else env
            argv = [sys.executable, "-m", "ckpt", "show", layer]
            return subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, env=e, cwd=tree)

        here = show(False)
        assert here.returncode != 0 and here.stderr.count("\n") == 1
        served = show(True)
        assert (served.returncode, served.stderr) == (here.returncode, here.stderr)
        assert json.loads(log.readline())["outcome"] == "ran"
        src = tree / "ckpt" / "show.py"
        st = os.stat(src)
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # (the same bytes)
        for _ in range(2):
            again = show(True)
            line = f"ckpt: service {sock}: ckpt changed since the service started; running here\n"
            assert (again.returncode, again.stderr) == (here.returncode, line + here.stderr)
            assert json.loads(log.readline())["outcome"] == "stale"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


def _spare_pids(service: Service) -> list[int]:
    return [int(pid) for pid in service.all_children() if _is_spare(pid)]


def test_commands_run_in_a_spare_forked_while_idle(tmp_path: Path, service: Service) -> None:
    """Each request's process is forked before it, while the service is idle (its fork and the
    faults that make the service's pages its own off the command's wall): every command of a
    sequence runs in one (named ckpt-spare while it waits); a spare
    killed as it waits is replaced, and the request that finds it dead is forked for as before;
    the service's stop kills and reaps the one waiting."""
    layer = str(tmp_path / "no-layer.ckpt")
    here = ckpt("show", layer)
    pids = set()
    for _ in range(3):
        r = ckpt("show", layer, service=service)
        assert (r.returncode, r.stderr) == (here.returncode, here.stderr)
        log = service.next()
        assert (log["outcome"], log["spare"]) == ("ran", True)
        pids.add(log["pid"])
    assert len(pids) == 3  # (a spare runs one command)
    spares = _spare_pids(service)
    assert len(spares) <= 1
    for pid in spares:
        os.kill(pid, signal.SIGKILL)
    r = ckpt("show", layer, service=service)
    assert (r.returncode, r.stderr) == (here.returncode, here.stderr)
    assert service.next()["outcome"] == "ran"  # (in a spare forked since, or forked for it)
    r = ckpt("show", layer, service=service)
    log = service.next()
    assert (log["outcome"], log["spare"]) == ("ran", True)
    waiting = _spare_pids(service)
    service.stop()
    assert all(not os.path.exists(f"/proc/{pid}") for pid in waiting), waiting


def test_no_spare(tmp_path: Path) -> None:
    """`ckpt service --no-spare`: each command's process is forked when its request comes."""
    s = Service(tmp_path / "svc" / "sock", rehearsed=False, extra=["--no-spare", "--rehearse", "0"])
    try:
        layer = str(tmp_path / "no-layer.ckpt")
        for _ in range(2):
            r = ckpt("show", layer, service=s)
            assert r.returncode != 0 and r.stderr.count("\n") == 1
            log = s.next()
            assert (log["outcome"], log["spare"]) == ("ran", False)
            assert _spare_pids(s) == []
    finally:
        s.stop()


def test_from_ckpt_import_still_prepares_the_records() -> None:
    code = (
        "import ckpt, sys; assert 'dataclasses' not in sys.modules; from ckpt import open_layer; "
        "import dataclasses; from ckpt import codecache; print(dataclasses.exec is codecache._exec, "
        "'inspect' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       check=True)  # fmt: skip
    assert r.stdout.split() == ["True", "False"]


def test_no_module_reads_the_environment_as_it_is_imported() -> None:
    """A service imports ckpt once for many commands, each with its own environment: a module that
    read os.environ at import would keep the service's (ckpt/ptrace/rtboost.py did)."""
    import ast

    bad = []
    for f in sorted((ROOT / "ckpt").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and sub.attr in ("environ", "environb", "getenv"):
                    bad.append(f"{f.relative_to(ROOT)}:{sub.lineno}")
    assert bad == []


def test_a_socket_of_another_user_gets_nothing() -> None:
    """CKPT_SERVICE naming a socket another user listens on (one left or made at that path): the
    client sends it neither its environment nor its descriptors, says one line and runs here."""
    try:
        who = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    top = Path(tempfile.mkdtemp(prefix="ckpt-fake-"))
    os.chmod(top, 0o755)
    os.chown(top, who.pw_uid, who.pw_gid)
    sock = top / "sock"
    ready_r, ready_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a listener as nobody: what it received, as "bytes fds" on got_w
        code = 99
        try:
            import socket as _s

            os.close(ready_r)
            os.close(got_r)
            os.setgroups([])
            os.setgid(who.pw_gid)
            os.setuid(who.pw_uid)
            lst = _s.socket(_s.AF_UNIX, _s.SOCK_SEQPACKET)
            lst.bind(str(sock))
            lst.listen(1)
            os.write(ready_w, b"ready\n")
            conn, _ = lst.accept()
            data, anc, _, _ = conn.recvmsg(1 << 20, _s.CMSG_SPACE(4 * 256))  # b"": it hung up
            os.write(got_w, b"%d %d\n" % (len(data), len(anc)))
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(got_w)
    try:
        with os.fdopen(ready_r, "rb") as ready:
            assert ready.readline() == b"ready\n"
        here = ckpt("show", "/nonexistent/layer")
        there = ckpt("show", "/nonexistent/layer", env={"CKPT_SERVICE": str(sock)})
        with os.fdopen(got_r, "rb") as got:
            assert got.read() == b"0 0\n"
    finally:
        _, status = os.waitpid(pid, 0)
        shutil.rmtree(top)
    assert os.waitstatus_to_exitcode(status) == 0
    assert there.returncode == here.returncode == 1
    assert there.stderr == (
        f"ckpt: service {sock}: listened on by uid {who.pw_uid}, not {os.geteuid()}; running here\n"
        + here.stderr
    )


def _held_dump_killed(t: Target, d: Path, service: Service | None) -> int:
    """A dump held as it writes its layer (thawed), then SIGTERM to the `ckpt` process: its wait status."""
    r, w = os.pipe()
    env = dict(ENV, CKPT_DUMP_TEST_HOLD="compress", CKPT_DUMP_TEST_HOLD_FD=str(w))
    if service is not None:
        env["CKPT_SERVICE"] = str(service.sock)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "dump", "--pid", str(t.pid), "-D", str(d)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, pass_fds=(w,),
    )  # fmt: skip
    os.close(w)
    try:
        with os.fdopen(r, "rb") as hold:
            assert hold.readline() == b"compress\n"
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
    return p.returncode


def test_a_command_killed_by_a_signal_kills_its_client(
    tmp_path: Path, spawn: Callable[..., Target], service: Service
) -> None:
    """SIGTERM ends an in-process `ckpt` by that signal (its default): its parent's waitpid sees
    WIFSIGNALED; through the service the client ends the same way, not with exit code 143."""
    t = spawn("rounds", "64")
    here = _held_dump_killed(t, tmp_path / "here", None)
    there = _held_dump_killed(t, tmp_path / "there", service)
    assert service.next()["status"] == "K15"
    assert there == here == -signal.SIGTERM


_RAW_CLIENT = """
import os, sys, _socket
from ckpt import client
argv = sys.argv[1:]
fds = client.inherited_fds()
cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
s.connect(os.environ["CKPT_SERVICE"])
passed = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (cwd, *fds))
s.sendmsg([client.request(argv, fds)], [(1, 1, passed)])
s.send(b"S2")  # a Ctrl-C at once: passed on as the command's process is being made
while (a := s.recv(64))[:1] == b"P":
    pass
print(a.decode())
"""


def test_a_ctrl_c_as_the_command_starts_is_not_lost(
    tmp_path: Path, spawn: Callable[..., Target], service: Service
) -> None:
    """A SIGINT passed on while the service's child is still becoming the command (its handlers
    were the service's then) interrupts the command: it is not lost, leaving a dump that waits for
    a signal (the test hold) forever."""
    t = spawn("rounds", "64")
    env = dict(ENV, CKPT_SERVICE=str(service.sock), CKPT_DUMP_TEST_HOLD="compress")
    r = subprocess.run(
        [sys.executable, "-c", _RAW_CLIENT, "dump", "--pid", str(t.pid), "-D", str(tmp_path / "d")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=WAIT,
    )  # fmt: skip
    assert (r.stdout, r.stderr) == ("X130\n", "ckpt: interrupted\n")
    assert service.next()["status"] == "X130"
    _untouched(t)


def test_a_descriptor_at_the_limit(tmp_path: Path, service: Service) -> None:
    """`ckpt show /dev/fd/N` with N the last number the descriptor limit allows: the child could not
    move it above every number (EINVAL: a traceback, exit 70); it runs in-process, the same."""
    import resource

    top = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    f = tmp_path / "not-a-layer"
    f.write_bytes(b"x" * 100)
    fd = os.open(f, os.O_RDONLY)
    try:
        os.dup2(fd, top)
        here = ckpt("show", f"/dev/fd/{top}", pass_fds=(top,))
        there = ckpt("show", f"/dev/fd/{top}", pass_fds=(top,), service=service)
    finally:
        os.close(top)
        os.close(fd)
    assert service.next()["outcome"] == "in-process"
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)
    assert "Traceback" not in there.stderr


def test_a_ctrl_c_before_the_answer_run_it_yourself(tmp_path: Path) -> None:
    """A SIGINT that reaches the client before the service took the command, then "run it
    yourself": the client raises it again for itself, and that ends as a Ctrl-C of `ckpt` does
    (one line, 130), not with a traceback from ckpt/client.py. The service is the test's own."""
    import socket

    path = tmp_path / "sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lst.bind(str(path))
    lst.listen(1)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "show", "/nonexistent/layer"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(ENV, CKPT_SERVICE=str(path)), cwd=ROOT,
    )  # fmt: skip
    try:
        conn, _ = lst.accept()
        with conn:
            data, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 256))
            for _, _, fds in anc:  # (its stdout and stderr among them: ours to close)
                for i in range(0, len(fds) - len(fds) % 4, 4):
                    os.close(int.from_bytes(fds[i : i + 4], sys.byteorder))
            assert data.startswith(b"ckpt-service 1\0")
            p.send_signal(signal.SIGINT)
            assert conn.recv(64) == b"S2"  # (its handler saw it: before any answer)
            conn.send(b"Rtest")
        out, err = p.communicate(timeout=WAIT)
    finally:
        lst.close()
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
    assert (p.returncode, out, err) == (130, b"", b"ckpt: interrupted\n")


def _allow_all_seccomp() -> None:
    """(preexec_fn) A seccomp filter that allows every call: Seccomp 2 in /proc/PID/status."""
    import ctypes

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    allow = (Filter * 1)(Filter(0x06, 0, 0, 0x7FFF0000))  # BPF_RET|BPF_K SECCOMP_RET_ALLOW
    prog = Prog(1, allow)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def test_a_client_under_seccomp_runs_in_process(tmp_path: Path) -> None:
    """Seccomp's status line says that a filter is there, not which: a client under one runs its
    command in-process (under its own filter), never in the child of a service that has one too
    (whose filter may be another: here both allow all, and still they are two)."""
    service = Service(tmp_path / "svc" / "sock", rehearsed=False, preexec_fn=_allow_all_seccomp)
    try:
        here = ckpt("show", "/nonexistent/layer", preexec_fn=_allow_all_seccomp)
        there = ckpt("show", "/nonexistent/layer", preexec_fn=_allow_all_seccomp, service=service)
        log = service.next()
    finally:
        service.stop()
    # Its rehearsal (ckpt/forkwarm.py) could not dump its helper, which inherits the filter that ckpt
    # cannot suspend under a filter of its own: said once on stderr, and the service serves on.
    why = service.first["rehearsal"]["failed"]
    assert service.first["rehearsal"]["dumps"] == 0 and "seccomp" in why
    assert service.stderr_text == f"ckpt service: no rehearsal ({why}): served dumps run cold\n"
    assert (log["outcome"], log["why"]) == (
        "in-process",
        "a seccomp filter (which cannot be compared with the service's)",
    )
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)


def test_loader_variables_run_in_process(service: Service) -> None:
    """LD_*, GLIBC_TUNABLES and MALLOC_* act as a process starts (the dynamic loader, the C
    library), which the service's child does not: such a command runs in-process."""
    env = {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}
    here = ckpt("show", "/nonexistent/layer", env=env)
    there = ckpt("show", "/nonexistent/layer", env=env, service=service)
    log = service.next()
    assert (log["outcome"], log["why"]) == ("in-process", "other PYTHON*/locale/loader variables")
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)


def test_warning_options_run_in_process(service: Service) -> None:
    """`python -W error -m ckpt` (not in sys.flags) turns a warning into an error in-process; the
    service's child has no such option: the command runs in-process."""
    env = dict(ENV, CKPT_SERVICE=str(service.sock))
    run = [sys.executable, "-W", "error", "-m", "ckpt", "show", "/nonexistent/layer"]
    there = subprocess.run(run, capture_output=True, text=True, timeout=WAIT, env=env, cwd=ROOT)
    log = service.next()
    assert (log["outcome"], log["why"]) == ("in-process", "another Python or another ckpt")
    assert there.returncode == 1 and there.stderr.count("\n") == 1


def test_a_killed_service_takes_its_commands(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """SIGKILL of the service (or the OOM killer): the client says so and exits 70, and the command
    it was running does not go on without anyone waiting for it (PR_SET_PDEATHSIG)."""
    service = Service(tmp_path / "svc" / "sock")
    t = spawn("rounds", "64")
    r, w = os.pipe()
    env = dict(ENV, CKPT_DUMP_TEST_HOLD="compress", CKPT_DUMP_TEST_HOLD_FD=str(w))
    env["CKPT_SERVICE"] = str(service.sock)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "dump", "--pid", str(t.pid), "-D", str(tmp_path / "d")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, pass_fds=(w,),
    )  # fmt: skip
    os.close(w)
    try:
        with os.fdopen(r, "rb") as hold:
            assert hold.readline() == b"compress\n"
            [child] = service.children()
            pidfd = os.pidfd_open(int(child))
            service.proc.kill()
            service.proc.wait(WAIT)
            _, err = p.communicate(timeout=WAIT)
            # (a child's exit makes its pidfd readable; one left running times the select out)
            assert select.select([pidfd], [], [], WAIT)[0] == [pidfd]
            os.close(pidfd)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
        for f in (service.proc.stdout, service.proc.stderr):
            if f:
                f.close()
    assert (p.returncode, err.decode()) == (
        70, f"ckpt: service {service.sock}: closed the connection before the command's status\n"
    )
    service.sock.unlink()


PTRACE_CONT, PTRACE_DETACH, PTRACE_SEIZE, PTRACE_O_TRACEEXIT, PTRACE_EVENT_EXIT = 7, 17, 0x4206, 0x40, 6
WALL = 0x40000000


class ExitHold:
    """A process held at its exit (ptrace's PTRACE_EVENT_EXIT stop: its descriptors and memory
    still there) by a thread of the test's, its tracer (ptrace's requests must come from that
    thread), until release()."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.error = ""
        self.seized, self.at_exit, self._go = threading.Event(), threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._trace, daemon=True)
        self.thread.start()
        assert self.seized.wait(WAIT) and not self.error, self.error

    def _trace(self) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        if libc.ptrace(PTRACE_SEIZE, self.pid, None, PTRACE_O_TRACEEXIT) != 0:
            self.error = os.strerror(ctypes.get_errno())
            self.seized.set()
            return
        self.seized.set()
        try:
            for _ in range(64):  # (signal-delivery stops on the way: given back)
                _, status = os.waitpid(self.pid, WALL)
                if not os.WIFSTOPPED(status):
                    return
                if status >> 8 == signal.SIGTRAP | PTRACE_EVENT_EXIT << 8:
                    self.at_exit.set()
                    self._go.wait(WAIT)
                    return
                libc.ptrace(PTRACE_CONT, self.pid, None, os.WSTOPSIG(status))
        finally:
            libc.ptrace(PTRACE_DETACH, self.pid, None, None)

    def wait_exit(self) -> None:
        assert self.at_exit.wait(WAIT), f"process {self.pid} did not reach its exit"

    def release(self) -> None:
        self._go.set()
        self.thread.join(WAIT)


def _big_read(tmp_path: Path, spawn: Callable[..., Target]) -> tuple[list[str], bytes]:
    """`ckpt read --raw` of 1 MiB of a layer, and what it prints: more than a pipe holds, so that a
    command's process blocks on its full stdout until the test reads, and is there to be found."""
    t = spawn("rounds", "256")
    r = ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--track", "none")
    assert r.returncode == 0, r.stderr
    (lt,) = find_layers(tmp_path / "d")
    args = ["read", str(lt), "--addr", hex(t.info()["region"]), "--size", str(1 << 20), "--raw"]
    here = ckpt(*args, text=False)
    assert here.returncode == 0 and len(here.stdout) == 1 << 20 and not here.stderr, here.stderr
    return args, here.stdout


def _served(args: list[str], service: Service) -> subprocess.Popen[bytes]:
    env = dict(ENV, CKPT_SERVICE=str(service.sock))
    return subprocess.Popen([sys.executable, "-m", "ckpt", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)  # fmt: skip


def test_the_client_has_its_status_before_the_commands_process_exits(
    tmp_path: Path, spawn: Callable[..., Target], service: Service
) -> None:
    """A served command's process tells the service its status once the command is over, and the
    client exits with it while that process's own exit (4-6 ms of unmapping and closing here) is
    still to come. Shown by holding that exit: the client ends meanwhile, with the in-process
    command's status and output, and what it could still notice of the process is gone by then:
    it holds one descriptor (the socket it reported on; the client's stdout has reached its end)
    and its directory is /. Released, the process exits, and the service's log says so ("early")."""
    args, want = _big_read(tmp_path, spawn)
    p = _served(args, service)
    hold: ExitHold | None = None
    try:
        assert p.stdout is not None
        first = os.read(p.stdout.fileno(), 1)  # (the command is writing: its process is there)
        [child] = service.children()
        hold = ExitHold(int(child))
        out, err = p.communicate(timeout=WAIT)  # the client ends while its command's process is held
        assert (p.returncode, first + out, err) == (0, want, b"")
        hold.wait_exit()
        fds = os.listdir(f"/proc/{child}/fd")
        assert len(fds) == 1 and os.readlink(f"/proc/{child}/fd/{fds[0]}").startswith("socket:"), fds
        assert os.readlink(f"/proc/{child}/cwd") == "/"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
        if hold is not None:
            hold.release()
    log = service.next()
    assert (log["outcome"], log["status"], log["early"]) == ("ran", "X0", True), log
    assert "told" not in log
    # A failing command's status comes early as well.
    r = ckpt("show", str(tmp_path / "no-layer.ckpt"), service=service)
    log = service.next()
    assert (r.returncode, log["status"], log["early"]) == (1, "X1", True), log


def test_a_commands_end_and_its_clients_hang_up_seen_at_once(
    tmp_path: Path, spawn: Callable[..., Target], service: Service
) -> None:
    """The service wakes to find a command's report, its process's end and its client's hang-up
    at once: it takes the end (which closes the connection), then the hang-up of a connection
    closed by then, and goes on (it ended once, "Invalid file descriptor: -1", in a CI run of
    tests/test_warmbuf.py: a client that left with its status as the process ended). Made certain
    here: the service stopped, the command let finish and gone, the client killed, the service
    continued (the kernel reports the three in the order they came)."""
    args, want = _big_read(tmp_path, spawn)
    p = _served(args, service)
    stopped = False
    try:
        assert p.stdout is not None
        got = os.read(p.stdout.fileno(), 1)
        [child] = service.children()
        pidfd = os.pidfd_open(int(child))
        os.kill(service.proc.pid, signal.SIGSTOP)
        stopped = True
        os.waitid(os.P_PID, service.proc.pid, os.WSTOPPED | os.WNOWAIT)
        while len(got) < len(want):
            chunk = os.read(p.stdout.fileno(), 1 << 16)
            assert chunk
            got += chunk
        assert got == want
        assert select.select([pidfd], [], [], WAIT)[0] == [pidfd]  # reported, and ended
        os.close(pidfd)
        p.kill()
        assert p.wait(WAIT) == -signal.SIGKILL
        os.kill(service.proc.pid, signal.SIGCONT)
        stopped = False
    finally:
        if stopped:
            os.kill(service.proc.pid, signal.SIGCONT)
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
    log = service.next()
    assert (log["outcome"], log["status"], log["early"]) == ("ran", "X0", True), log
    r = ckpt("show", str(tmp_path / "no-layer.ckpt"), service=service)
    assert (r.returncode, service.next()["outcome"]) == (1, "ran")
