"""Idle CPUs poll while a target is frozen (ckpt/idlepoll.py, issue 9 part 2): a freeze holds a CPU
latency request of 0 on /dev/cpu_dma_latency from prepare() to the end of its thaw, and never after,
however the freeze ends (thawed, a target that exits, a refused or disabled one). The kernel's own
reading of the device says the request is in force. Two workers run tests at once, so a test asserts
what its own request does (the least of all requests is 0 while it is held) and that ckpt holds no
open request afterwards, never the value another worker's freeze may be holding."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt import idlepoll
from ckpt.dump import dump
from ckpt.errors import TargetExited
from ckpt.migrate.boost import Boost
from ckpt.ptrace import Frozen
from tests.test_restore import Restored, killed, restored  # noqa: F401 (a fixture)
from tests.test_restore import dump as run_dump
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


def test_a_forked_child_holds_none() -> None:
    """A child forked while a request is held (a service's worker, a probe) closes its copy at
    once, and a release() in it closes nothing else of its own."""
    h = idlepoll.hold()
    assert h is not None and held() == 1
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        ok = held() == 0 and h.fd == -1
        keep = os.open("/dev/null", os.O_RDONLY)  # (may take the number the request had)
        idlepoll.release(h)
        ok = ok and os.fstat(keep) is not None
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(child, 0)
    assert held() == 1 and h.fd >= 0  # the parent's own is untouched
    idlepoll.release(h)
    assert held() == 0


def test_a_restored_process_holds_none(
    tmp_path: Path, spawn: Spawn, restored: Callable[..., Restored]  # noqa: F811
) -> None:
    """The restore holds a request while it builds the process (restore_process); the process it
    leaves running holds none (its helper is exec'd: O_CLOEXEC)."""
    t = spawn("memtarget", "64")
    before = t.sum()
    out = run_dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    pid = int(json.loads(r.readline())["pid"])
    r.set_pid(pid)
    assert r.wait() == 0
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert idlepoll.DEVICE not in links, links
    assert r.cmd("sum").split()[1] == before


@pytest.mark.parametrize("boost", ["1", "0"])
def test_a_migrations_downtime_window_holds_it(monkeypatch: pytest.MonkeyPatch, boost: str) -> None:
    """migrate/boost.py's window (the final round's start to the copy running, on each side) holds
    a request whether or not the boost itself is on; once, however often it is started; its end
    lets go."""
    monkeypatch.setenv("CKPT_MIGRATE_BOOST", boost)
    b = Boost()
    b.start()
    b.start()
    try:
        assert held() == 1 and idlepoll.current() == 0
    finally:
        b.end()
    assert held() == 0
    b.end()  # (again: nothing left to let go)
    assert held() == 0
