"""A leave-stopped thaw of a process that was stopped when frozen, whose SIGCONT comes while the thaw
brings back a thread an injection left running (Frozen._release: the re-stop before the SIGSTOP is
decided): the process is left stopped all the same, continued_meanwhile says the SIGCONT came, and the
thaw's `before_stop` is told before its SIGSTOP (a tree's thaw names the member so: an aborted
migration continues it). Before, the SIGCONT was looked for only before that re-stop: none seen, no
SIGSTOP, and the SIGCONT, given back at the detach, continued the process (a migration's source
running while its destination restores).

Reached for real, not by a race: an injected openat held inside the kernel by a fanotify permission
event the test answers (as in tests/test_step_trap_thaw.py). Both of the injection's waits give up
while the thread is in there (its re-stop's PTRACE_INTERRUPT does not wake a killable wait): the
injection fails "stuck", the thread left running. The thaw's re-stop wait sends the SIGCONT and only
then answers (deny), so the SIGCONT comes after the thaw's first look for one; the thread stops at
the syscall's exit."""

from __future__ import annotations

import os
import select
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt import sysno
from ckpt.errors import InjectionError
from ckpt.ptrace import Frozen, raw
from tests.test_leave_stopped_cont import _target
from tests.test_step_trap_thaw import AT_FDCWD, EVENT, FAN_DENY, FAN_OPEN_PERM, _open_gate
from tests.util import Target

# Their stand-in waits (Frozen._wait) play the stops out: all of them through Python.
pytestmark = pytest.mark.usefixtures("python_stops")

Spawn = Callable[..., Target]
WAIT = 60.0


def test_a_sigcont_met_by_the_thaws_restop_leaves_it_stopped(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    t = _target(spawn, stopped=True)
    gate = tmp_path / "gate"
    gate.write_bytes(b"")
    real_wait = Frozen._wait
    seen: dict[str, object] = {"phase": None}

    with _open_gate(gate) as fan:

        def wait(self: Frozen, tid: int, timeout: float) -> raw.WaitResult | None:
            phase = seen["phase"]
            if phase == "entering":  # up to the syscall-entry stop of the injected openat
                w = real_wait(self, tid, timeout)
                if w is not None and w.is_syscall_stop:
                    seen["phase"] = "inside"
                return w
            if phase == "inside":  # resumed into openat: held there by the permission event
                assert select.select([fan], [], [], WAIT)[0], "no permission event"
                _, _, _, _, mask, efd, pid = EVENT.unpack_from(os.read(fan, 4096))
                assert mask & FAN_OPEN_PERM and pid == tid
                seen["event"], seen["phase"] = efd, "restop"
                return None
            if phase == "restop":  # the injection's re-stop: its interrupt set, the thread still in
                seen["phase"] = "stuck"
                return None
            if phase == "thaw":  # the thaw's re-stop: its first look for a SIGCONT is over
                seen["phase"] = None
                os.kill(self.pid, signal.SIGCONT)
                efd = int(seen["event"])  # type: ignore[call-overload]
                os.write(fan, struct.pack("<iI", efd, FAN_DENY))
                os.close(efd)
            return real_wait(self, tid, timeout)

        monkeypatch.setattr(Frozen, "_wait", wait)
        told: list[int] = []
        with Frozen(t.pid) as fz:
            assert fz.was_stopped
            path = fz.scratch(256)
            fz.write_mem(path, bytes(gate) + b"\0")
            seen["phase"] = "entering"
            with pytest.raises(InjectionError, match="stuck"):
                fz.syscall(sysno.OPENAT, AT_FDCWD, path, os.O_RDONLY)
            assert seen["phase"] == "stuck"
            seen["phase"] = "thaw"
            fz.thaw(leave_stopped=True, before_stop=lambda: told.append(t.pid))
            assert seen["phase"] is None, "the thaw did not re-stop the thread"
            assert fz.continued_meanwhile, "the SIGCONT met by the thaw's re-stop was not seen"
            assert told == [t.pid], "the thaw stopped the process without saying so first"
    _, st = os.waitpid(t.pid, os.WUNTRACED)  # stopped again by the thaw's SIGSTOP
    assert os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGSTOP
    os.kill(t.pid, signal.SIGCONT)  # the handler runs once, for this SIGCONT (the freeze's discarded)
    assert t.readline() == "resumed conts 1 value 5"
    assert t.cmd("ping") == "pong conts 1 value 5"
