"""`ckpt restore` through a `ckpt service` (ckpt/restore/caller.py): the client starts the helper
as its own child and the service's child restores into it, so the restored process is the client's
child, in its process group and session, exactly as in-process; what cannot be that runs in-process.

Real services (tests/test_service.py's), real restores of tests/targets/rounds.c; each test reads the
service's --json log to know which path a request took.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.image import STATE_DATA, find_layers, open_layer
from ckpt.restore.helper import IN_USE
from ckpt.stubelf import EXE_LINK
from tests.test_service import ENV, WAIT, Service, ckpt
from tests.util import ROOT, LineChannel, Target


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    s = Service(tmp_path / "svc" / "sock")
    try:
        yield s
        if s.proc.poll() is None:
            assert s.reaped()
    finally:
        if s.proc.poll() is None:
            s.stop()
        else:
            for f in (s.proc.stdout, s.proc.stderr):
                if f:
                    f.close()


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (ln.partition(":") for ln in f)}


def _our_children() -> set[int]:
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            out |= {int(p) for p in f.read().split()}
    return out


def _dumped(tmp_path: Path, spawn: Callable[..., Target], svc: Service) -> tuple[Path, str, int]:
    """A rounds target after a round, dumped with --kill (through the service): layer, sum, pid."""
    t = spawn("rounds", "64")
    assert t.cmd("round").startswith("round 1 ")
    want = t.sum()
    d = tmp_path / "d"
    r = ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--kill", "--json", service=svc)
    assert r.returncode == 0, r.stderr
    assert svc.next()["outcome"] == "ran"
    assert t.proc.wait(WAIT) == -signal.SIGKILL
    (layer,) = find_layers(d)
    return layer, want, t.pid


def _restore(layer: Path, svc: Service | None, *extra: str, **kw: object) -> subprocess.Popen[bytes]:
    env = dict(ENV, **kw.pop("env", {}))  # type: ignore[arg-type]
    env.pop("CKPT_SERVICE", None)
    if svc is not None:
        env["CKPT_SERVICE"] = str(svc.sock)
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "ckpt", "restore", str(layer), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, cwd=ROOT,
        env=env, **kw,
    )  # fmt: skip


def _finish(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
        p.wait(WAIT)
    for f in (p.stdin, p.stdout, p.stderr):
        if f:
            f.close()


def test_the_restored_process_is_the_clients_child(
    tmp_path: Path, spawn: Callable[..., Target], svc: Service
) -> None:
    """Without --detach: the process is the client's child, in its group and session, with its
    memory; its exit status is the client's; the client's SIGTERM reaches it."""
    layer, want, dumped = _dumped(tmp_path, spawn, svc)
    p = _restore(layer, svc)
    try:
        chan = LineChannel(p, WAIT)
        pid = int(chan.cmd("info").split()[1])
        assert pid == dumped  # kept, as in-process
        st = _status(pid)
        assert (int(st["PPid"]), st["TracerPid"]) == (p.pid, "0")
        assert (os.getpgid(pid), os.getsid(pid)) == (os.getpgid(p.pid), os.getsid(p.pid))
        assert chan.cmd("sum") == f"sum {want}"
        # The service's child ended once the client stood in for the process (its "w"): from here
        # on, what the client gets is the process's.
        log = svc.next()
        assert (log["outcome"], log["status"]) == ("ran", "X0"), log
        assert svc.children() == []
        os.kill(p.pid, signal.SIGINT)  # ignored while it waits, as `ckpt restore` does
        assert chan.cmd("round").startswith("round 2 ")
        chan.send("exit 7")
        assert p.wait(WAIT) == 7
        assert p.stderr is not None and p.stderr.read() == b""
    finally:
        _finish(p)
    # Again, ended by a SIGTERM to the client: passed on, and 128 + 15 as in-process.
    d2 = tmp_path / "d2"
    spawn_again = spawn("rounds", "16")
    r = ckpt("dump", "--pid", str(spawn_again.pid), "-D", str(d2), "--kill", service=svc)
    assert r.returncode == 0, r.stderr
    svc.next()
    spawn_again.proc.wait(WAIT)
    (layer2,) = find_layers(d2)
    p = _restore(layer2, svc)
    try:
        chan = LineChannel(p, WAIT)
        assert chan.cmd("round").startswith("round 1 ")
        assert svc.next()["status"] == "X0"  # (the client is waiting for its child now)
        p.send_signal(signal.SIGTERM)
        assert p.wait(WAIT) == 128 + signal.SIGTERM
    finally:
        _finish(p)


def test_detach_prints_the_pid_and_leaves_it_running(
    tmp_path: Path, spawn: Callable[..., Target], svc: Service, subreaper: list[int]
) -> None:
    layer, want, dumped = _dumped(tmp_path, spawn, svc)
    p = _restore(layer, svc, "--detach")
    try:
        chan = LineChannel(p, WAIT)
        pid = int(chan.readline())
        subreaper.append(pid)
        assert pid == dumped
        assert p.wait(WAIT) == 0
        assert p.stderr is not None and p.stderr.read() == b""
        log = svc.next()
        assert (log["outcome"], log["status"]) == ("ran", "X0"), log
        # The client's child until it exited; then its caller's subreaper's (ours), untraced.
        st = _status(pid)
        assert (int(st["PPid"]), st["TracerPid"]) == (os.getpid(), "0")
        assert (os.getpgid(pid), os.getsid(pid)) == (os.getpgrp(), os.getsid(0))  # the client's were ours
        assert chan.cmd("sum") == f"sum {want}"
        # The dumped pid is taken now: a second restore, in-process and through the service, says
        # the same line of why it was not kept (the same code asked the same question).
        lines = []
        for where in (None, svc):
            q = _restore(layer, where, "--detach")
            try:
                other = int(LineChannel(q, WAIT).readline())
                subreaper.append(other)
                assert q.wait(WAIT) == 0 and other != pid
                assert q.stderr is not None
                lines.append(q.stderr.read().decode().replace(str(other), "N"))
            finally:
                _finish(q)
        assert svc.next()["status"] == "X0"
        assert lines[0] == lines[1] == f"ckpt: restored as pid N (pid {pid} could not be kept: {IN_USE})\n"
    finally:
        _finish(p)


def test_a_stopped_process_says_the_same(
    tmp_path: Path, spawn: Callable[..., Target], svc: Service, subreaper: list[int]
) -> None:
    """A process dumped stopped comes back stopped: the lines `ckpt restore --detach` says of it
    (restore/jobstop.py, which judges the group as the `ckpt` process that exits will leave it)
    are the same through the service."""
    t = spawn("rounds", "16")
    os.kill(t.pid, signal.SIGSTOP)
    assert t.stopped_state() == "T"
    d = tmp_path / "d"
    r = ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--kill")
    assert r.returncode == 0, r.stderr
    t.proc.wait(WAIT)
    (layer,) = find_layers(d)
    got = []
    for where in (None, svc):
        p = _restore(layer, where, "--detach")
        pid = t.pid
        try:
            assert int(LineChannel(p, WAIT).readline()) == pid
            assert p.wait(WAIT) == 0
            assert p.stderr is not None
            got.append(p.stderr.read().decode())
            assert _status(pid)["State"][0] == "T"
        finally:
            _finish(p)
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)  # (ours: the subreaper)
    assert svc.next()["status"] == "X0"
    assert got[0] == got[1] and got[0].startswith(f"ckpt: process {t.pid} left stopped (SIGSTOP)"), got


def _corrupt(layer: Path) -> None:
    """One byte of a chunk of the layer's pages flipped: found by the fill, the helper running."""
    with open_layer(layer) as v:
        pt = v.page_table()
        top = v.layers[-1]
        idx = pt.index[(pt.layer == len(v.layers) - 1) & (pt.state == STATE_DATA)]
        chunk = top.pages.chunks[int(top.chunk_of(idx[len(idx) // 2]))]
        path = top.path
    data = bytearray(path.read_bytes())
    data[chunk.offset + chunk.clen // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_layer_says_the_same_and_leaves_no_helper(
    tmp_path: Path, spawn: Callable[..., Target], svc: Service, subreaper: list[int]
) -> None:
    layer, _, dumped = _dumped(tmp_path, spawn, svc)
    _corrupt(layer)
    before = _our_children()
    here = ckpt("restore", str(layer))
    there = ckpt("restore", str(layer), service=svc)
    log = svc.next()
    assert (log["outcome"], log["status"]) == ("ran", "X1"), log
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)
    assert here.returncode == 1 and "corrupt" in here.stderr and here.stderr.count("\n") == 1
    # No helper left behind: a stray one would have come to us (the subreaper) or kept the pid.
    assert _our_children() == before
    assert not os.path.exists(f"/proc/{dumped}")


_HOSTILE = """
import os, sys, _socket
from ckpt import client
how, argv = sys.argv[1], sys.argv[2:]
fds = client.inherited_fds()
cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
s.connect(os.environ["CKPT_SERVICE"])
passed = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (cwd, *fds))
s.sendmsg([client.request(argv, fds)], [(1, 1, passed)])
answer, anc, _, _ = s.recvmsg(64, _socket.CMSG_SPACE(4))
assert answer[:1] == b"P" and anc, answer
chan = _socket.socket(fileno=int.from_bytes(anc[0][2][:4], sys.byteorder))
assert chan.recv(64)[:1] == b"H"
own = os.posix_spawn("/bin/sleep", ["sleep", "1000"], {})  # a child of ours, not the stub
if how == "other":  # another process (the test's), not our child
    victim = named = int(os.environ["VICTIM"])
elif how == "own":
    victim = named = own
else:  # "liar": the pidfd of one, the pid of another
    victim, named = own, int(os.environ["VICTIM"])
pidfd = os.pidfd_open(victim)
if how == "proxy":  # the answer sent by another process than the client (its child): a real stub's
    from ckpt.stubelf import run_stub

    sender = os.fork()
    if sender == 0:
        helper, _ = run_stub(0)
        chan.sendmsg([b"h%d" % helper], [(1, 1, os.pidfd_open(helper).to_bytes(4, sys.byteorder))])
        os.waitpid(helper, 0)  # (killed by the service's refusal? no: it is left as it was)
        os._exit(0)
else:
    chan.sendmsg([b"h%d" % named], [(1, 1, pidfd.to_bytes(4, sys.byteorder))])
status = s.recv(64).decode()
if how == "proxy":
    os.kill(sender, 0)  # (still there: its helper waits in pause())
    for line in open(f"/proc/{sender}/task/{sender}/children").read().split():
        os.kill(int(line), 9)
    os.waitpid(sender, 0)
st = open(f"/proc/{own}/status").read()
os.kill(own, 9)
os.waitpid(own, 0)
print(status, "TracerPid:\\t0" in st)
"""


@pytest.mark.parametrize("how", ["other", "own", "liar", "proxy"])
def test_a_hostile_pidfd_is_refused(
    tmp_path: Path, spawn: Callable[..., Target], svc: Service, how: str
) -> None:
    """The service seizes only the stub's child its client just started: a pidfd of another
    process (the test's target), of the client's own child that is not the stub, of one process
    named as another, or a real stub's sent by another process than the client (its child, with
    the channel inherited: SCM_CREDENTIALS) is refused with one line; the process is left as it was."""
    layer, _, _ = _dumped(tmp_path, spawn, svc)
    victim = spawn("rounds", "16")
    env = dict(ENV, CKPT_SERVICE=str(svc.sock), VICTIM=str(victim.pid))
    r = subprocess.run([sys.executable, "-c", _HOSTILE, how, "restore", str(layer)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=WAIT)  # fmt: skip
    assert r.stdout == "X1 True\n", r.stderr
    why = {
        "other": f"its parent is {os.getpid()}, not the client",
        "own": "it runs /usr/bin/sleep, not the restore helper's program",
        "liar": "the descriptor passed is not a pidfd of that process",
        "proxy": "ckpt: the restore helper's start was answered by pid ",
    }[how]
    if how != "proxy":
        assert r.stderr.startswith("ckpt: the restore helper the client gave (pid "), r.stderr
    assert why in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert svc.next()["status"] == "X1"
    st = _status(victim.pid)
    assert st["TracerPid"] == "0" and st["State"][0] == "S"
    assert victim.cmd("round").startswith("round 1 ")


def test_a_service_killed_mid_restore_leaves_no_helper(
    tmp_path: Path, spawn: Callable[..., Target], svc: Service, subreaper: list[int]
) -> None:
    """The service SIGKILLed with the helper seized: its child dies with it (PR_SET_PDEATHSIG), the
    helper with the child (PTRACE_O_EXITKILL); the client says one line, exits 70, reaps it."""
    layer, _, _ = _dumped(tmp_path, spawn, svc)
    before = _our_children()
    ours, theirs = socket.socketpair()
    p = _restore(layer, svc, env={"CKPT_RESTORE_TEST_HOLD_FD": str(theirs.fileno())},
                 pass_fds=(theirs.fileno(),))  # fmt: skip
    theirs.close()
    try:
        with ours.makefile("rb") as held:
            word, pid = held.readline().split()
        assert word == b"seized"
        helper = int(pid)
        st = _status(helper)
        assert int(st["PPid"]) == p.pid  # the client's child, traced by (a thread of) the service's
        assert _status(int(st["TracerPid"]))["Tgid"] in svc.children()
        pidfd = os.pidfd_open(helper)
        [child] = map(int, svc.children())
        svc.proc.kill()
        svc.proc.wait(WAIT)
        _, err = p.communicate(timeout=WAIT)
        assert select.select([pidfd], [], [], WAIT)[0] == [pidfd]  # the helper ended
        with pytest.raises(ProcessLookupError):  # and was reaped (by the client, its parent)
            signal.pidfd_send_signal(pidfd, 0)
        os.close(pidfd)
    finally:
        ours.close()
        _finish(p)
    assert (p.returncode, err.decode()) == (
        70, f"ckpt: service {svc.sock}: closed the connection before the command's status\n"
    )
    # The service's child came to us (the subreaper) as the service died, and was killed at once.
    assert os.waitpid(child, 0)[1] == signal.SIGKILL
    assert _our_children() == before - {svc.proc.pid}
    svc.sock.unlink()


def test_a_tree_runs_in_process(
    tmp_path: Path, svc: Service, subreaper: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process tree (its members forked from each other's helpers inside the restoring ckpt): the
    service's child finds it in the layer and sends it back; the client restores it itself, as
    in-process, silently (tests/test_restore_tree.py's tree, its own checks)."""
    from tests import test_restore_tree
    from tests.test_restore_tree import _check_restored_tree, _dump, _reap, _start_tree

    proc, pids = _start_tree(subreaper)
    out = _dump(pids[0], tmp_path / "d", "--kill")
    proc.wait(WAIT)
    _reap(subreaper)
    layer = Path(str(out["layer"]))
    monkeypatch.setitem(test_restore_tree.ENV, "CKPT_SERVICE", str(svc.sock))  # its `ckpt restore`'s
    _check_restored_tree(layer, pids, subreaper)
    log = svc.next()
    assert (log["outcome"], log["why"]) == ("in-process", "a process tree"), log


def _interrupted(layer: Path, svc: Service | None) -> tuple[int, str, int]:
    """`ckpt restore` held with its helper seized, then a Ctrl-C (SIGINT to the `ckpt` process):
    its status and stderr, and the helper's pid (gone: reaped, never let go)."""
    ours, theirs = socket.socketpair()
    p = _restore(layer, svc, env={"CKPT_RESTORE_TEST_HOLD_FD": str(theirs.fileno())},
                 pass_fds=(theirs.fileno(),))  # fmt: skip
    theirs.close()
    try:
        with ours.makefile("rb") as held:
            word, pid = held.readline().split()
        assert word == b"seized"
        pidfd = os.pidfd_open(int(pid))
        p.send_signal(signal.SIGINT)  # the hold ends as the restore is cancelled (restore/cancel.py)
        out, err = p.communicate(timeout=WAIT)
        assert out == b""
        with pytest.raises(ProcessLookupError):  # killed and reaped
            signal.pidfd_send_signal(pidfd, 0)
        os.close(pidfd)
    finally:
        ours.close()
        _finish(p)
    return p.returncode, err.decode(), int(pid)


def test_ctrl_c_mid_restore_leaves_no_process(
    tmp_path: Path, spawn: Callable[..., Target], svc: Service, subreaper: list[int]
) -> None:
    """A Ctrl-C with the helper seized: "interrupted", 130, and no process left, in-process and
    through the service alike (in-process used to finish the restore after saying "interrupted",
    leaving a process running that nobody waited for)."""
    layer, _, dumped = _dumped(tmp_path, spawn, svc)
    before = _our_children()
    here = _interrupted(layer, None)
    there = _interrupted(layer, svc)
    assert here[:2] == there[:2] == (130, "ckpt: interrupted\n")
    assert here[2] == there[2] == dumped
    assert svc.next()["status"] == "X130"
    assert _our_children() == before  # (a process let go would have come to us, the subreaper)


def test_pidns_runs_in_process(tmp_path: Path, svc: Service) -> None:
    here = ckpt("restore", "--pidns", str(tmp_path / "none"))
    there = ckpt("restore", "--pidns", str(tmp_path / "none"), service=svc)
    log = svc.next()
    assert (log["outcome"], log["why"]) == (
        "in-process", "restore --pidns or --inherit-fd depends on its caller's process"
    )
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)


def test_a_missing_layer_says_the_same(tmp_path: Path, svc: Service) -> None:
    here = ckpt("restore", str(tmp_path / "none"))
    there = ckpt("restore", str(tmp_path / "none"), service=svc)
    assert svc.next()["outcome"] == "ran"
    assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)
    assert here.returncode != 0 and here.stderr.count("\n") == 1


def test_the_stub_is_the_restorers() -> None:
    """The client's stub (ckpt/stubelf.py) is byte for byte the one a restore in-process runs."""
    from ckpt.restore import helper
    from ckpt.stubelf import stub_elf

    assert helper.stub_elf(1234, 7) == stub_elf(1234, 7)
    assert EXE_LINK == "/memfd:ckpt-restore-helper (deleted)"


def _ignore_sigchld() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # (the client's children are reaped as they end)


def test_a_pid_given_again_before_the_seize_is_not_killed(
    tmp_path: Path, spawn: Callable[..., Target], svc: Service
) -> None:
    """The service checks the client's helper through its pidfd, but the seize names a pid. A client
    that ignores SIGCHLD has its helper reaped as it dies, and the pid may be another process's by
    the seize: that process (here already traced, so the seize fails) is left alone, by the
    service's child and by the client's cleanup alike (both used to SIGKILL the pid)."""
    from ckpt.ptrace import raw
    from ckpt.stubelf import run_stub

    layer, _, dumped = _dumped(tmp_path, spawn, svc)
    ours, theirs = socket.socketpair()
    env = {"CKPT_RESTORE_TEST_HOLD_FD": str(theirs.fileno()), "CKPT_RESTORE_TEST_HOLD_AT": "checked"}
    p = _restore(layer, svc, env=env, pass_fds=(theirs.fileno(),), preexec_fn=_ignore_sigchld)
    theirs.close()
    victim = -1
    try:
        with ours.makefile("rb") as held:
            word, pid = held.readline().split()
        assert word == b"checked" and int(pid) == dumped
        helper = os.pidfd_open(dumped)
        signal.pidfd_send_signal(helper, signal.SIGKILL)
        assert select.select([helper], [], [], WAIT)[0] == [helper]
        # Reaped by the kernel at its exit (SIGCHLD ignored): the pid is free a moment after the
        # pidfd says it ended (no event says when: clone3 answers EEXIST until then).
        for _ in range(1000000):
            victim, why = run_stub(dumped)
            assert why == ""
            if victim != -17:  # (-EEXIST)
                break
        os.close(helper)
        assert victim == dumped  # our child now, at the pid the service checked and will seize
        raw.seize(victim)  # traced: the service's seize fails
        ours.send(b"x")
        out, err = p.communicate(timeout=WAIT)
    finally:
        ours.close()
        _finish(p)
    try:
        assert (p.returncode, out) == (1, b"")
        line = err.decode()
        assert line.startswith(f"ckpt: cannot take the restore helper {dumped} under ptrace: "), line
        assert line.endswith("Operation not permitted\n") and line.count("\n") == 1, line
        assert svc.next()["status"] == "X1"
        st = _status(victim)  # alive, not killed by pid, ours still
        assert st["State"][0] in "SRt" and int(st["TracerPid"]) == os.getpid()
    finally:
        if victim > 0:
            os.kill(victim, signal.SIGKILL)
            os.waitpid(victim, 0)
