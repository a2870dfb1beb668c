"""Two things of a big process's incremental uffd-wp freeze (issue 9 part 2), on a real process:

* its dirty and hole scans start the moment the batch's runs have ended (dump.py `runs_ended`,
  Frozen.batch's ``ended``), before their results are read and the stacks put back, unless the
  freeze registers a new mapping (then after the batch, as before); the layer is what it was;
* after a live pre-copy the frozen scan finds few pages, and the freeze then makes no call into
  numpy: each first call of a kind cost it ~50 us, cold (`as_set`, `union` on two pages).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from ckpt.dump import PAGETABLES_BACKGROUND, dump
from ckpt.image import open_layer
from ckpt.ptrace import Frozen
from ckpt.ptrace import batch as bt
from ckpt.track import available
from ckpt.track.uffdwp import UffdWpTracker
from tests.util import PAGE, LineChannel, Target, assert_view_equals_memory, build_c

dump_mod = importlib.import_module("ckpt.dump")

pytestmark = pytest.mark.skipif(
    not available()["uffd-wp"][0], reason="uffd-wp tracking unavailable on this kernel"
)

A = (PAGETABLES_BACKGROUND // PAGE) + 1024  # pages of data: the process is above the bound
Spawn = Callable[..., Target]


@pytest.fixture
def target() -> Iterator[tuple[subprocess.Popen[bytes], LineChannel, int]]:
    """tests/targets/layout.c with one mapping of A pages of data: (process, channel, its start)."""
    p = subprocess.Popen([str(build_c("layout"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        ch = LineChannel(p, timeout=60)
        assert p.stdin is not None
        p.stdin.write(f"map {A} rw hole 0 0\nrun d {A} 1\nbuild\n".encode())
        words = ch.readline().split()
        assert words[0] == "ready", words
        yield p, ch, int(words[1], 16)
    finally:
        p.kill()
        p.wait()


def _order(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What happened in which order: "scans" (scan_dirty_native started them), "results" (a run's
    results parsed, ptrace/batch.py parse)."""
    seen: list[str] = []
    real_native, real_parse = UffdWpTracker.scan_dirty_native, bt.parse

    def native(self: UffdWpTracker, *a: Any) -> Any:
        seen.append("scans")
        return real_native(self, *a)

    def parse(*a: Any) -> Any:
        seen.append("results")
        return real_parse(*a)

    monkeypatch.setattr(UffdWpTracker, "scan_dirty_native", native)
    monkeypatch.setattr(bt, "parse", parse)
    return seen


