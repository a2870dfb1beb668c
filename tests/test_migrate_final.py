"""The destination's final step in one run of injected code per kind of call (restore/blob.py):
signal actions and protections set in a blob the helper runs, not one ptrace round trip each.

Real migrations over loopback: the copy must be right afterwards (its output equal to an
uninterrupted run's, its memory equal to the source's at the final freeze, every signal's action
and mask as before) and exactly one copy may run. And the blob itself on a real restore helper:
results, buffers, runs cut to fit, a failing call named."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.image import Layer, MergedView
from ckpt.proc import read_maps
from ckpt.ptrace.batch import Call, Ref, Result
from ckpt.restore import blob
from ckpt.restore.helper import CODE_OFFSET, PAUSE_SYSCALL, STUB_BASE, kill_helper, spawn_helper
from ckpt.restore.layout import choose_areas
from ckpt.restore.memory import install_gadget
from ckpt.restore.remote import Remote
from tests.test_migrate import ENV, Server, migrate, server  # noqa: F401  (the fixture)
from tests.util import TARGETS, LineChannel, Target, build_c

PAGE = 4096
SIG_FIELDS = ("SigBlk", "SigIgn", "SigCgt")
SYS_CLOSE, SYS_DUP = 3, 32


def _sig_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (ln.split(":", 1) for ln in f) if k in SIG_FIELDS}


def _running_copies(exe: Path) -> set[int]:
    """Processes running `exe`, zombies left out."""
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/exe") != str(exe):
                continue
            with open(f"/proc/{name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
        except OSError:
            continue
        out.add(int(name))
    return out


def _read(pid: int, addr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


@pytest.fixture
def own_sigacts(tmp_path: Path) -> Iterator[tuple[Path, Callable[..., Target]]]:
    """sigacts started from a copy of this test's own: _running_copies counts the processes running
    an executable, and another test (the other xdist worker's) may run tests/targets' sigacts."""
    exe = tmp_path / "sigacts"
    shutil.copy2(build_c("sigacts"), exe)
    started: list[Target] = []

    def start(*args: str, **kw: object) -> Target:
        started.append(Target([str(exe), *args], **kw))  # type: ignore[arg-type]
        return started[-1]

    yield exe, start
    for t in started:
        t.close()


@pytest.mark.parametrize("warm", ["1", "0"], ids=["warm", "cold"])
def test_migrated_copy_is_the_process(
    own_sigacts: tuple[Path, Callable[..., Target]],
    server: Callable[..., Server],  # noqa: F811
    warm: str,
) -> None:
    """A C target with its own action for every signal, migrated mid-work: the copy's memory is the
    source's at the final freeze and the uninterrupted run's, its signal actions and masks are the
    original's, its output goes on as the uninterrupted run's, and only the copy runs."""
    npages = 2048
    exe, spawn = own_sigacts
    t: Target = spawn(str(npages), stderr=subprocess.DEVNULL)
    ref: Target = spawn(str(npages), stderr=subprocess.DEVNULL)
    for _ in range(3):
        assert t.cmd("round") == ref.cmd("round")
    acts, flags, status = t.cmd("acts"), t.cmd("flags"), _sig_status(t.pid)
    assert flags == ref.cmd("flags") and status == _sig_status(ref.pid)
    region = t.info()["region"]
    ref_region = ref.info()["region"]
    s = server(env=dict(ENV, CKPT_WARM_RESTORE=warm))
    rc, lines, err = migrate(t.pid, s.addr, "--policy", "rounds:2")
    assert rc == 0, err
    new = s.done()
    assert new == lines[-1]["pid"] and new != t.pid
    assert (s.last["warm"] is True) == (warm == "1")
    assert t.proc.wait(30) == -signal.SIGKILL
    assert _running_copies(exe) == {new, ref.pid}  # exactly one copy, beside the reference
    # The process is idle in read() since before the final freeze: its memory now is that moment's.
    top = sorted(s.dir.glob("layer-*.ckpt"))[-1]
    with MergedView(Layer.open(top)) as view:
        frozen = view.read(region, npages * PAGE)
    assert frozen == _read(new, region, npages * PAGE) == ref.read_mem(ref_region, npages * PAGE)
    mig = LineChannel(s.proc, 60)
    assert mig.cmd("acts") == acts and mig.cmd("flags") == flags and _sig_status(new) == status
    for sig in (12, 36, 38, 10, 15, 13):  # handlers (SA_SIGINFO, plain, SA_NODEFER) and ignored ones
        assert mig.cmd(f"raise {sig}") == ref.cmd(f"raise {sig}")
    for _ in range(2):
        assert mig.cmd("round") == ref.cmd("round")


def test_migrated_python_keeps_its_handlers(tmp_path: Path, server: Callable[..., Server]) -> None:  # noqa: F811
    """python3 mid-computation (it installs handlers of its own: SIGINT, SIGPIPE ignored...): the
    copy's signal state is the original's and its output the uninterrupted run's."""
    # compute.py ... stop: mid-computation however long the migration takes (a fixed 600 steps,
    # 10 ms apart, gave a loaded machine ~6 s for the server's start and the whole migration).
    script = TARGETS / "compute.py"
    ref_out, out = tmp_path / "ref.txt", tmp_path / "out.txt"
    p = subprocess.Popen([sys.executable, str(script), str(out), "stop"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    s = server()
    try:
        assert p.stdout is not None
        while p.stdout.readline() != "step 10\n":
            pass
        status = _sig_status(p.pid)
        rc, _, err = migrate(p.pid, s.addr, "--policy", "rounds:2")
        assert rc == 0, err
        assert p.wait(30) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()
        assert p.stdin is not None
        p.stdin.close()
    new = s.done()
    assert {k: v for k, v in _sig_status(new).items() if k != "SigBlk"} == {
        k: v for k, v in status.items() if k != "SigBlk"
    }
    rest: list[str] = list(s.other)  # the copy stops once it has shown a step of its own
    while not any(ln.startswith("step ") for ln in rest):
        rest.append(s.chan.readline())
    s.chan.send("stop")
    while not rest[-1].startswith("done "):
        rest.append(s.chan.readline())
    _, st = os.waitpid(new, 0)  # serve's orphan, so ours
    s.pid = None
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, st
    steps = rest[-1].split()[1]
    subprocess.run(
        [sys.executable, str(script), str(ref_out), steps], check=True, stdout=subprocess.DEVNULL, timeout=300
    )
    assert out.read_text() == ref_out.read_text(), f"the copy's result of {steps} steps differs"


def test_threads_ignoring_sigtrap_keep_ignoring_it(server: Callable[..., Server]) -> None:  # noqa: F811
    """python3 with three threads waiting in a barrier, SIGTRAP ignored: a single-stepped injection
    forces a SIGTRAP, which resets an ignored action to SIG_DFL; the copy must still ignore it (its
    threads' injections included), go on in lock step as an uninterrupted run, and run alone."""
    argv = [sys.executable, str(TARGETS / "trapthreads.py")]
    t = Target(argv, stderr=subprocess.DEVNULL)
    ref = Target(argv, stderr=subprocess.DEVNULL)
    try:
        for _ in range(3):
            assert t.cmd("step") == ref.cmd("step")
        status = _sig_status(t.pid)
        assert int(status["SigIgn"], 16) & 1 << (signal.SIGTRAP - 1)
        s = server()
        rc, _, err = migrate(t.pid, s.addr, "--policy", "rounds:2")
        assert rc == 0, err
        new = s.done()
        assert t.proc.wait(30) == -signal.SIGKILL
        assert len(os.listdir(f"/proc/{new}/task")) == 4
        assert _sig_status(new) == status
        mig = LineChannel(s.proc, 60)
        for _ in range(3):
            assert mig.cmd("step") == ref.cmd("step")
    finally:
        t.close()
        ref.close()


# -- the blob on a real restore helper -------------------------------------------------------------
@pytest.fixture
def helper() -> Iterator[Remote]:
    h = spawn_helper(None)
    r = Remote(h.pid, STUB_BASE + CODE_OFFSET + PAUSE_SYSCALL)
    try:
        yield r
    finally:
        r.close()
        kill_helper(h.pid)


def test_blob_runs_calls_in_order(helper: Remote) -> None:
    pid = helper.pid
    # Before the restore's own page is in place there is no room for code: one by one, same results.
    assert blob.run(helper, [Call(nr.GETPID)]) == [Result(pid)]
    install_gadget(helper, choose_areas(read_maps(pid), []))
    before = helper.count
    act = struct.pack("<QQQQ", 1, 0x04000000, 0, 1 << 9)  # SIG_IGN, SA_RESTORER, SIGUSR1 masked
    calls = [Call(nr.GETPID) for _ in range(100)]  # more than one run's code holds: cut in runs
    calls += [Call(nr.RT_SIGACTION, (12, 0, 0, 8), out_arg=1, inp=act)]
    calls += [Call(nr.RT_SIGACTION, (12, 0, 0, 8), out=32, out_arg=2)]  # read it back
    calls += [Call(SYS_DUP, (2,)), Call(SYS_CLOSE, (Ref(len(calls)),))]  # close what dup gave
    got = blob.run(helper, calls)
    assert [r.ret for r in got[:100]] == [pid] * 100
    assert got[100].ret == 0 and got[101].data == act
    assert got[102].ret >= 0 and got[103].ret == 0
    assert helper.count == before + len(calls)
    assert int(_sig_status(pid)["SigIgn"], 16) & 1 << 11
    # A plain injected syscall still works after a blob (its end signal was dropped, not delivered).
    assert helper.syscall(nr.GETPID) == pid
    with open(f"/proc/{pid}/status") as f:
        assert next(ln for ln in f if ln.startswith("SigPnd")).split()[1] == "0" * 16


def test_blob_names_the_call_that_failed(helper: Remote) -> None:
    install_gadget(helper, choose_areas(read_maps(helper.pid), []))
    with pytest.raises(RestoreError, match=r"closing fd 999 failed in the restored process: .*EBADF"):
        blob.check_all(
            helper, [("getting the pid", Call(nr.GETPID)), ("closing fd 999", Call(SYS_CLOSE, (999,)))]
        )
