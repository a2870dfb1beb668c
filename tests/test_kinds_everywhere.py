"""Every kind a restore brings back, through the paths other than one full layer (issue 12, its last
paragraph: "restore of every kind also works from a chain with incremental layers and after
`ckpt migrate`").

The targets and their starters are those of the kind's own tests (props.c, objects.c, fdkinds.c,
threads.c): each checks itself (`check` answers "ok" or names what differs), twice after a restore.
- `test_kind_through_a_chain[NAME-chain|merge]`: a full layer, the target changes some of its state
  (where its commands allow), an incremental layer, another change, an incremental layer with
  --kill; the chain's top is restored, or (a run of its own) the chain's `ckpt merge`;
- `test_kind_after_migrate[NAME]`: `ckpt migrate --policy rounds:2` to a `ckpt serve` on 127.0.0.1
  (two live rounds, then the final one), the copy checked where serve restored it;
- `test_kind_after_migrate_apart[NAME]`: the same to a `ckpt serve` in network, IPC and pid
  namespaces of its own, for what a copy on the same machine cannot have while the original holds
  it (SysV keys and ids, bound addresses, tids);
- what no copy can take while the original holds it is refused before the first round.

By default one case per target, holding every kind it can at once (~21 tests, ~30 s of CPU);
CKPT_KINDS_ALL=1 runs each kind alone too (~160 tests: 17 min wall at load 13-16 on 2 CPUs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_migrate import ENV, PR_SET_CHILD_SUBREAPER, Server, _ckpt, _libc, migrate, server, token  # noqa: F401
from tests.test_restore import Restored, dump, killed, restored  # noqa: F401 (a fixture)
from tests.test_restore_anonfds import KINDS as ANONFD_KINDS
from tests.test_restore_objects import KINDS as OBJECT_KINDS
from tests.test_restore_objects import _no_leftovers, _objects  # noqa: F401 (an autouse fixture)
from tests.test_restore_props import RESTORED as PROPS
from tests.test_restore_props import _props
from tests.util import ROOT, LineChannel, Target, run_ckpt, subreaper_on, subreaper_restore

Spawn = Callable[..., Target]
Step = tuple[str, str]  # a command and the answer it must get


@dataclass(frozen=True)
class Kind:
    """How to start a target holding one kind (or several), and what it may change between layers."""

    target: str  # props, objects, fdkinds, threads
    arg: str
    change: tuple[Step, ...] = (("check", "ok"),)

    def start(self, spawn: Spawn, tmp_path: Path) -> Target:
        if self.target == "props":
            return _props(spawn, tmp_path, self.arg)
        if self.target == "objects":
            return _objects(spawn, tmp_path, self.arg)
        if self.target == "threads":
            t = spawn("threads", self.arg, stderr=subprocess.DEVNULL)
            assert t.cmd("waiting") == "waiting"
        else:
            if "fifo" in self.arg.split(","):
                os.mkfifo(tmp_path / "fifo")
            t = spawn("fdkinds", self.arg, str(tmp_path), stderr=subprocess.DEVNULL)
        assert t.cmd("check") == "ok"
        return t

    def settle(self, t: Target | LineChannel) -> None:
        """Threads go back into their waits after a command, so that every dump finds them there."""
        if self.target == "threads":
            assert t.cmd("waiting") == "waiting"


_PROP_CHANGE: dict[str, tuple[Step, ...]] = {
    "shm": (("zap", "zapped"),),  # a shared page leaves the page table between layers
    "vdso": (("movevdso", "moved"),),  # the vdso elsewhere in each layer
    "growsdown": (("grow", "grew 1"),),  # the mapping grows between layers
}


def _kinds() -> dict[str, Kind]:
    k: dict[str, Kind] = {}
    for p in PROPS:
        k[f"props-{p}"] = Kind("props", p, _PROP_CHANGE.get(p, (("check", "ok"),)))
    for o in OBJECT_KINDS:
        k[f"objects-{o}"] = Kind("objects", o, (("write", "written"),))
    for a in ANONFD_KINDS[:-1]:
        k[f"fdkinds-{a}"] = Kind("fdkinds", a)
    for a in ("pipe,follow", "bigpipe", "fifo"):
        k[f"pipes-{a}"] = Kind("fdkinds", a)
    k["threads-5"] = Kind("threads", "5", (("advance", "advanced"),))
    return k


KINDS = _kinds()
_OBJECTS_ALL = ",".join(o for o in OBJECT_KINDS if o != "sysvrm")  # objects.c keeps sysv or sysvrm
_FDKINDS_ALL = f"{ANONFD_KINDS[-1]},bigpipe,fifo"
_WRITE = (("write", "written"),)
# The default run: each target holding every kind it can hold at once.
DEFAULT = {
    "props-all": Kind("props", ",".join(PROPS), tuple(s for p in PROPS for s in _PROP_CHANGE.get(p, ()))),
    "objects-all": Kind("objects", _OBJECTS_ALL, _WRITE),
    "objects-sysvrm": KINDS["objects-sysvrm"],
    "fdkinds-all": Kind("fdkinds", _FDKINDS_ALL),
    "threads-5": KINDS["threads-5"],
}
EVERY = os.environ.get("CKPT_KINDS_ALL") == "1"
CASES = {**DEFAULT, **KINDS} if EVERY else DEFAULT

# What `ckpt migrate` refuses before it starts (ckpt/migrate/refuse.py): write locks, anywhere.
NEVER_MIGRATES = {"flock", "posixlock"}
# Kinds a copy on this machine gets only in namespaces of its own, as on another host: a SysV
# segment's key and id, a listener's or a UDP socket's address (each held by the original until it
# goes: the restore refuses them, naming them, and the original runs on), the tids of threads (glibc
# keeps each thread's tid: a thread restored with another is not the same; the restore warns).
APART = {"sysv", "sysvrm", "tcplisten", "udp"}


def _migrate_cases() -> tuple[dict[str, Kind], dict[str, Kind]]:
    """(to loopback, to a destination in namespaces of its own)."""
    props = [p for p in PROPS if p not in NEVER_MIGRATES]
    local = {
        "props-all": Kind("props", ",".join(props), tuple(s for p in props for s in _PROP_CHANGE.get(p, ()))),
        "objects-all": Kind("objects", ",".join(o for o in OBJECT_KINDS if o not in APART), _WRITE),
        "fdkinds-all": DEFAULT["fdkinds-all"],
    }
    apart = {
        "objects-all": Kind(
            "objects", ",".join(o for o in OBJECT_KINDS if o in APART and o != "sysvrm"), _WRITE
        ),
        "objects-sysvrm": KINDS["objects-sysvrm"],
        "threads-5": KINDS["threads-5"],
    }
    if EVERY:
        for name, k in KINDS.items():
            if k.arg in NEVER_MIGRATES:
                continue
            (apart if k.arg in APART or k.target == "threads" else local)[name] = k
    return local, apart


TO_LOOPBACK, TO_APART = _migrate_cases()


@pytest.mark.parametrize("how", ["chain", "merge"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kind_through_a_chain(
    name: str,
    how: str,
    tmp_path: Path,
    spawn: Spawn,
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """One restore per run: the first would change what the second finds outside the image (a
    /dev/shm file's mtime, a SysV segment's bytes), which a restore rightly refuses."""
    kind = CASES[name]
    t = kind.start(spawn, tmp_path)
    d = tmp_path / "d"
    kind.settle(t)
    dump(t.pid, d)
    for last in (False, True):
        for cmd, answer in kind.change:
            assert t.cmd(cmd) == answer
        assert t.cmd("check") == "ok"
        kind.settle(t)
        out = dump(t.pid, d, "--incremental", *(["--kill"] if last else []))
    killed(t)
    layer = Path(str(out["layer"]))
    assert layer.name == "layer-0003.ckpt"
    if how == "merge":
        layer = tmp_path / "merged.ckpt"
        run_ckpt("merge", str(out["layer"]), "-o", str(layer), check=True)
    r = restored(layer, "--detach", "--json")
    r.set_pid(json.loads(r.readline())["pid"])
    assert r.wait() == 0
    assert r.cmd("check") == "ok"
    kind.settle(r.chan)
    assert r.cmd("check") == "ok"  # checking changed nothing


def _migrated(t: Target, kind: Kind, s: Server, *args: str) -> None:
    rc, lines, err = migrate(t.pid, s.addr, "--policy", "rounds:2", *args)
    assert rc == 0, err
    assert [ln["kind"] for ln in lines[:-1]] == ["live", "live", "final"]
    assert t.proc.wait(30) == -signal.SIGKILL
    done = s.event("done")
    s.pid = int(str(done["pid"]))  # killed at teardown (Apart: with its namespace)
    assert done["pid_kept"] or s.addr.startswith("127."), done
    mig = s.chan
    assert mig.cmd("check") == "ok"
    kind.settle(mig)
    assert mig.cmd("check") == "ok"


@pytest.mark.parametrize("name", sorted(TO_LOOPBACK))
def test_kind_after_migrate(
    name: str,
    tmp_path: Path,
    spawn: Spawn,
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """To a `ckpt serve` on 127.0.0.1: the same namespaces, the original still there until the end."""
    kind = TO_LOOPBACK[name]
    t = kind.start(spawn, tmp_path)
    for cmd, answer in kind.change:
        assert t.cmd(cmd) == answer
    kind.settle(t)
    _migrated(t, kind, server())


class Apart(Server):
    """`ckpt serve` in network, IPC and pid namespaces of its own, reached over a veth pair: the
    copy's addresses, SysV keys and ids, pid and tids are free there, as on another host. Its pids
    are those of its namespace (serve is its init: it keeps serving, and the copy lives as its
    child); the whole namespace goes with it at close."""

    def __init__(self, d: Path, ns: str, addr: str, token: Path) -> None:
        self.dir = d
        serve = _ckpt("serve", "--listen", f"{addr}:0", "-D", str(d), "--json", "--token-file", str(token))
        cmd = ["ip", "netns", "exec", ns, "unshare", "--ipc", "--pid", "--mount-proc", "--kill-child", *serve]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=ENV, cwd=ROOT)  # fmt: skip
        self.chan = LineChannel(self.proc, 120, self._err)
        self.addr = json.loads(self.chan.readline())["listening"]
        self.pid = None
        self.other = []
        self.last = {}

    def close(self) -> None:
        self.proc.kill()  # unshare: its child, the namespace's init, is killed with it, and so all of it
        self.proc.wait(30)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.fixture(scope="module")
def apart_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """A network namespace joined to ours by a veth pair (a /30 of its own): (its name, the address
    there, a token file). One for the module: a namespace's veth goes some time after the namespace."""
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("ip (iproute2) and unshare (util-linux) are needed")
    tag = os.getpid()  # names of its own (15 characters at most for a link)
    ns, here, there = f"ckpt-kinds-{tag}", f"ckk{tag}a", f"ckk{tag}b"
    quad = tag % 16384 * 4  # a /30 of 10.233.0.0/16
    for gone in (["link", "del", here], ["netns", "del", ns]):  # a killed run's, of this same pid
        subprocess.run(["ip", *gone], capture_output=True)
    mine, theirs = (f"10.233.{quad >> 8}.{(quad & 255) + k}" for k in (1, 2))
    tok = token(tmp_path_factory.mktemp("apart"), "tok", "a-token-for-the-kinds-apart-test")

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", ns)
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{mine}/30", "dev", here)
        ip("-n", ns, "addr", "add", f"{theirs}/30", "dev", there)
        ip("link", "set", here, "up")
        ip("-n", ns, "link", "set", there, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns, theirs, tok
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)  # both ends, at once
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def apart(tmp_path: Path, apart_net: tuple[str, str, Path]) -> Iterator[tuple[Callable[[], Apart], Path]]:
    """Start `ckpt serve`s in the namespace; every one is killed, with its namespaces, at the end."""
    ns, addr, tok = apart_net
    started: list[Apart] = []

    def start() -> Apart:
        s = Apart(tmp_path / f"dst{len(started)}", ns, addr, tok)
        started.append(s)
        return s

    was_subreaper = subreaper_on()
    try:
        yield start, tok
    finally:
        for s in started:
            s.close()
        subreaper_restore(was_subreaper)


