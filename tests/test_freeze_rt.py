"""The freezing thread runs SCHED_FIFO while its target is frozen (ckpt/ptrace/rtboost.py, issue 9
part 2), and only it: the target's scheduling is never touched, threads started meanwhile stay
ordinary, and the thread gets back its own policy, priority and nice value however the freeze ends.
By default only where another task wants the CPUs (rtboost.contended), ckpt's own helper threads
among them (Frozen.helpers: a dump's); the tests that check the boost itself ask for it always
(rtboost.ENABLED)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.dump import dump
from ckpt.proc import grab
from ckpt.ptrace import Frozen, rtboost
from tests.test_invisible import cpu_hog
from tests.util import Target

Spawn = Callable[..., Target]


def _policy(tid: int = 0) -> int:
    return os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK


def _allowed() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


pytestmark = pytest.mark.skipif(not _allowed(), reason="real-time scheduling not allowed here")


@pytest.fixture
def ordinary() -> Iterator[None]:
    """The test's thread ordinary, at nice 3 (to see that it comes back), and rtboost on."""
    was = rtboost.ENABLED
    rtboost.ENABLED = True
    old_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 3)
    yield
    rtboost.ENABLED = was
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), old_nice)


def _target_sched(pid: int) -> tuple[int, int]:
    return os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid)


def test_freezing_thread_real_time_only_while_frozen(spawn: Spawn, ordinary: None) -> None:
    t = spawn("sigstate")
    before = _target_sched(t.pid)
    me = threading.get_native_id()
    fz = Frozen(t.pid)
    fz.prepare()
    # Raised by prepare(), before the freeze's clock starts (the target still runs); a prepared
    # process that is never frozen gives it back at its thaw (below).
    assert _policy() == os.SCHED_FIFO
    fz.freeze()
    try:
        assert _policy() == os.SCHED_FIFO and os.sched_getparam(0).sched_priority == rtboost.PRIORITY
        assert _target_sched(t.pid) == before  # the target is not touched
    finally:
        fz.thaw()
    assert _policy() == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, me) == 3
    assert _target_sched(t.pid) == before
    assert t.cmd("ping") == "pong"
    prepared_only = Frozen(t.pid)
    prepared_only.prepare()
    assert _policy() == os.SCHED_FIFO
    prepared_only.thaw()
    assert _policy() == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, me) == 3


def test_threads_started_while_frozen_stay_ordinary(spawn: Spawn, ordinary: None) -> None:
    t = spawn("sigstate")
    seen: list[int] = []
    with Frozen(t.pid):
        th = threading.Thread(target=lambda: seen.append(_policy()))
        th.start()
        th.join()
    assert seen == [os.SCHED_OTHER]


def test_kill_and_overlapping_freezes_give_the_policy_back(spawn: Spawn, ordinary: None) -> None:
    """The outer freeze holds the boost; one inside it (a tree's next member) leaves it alone."""
    a, b = spawn("sigstate"), spawn("sigstate")
    fa, fb = Frozen(a.pid), Frozen(b.pid)
    fa.freeze()
    fb.freeze()
    try:
        fb.thaw()
        assert _policy() == os.SCHED_FIFO  # a is still frozen
    finally:
        fb.thaw()
        fa.kill()
    assert _policy() == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 3
    a.proc.wait(10)
    assert b.cmd("ping") == "pong"


def test_the_boost_is_the_freezes_own(spawn: Spawn, ordinary: None) -> None:
    """A freeze ended from another thread (kill() may be called from any) gives the freezing thread
    its policy back, by its id; nothing is kept outside the Frozen object."""
    t = spawn("sigstate")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    fz = Frozen(t.pid)
    fz.freeze()
    me = threading.get_native_id()
    assert _policy() == os.SCHED_FIFO
    th = threading.Thread(target=fz.kill)
    th.start()
    th.join()
    assert _policy(me) == os.SCHED_OTHER
    t.proc.wait(10)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # (kill() from there gave SIGCHLD back there)


def test_disabled_or_real_time_already_leaves_the_thread_alone(spawn: Spawn, ordinary: None) -> None:
    t = spawn("sigstate")
    rtboost.ENABLED = False
    with Frozen(t.pid):
        assert _policy() == os.SCHED_OTHER
    rtboost.ENABLED = True
    os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(2))
    with Frozen(t.pid):
        assert _policy() == os.SCHED_RR and os.sched_getparam(0).sched_priority == 2
    assert _policy() == os.SCHED_RR and os.sched_getparam(0).sched_priority == 2


def test_a_dump_ends_with_its_thread_ordinary(spawn: Spawn, tmp_path: Path, ordinary: None) -> None:
    """A dump freezes in a thread of its own (dump.run_handed_over) that ends after the thaw: the
    caller's thread and the pools stay ordinary, and the layers are as without the boost."""
    t = spawn("memtarget", "64")
    dump(t.pid, tmp_path, track="uffd-wp")
    assert t.cmd("write 5") == "ok"
    r = dump(t.pid, tmp_path, incremental=True, track="uffd-wp")
    assert r.pages_dirty >= 1
    assert _policy() == os.SCHED_OTHER
    assert t.sum()


