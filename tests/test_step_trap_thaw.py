"""The thaw takes off a single-step's forced SIGTRAP still queued behind a stop (Frozen._take_step_trap),
reached for real: an injected one-stop syscall (inject.step_over_syscall) whose both waits give up
while the thread is inside the syscall, held there by a fanotify permission event the test answers.

The order is the kernel's, not a race: the step's wait gives up once the permission event shows the
thread inside openat; the re-stop's PTRACE_INTERRUPT is set before the test answers (deny), so at the
syscall's exit the interrupt-stop comes before the forced SIGTRAP is dequeued (get_signal takes the
pending traps first). The re-stop's wait gives up too, that stop reported but not taken: the injection
fails "stuck", and the thaw finds the thread stopped with the step's SIGTRAP queued (and its own
PTRACE_INTERRUPT queued behind that stop: another trap after it). Given to the target, SIG_DFL would
kill it, a handler would count it."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ckpt import sysno
from ckpt.errors import InjectionError
from ckpt.ptrace import Frozen, inject, raw
from tests.util import Target

# Their stand-in waits (Frozen._wait) play the stops out: all of them through Python.
pytestmark = pytest.mark.usefixtures("python_stops")

Spawn = Callable[..., Target]
BIT = 1 << (signal.SIGTRAP - 1)
FAN_CLOEXEC, FAN_CLASS_CONTENT, FAN_MARK_ADD, FAN_OPEN_PERM, FAN_DENY = 0x1, 0x4, 0x1, 0x10000, 0x2
AT_FDCWD = -100
EVENT = struct.Struct("<IBBHQii")  # struct fanotify_event_metadata
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def _open_gate(path: Path) -> Iterator[int]:
    """A fanotify group asking permission for every open of ``path``; closing it lets any open
    still waiting go on (nothing is left behind)."""
    fd = _libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY)
    if fd < 0:
        pytest.skip(f"fanotify permission events: {os.strerror(ctypes.get_errno())}")
    try:
        if _libc.fanotify_mark(fd, FAN_MARK_ADD, ctypes.c_uint64(FAN_OPEN_PERM), AT_FDCWD, bytes(path)) < 0:
            pytest.skip(f"fanotify_mark: {os.strerror(ctypes.get_errno())}")
        yield fd
    finally:
        os.close(fd)


def _signals(pid: int) -> dict[int, tuple[str, ...]]:
    keys = ("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd")
    out = {}
    for t in sorted(map(int, os.listdir(f"/proc/{pid}/task"))):
        with open(f"/proc/{pid}/task/{t}/status") as f:
            st = {k: v.strip() for k, _, v in (ln.partition(":") for ln in f)}
        out[t] = tuple(st[k] for k in keys)
    return out


@pytest.mark.parametrize("mode", ["dfl", "handler"])
def test_thaw_takes_off_the_step_trap_left_queued(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str
) -> None:
    t = spawn("traps", mode)
    before = _signals(t.pid)
    gate = tmp_path / "gate"
    gate.write_bytes(b"")
    real_wait, real_take = Frozen._wait, Frozen._take_step_trap
    seen: dict[str, object] = {"waits": 0}

    with _open_gate(gate) as fan:

        def wait(self: Frozen, tid: int, timeout: float) -> raw.WaitResult | None:
            n = seen["waits"]
            if n == 1:  # the step's: the thread is inside openat once the event is read
                _, _, _, _, mask, efd, pid = EVENT.unpack_from(os.read(fan, 4096))
                assert mask & FAN_OPEN_PERM and pid == tid
                seen["event"], seen["waits"] = efd, 2
                return None
            if n == 2:  # the re-stop's: its PTRACE_INTERRUPT is set; the open may end now
                efd = int(seen["event"])  # type: ignore[call-overload]
                os.write(fan, struct.pack("<iI", efd, FAN_DENY))
                os.close(efd)
                os.waitid(os.P_PID, tid, os.WSTOPPED | os.WNOWAIT)  # its stop reported, not taken
                seen["waits"] = 3
                return None
            return real_wait(self, tid, timeout)

        def take(self: Frozen, th: object) -> None:
            tid = th.tid  # type: ignore[attr-defined]
            seen["queued"] = bool(inject.pending_signals(self.pid, tid) & BIT)
            real_take(self, th)  # type: ignore[arg-type]
            seen["left"] = bool(inject.pending_signals(self.pid, tid) & BIT)

        monkeypatch.setattr(Frozen, "_wait", wait)
        monkeypatch.setattr(Frozen, "_take_step_trap", take)
        with Frozen(t.pid) as f:
            path = f.scratch(256)
            f.write_mem(path, bytes(gate) + b"\0")
            seen["waits"] = 1
            with pytest.raises(InjectionError, match="stuck"):
                f.syscall(sysno.OPENAT, AT_FDCWD, path, os.O_RDONLY, quick=True)
            assert seen["waits"] == 3
    assert seen.get("queued") is True, "the thaw did not meet the step's SIGTRAP queued"
    assert seen["left"] is False
    assert t.cmd("count") == "trap 0 code 0 early 0"
    assert _signals(t.pid) == before
    assert t.state() in ("S", "R")
