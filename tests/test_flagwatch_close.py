"""The flag counters' close (ckpt/proc/flagwatch.py, Closer): the kernel's unregister of their
tracepoints (~36 ms of sleep per tracepoint, one after another) happens in a closer that holds
copies of them, never in ckpt's own close, and the closer ends with ckpt's close or with ckpt.

The closer's `read` runs in a session of its own whose id is the shell's pid (Closer.pid); this
process is made a child subreaper, so that the `read` becomes its child once the shell has exited
and is reaped here, not by init."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ckpt.proc.flagwatch import FlagWatch
from tests.test_flagwatch import _watch_works
from tests.util import ROOT, subreaper_on, subreaper_restore

PERF = "anon_inode:[perf_event]"
KCMP, KCMP_FILE = 312, 0
DEADLINE = 60.0  # s: the closer's end (its exit waits for 6 RCU grace periods); only a bound
_libc = ctypes.CDLL(None, use_errno=True)


pytestmark = pytest.mark.skipif(not _watch_works(), reason="no syscall tracepoint counters here")


@pytest.fixture
def subreaper() -> Iterator[None]:
    was = subreaper_on()
    try:
        yield
    finally:
        subreaper_restore(was)


def _fds(pid: int, kind: str | None = None) -> list[int]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if kind is None or link == kind:
            out.append(int(name))
    return sorted(out)


def _same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    return int(_libc.syscall(KCMP, pid1, pid2, KCMP_FILE, fd1, fd2)) == 0


def _session(sid: int) -> list[int]:
    """The processes of session `sid`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                out.append(int(name))
    return out


def _wait_exit(pid: int) -> None:
    """Until `pid` (a child of this process) has exited, woken by its pidfd; then reaped."""
    fd = os.pidfd_open(pid)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(int(DEADLINE * 1000)), f"process {pid} did not end"
    finally:
        os.close(fd)
    os.waitpid(pid, 0)


def _reader(sh: int) -> int:
    """The closer's `read`, once its shell has exited (waited for, not reaped: Closer.release does)."""
    os.waitid(os.P_PID, sh, os.WEXITED | os.WNOWAIT)
    (reader,) = [p for p in _session(sh) if p != sh]
    return reader


def test_the_close_leaves_the_unregister_to_the_closer(subreaper: None) -> None:
    r, w = os.pipe()
    os.set_inheritable(r, True)  # one of a caller's: the closer must not keep it
    reader = sh = -1
    try:
        watch = FlagWatch(os.getpid(), [os.getpid()])
        try:
            (closer,) = watch._closers
            sh = closer.pid
            reader = _reader(sh)
            ours = _fds(os.getpid(), PERF)
            theirs = _fds(reader, PERF)
            # Copies of one thread's counters: one of each tracepoint (and the restart counter).
            assert len(theirs) == 6 and len(ours) == 6
            assert all(any(_same_file(os.getpid(), a, reader, b) for b in theirs) for a in ours)
            assert not any(_same_file(os.getpid(), r, reader, fd) for fd in _fds(reader))
            os.kill(reader, signal.SIGSTOP)  # it cannot end (nor close its copies) meanwhile
        finally:
            watch.close()
        # The close returned with the counters still open in the stopped closer: ckpt's close was
        # not the last, so the kernel's unregister was not its to wait for.
        assert _fds(os.getpid(), PERF) == []
        assert len(_fds(reader, PERF)) == 6
        with pytest.raises(ChildProcessError):  # the shell was reaped by the close
            os.waitid(os.P_PID, sh, os.WEXITED | os.WNOHANG)
    finally:
        os.close(r)
        os.close(w)
        if reader > 0:
            os.kill(reader, signal.SIGCONT)
            _wait_exit(reader)  # the pipe's write end is closed: it ends, closing them
    assert _session(sh) == []


CHILD = """
import os, sys
from ckpt.proc.flagwatch import FlagWatch
watch = FlagWatch(os.getpid(), [os.getpid()])
print(watch._closers[0].pid, flush=True)
sys.stdin.read()
"""


def test_a_killed_owner_takes_its_closer_with_it(subreaper: None) -> None:
    """ckpt killed (SIGKILL: no cleanup) while holding counters: the closer sees the pipe end and
    exits, closing its copies; nothing of it is left."""
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    try:
        assert p.stdout is not None
        sh = int(p.stdout.readline())
        _shell_exited(sh)  # (it forks the `read` first, which is then ours: we are a subreaper)
        (reader,) = [m for m in _session(sh) if m != sh]
        assert len(_fds(reader, PERF)) == 6
        p.kill()
        p.wait()
        _wait_exit(sh)  # (a zombie the child never reaped, ours since its death)
        _wait_exit(reader)
        assert _session(sh) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        assert p.stdout is not None
        p.stdout.close()
        assert p.stdin is not None
        p.stdin.close()


def _shell_exited(sh: int) -> None:
    """Until the closer's shell (a child of the test's child, which does not reap it) has exited,
    woken by its pidfd."""
    fd = os.pidfd_open(sh)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(int(DEADLINE * 1000)), f"the closer's shell {sh} did not end"
    finally:
        os.close(fd)