def _running(p: subprocess.Popen[bytes]) -> None:
    """Until the busy loop ``p`` is seen runnable (state R)."""
    deadline = time.monotonic() + 30
    while Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "R":
        assert time.monotonic() < deadline, "the busy loop never ran"
        os.sched_yield()


def test_contended_counts_other_runnable_tasks() -> None:
    """rtboost.contended: another runnable task than the caller and the target's running threads."""
    with cpu_hog() as p:
        _running(p)
        # Two reads, as a freeze makes them (Frozen._contended): one read alone missed the running
        # loop once in the README's test command (the kernel's unlocked sum of its run queues,
        # rtboost.runnable: a task between two CPUs is in neither).
        earlier = rtboost.runnable()
        assert rtboost.contended(earlier=earlier)  # the loop (and the caller, which is not counted)
        assert not rtboost.contended(target_running=10**6)  # all of them the target's own
    # The larger of two reads counts (the kernel's unlocked sum can miss a task moving between
    # CPUs in one of them), and an unreadable one means contended.
    assert rtboost.contended(target_running=10**6, earlier=10**6 + 2)
    assert not rtboost.contended(target_running=10**6, earlier=1)
    assert rtboost.contended(target_running=10**6, earlier=None)


@pytest.mark.parametrize("mode", ["auto", "", "1", "0"])
def test_the_boost_by_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """CKPT_FREEZE_RT: 1 always, 0 never, auto (or unset) where something else wants the CPUs."""
    monkeypatch.setattr(rtboost, "ENABLED", None)
    if mode:
        monkeypatch.setenv("CKPT_FREEZE_RT", mode)
    else:
        monkeypatch.delenv("CKPT_FREEZE_RT", raising=False)
    for contended in (True, False):
        assert rtboost.enabled(contended) == {"1": True, "0": False}.get(mode, contended)


def test_a_freeze_beside_a_busy_task_is_boosted(
    spawn: Spawn, ordinary: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (auto): a CPU hog runs beside the freeze, so the freezing thread is real-time
    while frozen, and ordinary again after."""
    monkeypatch.setattr(rtboost, "ENABLED", None)
    monkeypatch.delenv("CKPT_FREEZE_RT", raising=False)
    t = spawn("sigstate")
    with cpu_hog() as p:
        _running(p)
        with Frozen(t.pid):
            assert _policy() == os.SCHED_FIFO
    assert _policy() == os.SCHED_OTHER
    assert t.cmd("ping") == "pong"


def test_a_freeze_with_helpers_beside_it_is_boosted_whatever_the_load(
    spawn: Spawn, ordinary: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (auto): ckpt's own threads that run beside a freeze (Frozen.helpers) compete for
    the CPUs as another task would, idle machine or not; CKPT_FREEZE_RT=0 still means never."""
    monkeypatch.setattr(rtboost, "ENABLED", None)
    monkeypatch.delenv("CKPT_FREEZE_RT", raising=False)
    t = spawn("sigstate")
    fz = Frozen(t.pid)
    fz.helpers = True
    with fz:
        assert _policy() == os.SCHED_FIFO
    assert _policy() == os.SCHED_OTHER
    monkeypatch.setenv("CKPT_FREEZE_RT", "0")
    fz = Frozen(t.pid)
    fz.helpers = True
    with fz:
        assert _policy() == os.SCHED_OTHER
    assert t.cmd("ping") == "pong"


def test_a_dumps_freeze_counts_its_helpers(
    spawn: Spawn, tmp_path: Path, ordinary: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dump runs procgrab.c's workers beside its freeze: each of its freezes, full and
    incremental, is boosted in the default mode, and its thread is ordinary again after."""
    if grab.lib() is None:
        pytest.skip("procgrab.c not built")
    monkeypatch.setattr(rtboost, "ENABLED", None)
    monkeypatch.delenv("CKPT_FREEZE_RT", raising=False)
    seen: list[tuple[bool, int]] = []
    real = rtboost.boost

    def boost(contended: bool = True) -> rtboost.Boost | None:
        b = real(contended)
        seen.append((contended, _policy()))
        return b

    monkeypatch.setattr(rtboost, "boost", boost)
    t = spawn("memtarget", "16")
    dump(t.pid, tmp_path, track="uffd-wp")
    assert t.cmd("write 3") == "ok"
    dump(t.pid, tmp_path, incremental=True, track="uffd-wp")
    assert seen == [(True, os.SCHED_FIFO), (True, os.SCHED_FIFO)]
    assert _policy() == os.SCHED_OTHER
    assert t.sum()
