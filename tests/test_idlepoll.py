"""Idle CPUs poll while a target is frozen (ckpt/idlepoll.py, issue 9 part 2): a freeze holds a CPU
latency request of 0 on /dev/cpu_dma_latency from prepare() to the end of its thaw, and never after,
however the freeze ends (thawed, a target that exits, a refused or disabled one). The kernel's own
reading of the device says the request is in force. Two workers run tests at once, so a test asserts
what its own request does (the least of all requests is 0 while it is held) and that ckpt holds no
open request afterwards, never the value another worker's freeze may be holding."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt import idlepoll
from ckpt.dump import dump
from ckpt.errors import TargetExited
from ckpt.ptrace import Frozen
from tests.util import Target

Spawn = Callable[..., Target]

pytestmark = pytest.mark.skipif(idlepoll.current() is None, reason="no /dev/cpu_dma_latency to read here")


def held() -> int:
    """How many CPU latency requests this process holds open."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the directory's own fd, closed by now)
            n += os.readlink(f"/proc/self/fd/{fd}") == idlepoll.DEVICE
    return n


@pytest.fixture(autouse=True)
def asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idlepoll, "ENABLED", None)
    monkeypatch.delenv("CKPT_IDLE_POLL", raising=False)


def test_held_from_prepare_to_thaw(spawn: Spawn) -> None:
    t = spawn("sigstate")
    assert held() == 0
    fz = Frozen(t.pid)
    fz.prepare()
    try:
        assert held() == 1 and idlepoll.current() == 0  # before the clock starts: the freeze pays nothing
        fz.freeze()
        assert held() == 1 and idlepoll.current() == 0
    finally:
        fz.thaw()
    assert held() == 0
    assert t.cmd("ping") == "pong"


def test_a_prepared_freeze_thawed_lets_go(spawn: Spawn) -> None:
    t = spawn("sigstate")
    fz = Frozen(t.pid)
    fz.prepare()
    assert held() == 1
    fz.thaw()
    assert held() == 0


def test_a_target_gone_before_the_seize_lets_go(spawn: Spawn) -> None:
    t = spawn("sigstate")
    fz = Frozen(t.pid)
    fz.prepare()
    assert held() == 1
    os.kill(t.pid, signal.SIGKILL)
    t.proc.wait(10)
    with pytest.raises(TargetExited):
        fz.freeze()
    assert held() == 0


def test_a_refused_target_asks_nothing(spawn: Spawn) -> None:
    """prepare() refuses before it asks: a target traced by someone else (here: by ckpt itself)."""
    t = spawn("sigstate")
    with Frozen(t.pid):
        assert held() == 1
        with pytest.raises(Exception, match="already being traced"):
            Frozen(t.pid).prepare()
        assert held() == 1
    assert held() == 0


@pytest.mark.parametrize("mode", ["0", "1", ""])
def test_by_mode(spawn: Spawn, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """CKPT_IDLE_POLL=0 never asks; 1 or unset asks."""
    if mode:
        monkeypatch.setenv("CKPT_IDLE_POLL", mode)
    t = spawn("sigstate")
    with Frozen(t.pid):
        assert held() == (0 if mode == "0" else 1)
    assert held() == 0


def test_no_device_changes_nothing(spawn: Spawn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(idlepoll, "DEVICE", str(tmp_path / "no-such-device"))
    t = spawn("sigstate")
    with Frozen(t.pid) as fz:
        assert fz._idle is None
    assert t.cmd("ping") == "pong"


def test_a_dump_holds_it_while_frozen_only(spawn: Spawn, tmp_path: Path) -> None:
    """Through the API (the dump freezes in a thread of its own): held at every frozen step, let go
    by the end; the layers as ever."""
    t = spawn("memtarget", "64")
    seen: dict[str, tuple[int, int | None]] = {}

    def lap(name: str) -> None:
        seen[name] = (held(), idlepoll.current())

    dump(t.pid, tmp_path, track="uffd-wp", on_lap=lap)
    assert t.cmd("write 5") == "ok"
    r = dump(t.pid, tmp_path, incremental=True, track="uffd-wp", on_lap=lap)
    assert r.pages_dirty >= 1
    frozen = {k: v for k, v in seen.items() if k.startswith("frozen: ") and k != "frozen: thaw"}
    assert frozen and all(v == (1, 0) for v in frozen.values()), frozen
    assert held() == 0
    assert t.sum()


def test_held_requests_are_not_inherited(spawn: Spawn) -> None:
    """O_CLOEXEC: a program ckpt starts while frozen (a hook) holds no request of ckpt's."""
    t = spawn("sigstate")
    with Frozen(t.pid) as fz:
        assert fz._idle is not None
        assert fcntl.fcntl(fz._idle.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