def test_the_scans_start_when_the_runs_end(
    target: tuple[subprocess.Popen[bytes], LineChannel, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p, ch, a = target
    d = tmp_path / "d"
    dump(p.pid, d, track="uffd-wp")
    assert ch.cmd(f"data {a + 10 * PAGE:x} 30 9") == "ok"
    assert ch.cmd(f"drop {a + 100 * PAGE:x} 20") == "ok"  # the parent's, dropped
    seen = _order(monkeypatch)
    r = dump(p.pid, d, incremental=True, precopy=False, leave_stopped=True)
    try:
        assert seen == ["scans", "results"]
        assert_view_equals_memory(p.pid, r.layer)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    pages = open_layer(r.layer).layers[0].meta.pages
    mine = range(a, a + A * PAGE)
    assert {int(x) for x in pages.data if int(x) in mine} == {a + i * PAGE for i in range(10, 40)}
    assert {int(x) for x in pages.absent if int(x) in mine} == {a + i * PAGE for i in range(100, 120)}
    # The next layer: what was written after this one, nothing of the runs' stack writes here.
    assert ch.cmd(f"data {a + 5 * PAGE:x} 1 4") == "ok"
    r2 = dump(p.pid, d, incremental=True, precopy=False)
    pages = open_layer(r2.layer).layers[0].meta.pages
    assert {int(x) for x in pages.data if int(x) in mine} == {a + 5 * PAGE}


def test_a_freeze_that_registers_a_mapping_scans_after_the_batch(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapping made since the parent is registered by the batch's runs, and its pages
    write-protected after them (finish_registration): the scans start only after that. (Three
    threads, one spinning: a run each, the leader's last.)"""
    t = spawn("memtarget", str(2 * A))  # (three quarters of it present: above the bound)
    region = t.info()["region"]
    d = tmp_path / "d"
    dump(t.pid, d, track="uffd-wp")
    fresh = int(t.cmd("mmap 16").split()[1], 16)
    assert t.cmd("write 3 4 5") == "ok"
    seen = _order(monkeypatch)
    r = dump(t.pid, d, incremental=True, precopy=False, leave_stopped=True)
    try:
        assert seen.count("scans") == 1 and seen[-1] == "scans" and seen.count("results") >= 2, seen
        assert_view_equals_memory(t.pid, r.layer)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    stored = {int(x) for x in open_layer(r.layer).layers[0].meta.pages.data}
    assert {region + i * PAGE for i in (3, 4, 5)} | {fresh + i * PAGE for i in range(16)} <= stored
    # Registered in that freeze: the next layer holds what is written after it, there as elsewhere.
    assert t.cmd("write 9") == "ok"
    r2 = dump(t.pid, d, incremental=True, precopy=False)
    stored = {int(x) for x in open_layer(r2.layer).layers[0].meta.pages.data}
    assert region + 9 * PAGE in stored
    assert not {fresh + i * PAGE for i in range(16)} & stored


def test_few_pages_after_a_live_copy_no_numpy_in_the_freeze(
    target: tuple[subprocess.Popen[bytes], LineChannel, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every call into numpy (its Python functions, its C functions and methods) made by the
    freezing thread from the seize to the thaw is recorded: none, where the frozen scan found few
    pages (the live pre-copy took the rest). The layer is whole all the same."""
    p, ch, a = target
    d = tmp_path / "d"
    dump(p.pid, d, track="uffd-wp")
    assert ch.cmd(f"data {a + 300 * PAGE:x} 64 3") == "ok"
    calls: list[str] = []
    watching = threading.Event()

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if not watching.is_set():
            return
        if event == "call" and f"{os.sep}numpy{os.sep}" in frame.f_code.co_filename:
            calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")
        elif event == "c_call":
            owner = getattr(arg, "__self__", None)
            mod = getattr(arg, "__module__", None) or type(owner).__module__
            if mod and mod.split(".")[0] == "numpy":
                calls.append(f"{mod}.{getattr(arg, '__name__', arg)}")

    real_freeze = Frozen.freeze

    def freeze(self: Frozen) -> None:
        watching.set()
        real_freeze(self)

    def on_lap(name: str) -> None:
        if name == "frozen: thaw":
            watching.clear()

    monkeypatch.setattr(Frozen, "freeze", freeze)
    threading.setprofile(hook)  # (the freeze runs in a thread of its own: dump.run_handed_over)
    try:
        r = dump(p.pid, d, incremental=True, precopy=True, leave_stopped=True, on_lap=on_lap)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        watching.clear()
    try:
        assert r.pages_precopied >= 64
        assert calls == [], f"numpy called in the freeze (seed-free: the target is fixed): {calls[:10]}"
        assert_view_equals_memory(p.pid, r.layer)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    pages = open_layer(r.layer).layers[0].meta.pages
    assert {a + i * PAGE for i in range(300, 364)} <= {int(x) for x in pages.data}
    assert sys.getprofile() is None


def test_scans_made_ready_but_not_started_give_back_their_fd(
    target: tuple[subprocess.Popen[bytes], LineChannel, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scans' set-up is made while the runs run (ready_scans: the pagemap opened); where they
    cannot start at the runs' end (here: the code mapping said to be still there), they start after
    the batch as before, and the set-up made is given back: no fd of ckpt's left open."""
    p, ch, a = target
    d = tmp_path / "d"
    dump(p.pid, d, track="uffd-wp")
    assert ch.cmd(f"data {a + 50 * PAGE:x} 7 2") == "ok"
    readied: list[Any] = []
    real_ready = UffdWpTracker.ready_scans

    def ready(self: UffdWpTracker, *a: Any) -> Any:
        got = real_ready(self, *a)
        readied.append(got)
        return got

    monkeypatch.setattr(UffdWpTracker, "ready_scans", ready)
    monkeypatch.setattr(Frozen, "holds_code", lambda self: True)
    seen = _order(monkeypatch)
    fds = sorted(os.listdir("/proc/self/fd"))
    r = dump(p.pid, d, incremental=True, precopy=False, leave_stopped=True)
    try:
        assert len(readied) == 1 and readied[0] is not None and readied[0].scans.taken
        assert seen == ["results", "scans"]
        assert sorted(os.listdir("/proc/self/fd")) == fds
        assert_view_equals_memory(p.pid, r.layer)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    pages = open_layer(r.layer).layers[0].meta.pages
    assert {int(x) for x in pages.data if a <= int(x) < a + A * PAGE} == {a + i * PAGE for i in range(50, 57)}