@pytest.mark.parametrize("name", sorted(TO_APART))
def test_kind_after_migrate_apart(
    name: str,
    tmp_path: Path,
    spawn: Spawn,
    apart: tuple[Callable[[], Apart], Path],
) -> None:
    """To a `ckpt serve` in namespaces of its own (another host, as far as these kinds can tell)."""
    start, tok = apart
    kind = TO_APART[name]
    t = kind.start(spawn, tmp_path)
    for cmd, answer in kind.change:
        assert t.cmd(cmd) == answer
    kind.settle(t)
    s = start()
    _migrated(t, kind, s, "--token-file", str(tok))


def _untouched(t: Target) -> None:
    """Running, untraced, without our tracker, and answering as before."""
    assert t.state() in "SR" and t.tracer() == 0
    fds = os.listdir(f"/proc/{t.pid}/fd")
    assert not any(os.readlink(f"/proc/{t.pid}/fd/{fd}") == "anon_inode:[userfaultfd]" for fd in fds)
    assert t.cmd("check") == "ok"


def test_write_locks_are_refused_before_anything(
    tmp_path: Path,
    spawn: Spawn,
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """Refused by name before the first round: the original is never frozen nor tracked, and runs on."""
    t = Kind("props", "flock,posixlock").start(spawn, tmp_path)
    s = server()
    rc, lines, err = migrate(t.pid, s.addr, "--policy", "rounds:2")
    assert rc == 1 and not lines, (rc, lines)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(
        f"ckpt: cannot migrate pid {t.pid}: fd 3 ({tmp_path}/scratch.bin) holds a FLOCK write lock"
    )
    assert f"fd 5 ({tmp_path}/scratch.bin) holds a POSIX write lock" in err, err
    assert err.rstrip().endswith(f"the original process {t.pid} was not touched and runs on"), err
    _untouched(t)
    assert not list(s.dir.glob("*.ckpt"))


def test_listener_on_the_same_machine_is_taken_over(
    tmp_path: Path,
    spawn: Spawn,
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """To loopback the original still holds its listeners' addresses when the copy is built: the
    copy takes the same listening sockets over (restore/listenshare.py), options and all, and is
    the one listening once the original is gone (to another host they are bound again: apart)."""
    kind = Kind("objects", "tcplisten")
    t = kind.start(spawn, tmp_path)
    p4, p6 = t.cmd("ports").split()
    s = server()
    _migrated(t, kind, s)
    ss = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
    for port in (p4, p6):
        mine = [ln for ln in ss.splitlines() if f":{port} " in ln]
        assert len(mine) == 1 and f"pid={s.pid}," in mine[0], mine


READ_LOCKS = """
import fcntl, os, struct, sys
f = open(sys.argv[1], "r+b")
fcntl.flock(f, fcntl.LOCK_SH)
g = open(sys.argv[1], "rb")
fcntl.lockf(g, fcntl.LOCK_SH, 10, 5)
print("ready", flush=True)
for line in sys.stdin:
    locks = [ln.split() for ln in open("/proc/locks")]
    ino = str(os.fstat(f.fileno()).st_ino)
    mine = sorted(f"{w[1]} {w[3]}" for w in locks if w[4] == str(os.getpid()) and w[5].endswith(":" + ino))
    print(", ".join(mine), flush=True)
"""


def test_read_locks_migrate(tmp_path: Path, server: Callable[..., Server]) -> None:  # noqa: F811
    """Read locks share: the copy takes them beside the original's, and holds them once it is gone."""
    f = tmp_path / "locked"
    f.write_bytes(bytes(64))
    t = Target([sys.executable, "-c", READ_LOCKS, str(f)], stderr=subprocess.DEVNULL)
    try:
        assert t.cmd("locks") == "FLOCK READ, POSIX READ"
        s = server()
        rc, _, err = migrate(t.pid, s.addr, "--policy", "rounds:2")
        assert rc == 0, err
        assert t.proc.wait(30) == -signal.SIGKILL
    finally:
        t.close()
    s.done()
    assert s.chan.cmd("locks") == "FLOCK READ, POSIX READ"


def test_a_tree_member_with_a_write_lock_is_refused(tmp_path: Path, server: Callable[..., Server]) -> None:  # noqa: F811
    """A tree migrates whole: a child's write lock is named, with the child, before anything."""
    f = tmp_path / "locked"
    f.write_bytes(b"x")
    code = (
        "import fcntl, os, signal, sys\n"
        "r, w = os.pipe()\n"
        "c = os.fork()\n"
        "if c == 0:\n"
        "    fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "    os.write(w, b'x')\n"
        "    signal.pause()\n"
        "os.read(r, 1)\n"
        "print('ready', c, flush=True)\n"
        "print('still here', sys.stdin.readline().strip(), flush=True)\n"
    )
    t = Target([sys.executable, "-c", code, str(f)], stderr=subprocess.DEVNULL)
    child = int(t.ready.split()[1])
    try:
        s = server()
        rc, _, err = migrate(t.pid, s.addr)
        assert rc == 1, err
        assert f"process {child}: fd 5 ({f}) holds a FLOCK write lock" in err, err  # (3, 4: the pipe)
        assert len(err.strip().splitlines()) == 1, err
        assert t.cmd("ping") == "still here ping"
    finally:
        t.close()
        os.kill(child, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)  # an orphan: ours, the server fixture making us a subreaper


REUSEPORT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", 0))
s.listen(4)
port = s.getsockname()[1]
print("ready", port, flush=True)
for line in sys.stdin:
    with socket.create_connection(("127.0.0.1", port)) as c:
        a, _ = s.accept()
        c.sendall(b"x")
        print("accepted", a.recv(1).decode(), flush=True)
        a.close()
"""


def test_listener_with_reuseport_migrates_to_loopback(tmp_path: Path, server: Callable[..., Server]) -> None:  # noqa: F811
    """SO_REUSEPORT lets the copy bind beside the original: not refused, and it listens on."""
    t = Target([sys.executable, "-c", REUSEPORT], stderr=subprocess.DEVNULL)
    try:
        assert t.cmd("go") == "accepted x"
        s = server()
        rc, _, err = migrate(t.pid, s.addr, "--policy", "rounds:2")
        assert rc == 0, err
        assert t.proc.wait(30) == -signal.SIGKILL
    finally:
        t.close()
    s.done()
    assert s.chan.cmd("go") == "accepted x"
