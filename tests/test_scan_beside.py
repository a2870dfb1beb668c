"""An incremental uffd-wp dump of a process of 64 MiB and more scans for dirty pages and holes on a
thread of its own, beside the collect (ckpt/dump.py: scan_pool; UffdWpTracker.scan_dirty, dirty_of).
The layer must be what the one-thread order gives: every page written stored, every page dropped
absent, the merged view the memory page for page; and a collect that fails while the scans run
leaves the target running with its tracking taken out, and no layer."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import PAGETABLES_BACKGROUND, dump
from ckpt.errors import TargetError, TrackerError
from ckpt.image import open_layer
from ckpt.track import available
from ckpt.track.uffdwp import UffdWpTracker, uffd_fds
from tests.util import PAGE, LineChannel, assert_view_equals_memory, build_c

dump_mod = importlib.import_module("ckpt.dump")  # (ckpt.dump, the name, is the function)

pytestmark = pytest.mark.skipif(
    not available()["uffd-wp"][0], reason="uffd-wp tracking unavailable on this kernel"
)

A = (PAGETABLES_BACKGROUND // PAGE) + 1024  # pages of data: the process is above the bound
B = 2048  # a second mapping, its upper half never touched before the first dump


@pytest.fixture
def target() -> Iterator[tuple[subprocess.Popen[bytes], LineChannel, int, int]]:
    """tests/targets/layout.c with the two mappings: (process, its channel, A's start, B's start)."""
    p = subprocess.Popen([str(build_c("layout"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        ch = LineChannel(p, timeout=60)
        assert p.stdin is not None
        p.stdin.write(
            f"map {A} rw hole 0 0\nrun d {A} 1\nmap {B} rw hole 4 0\nrun d {B // 2} 2\nbuild\n".encode()
        )
        words = ch.readline().split()
        assert words[0] == "ready", words
        yield p, ch, int(words[1], 16), int(words[2], 16)
    finally:
        p.kill()
        p.wait()


def _scans_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads UffdWpTracker.scan_dirty runs on (the real one, recorded)."""
    names: list[str] = []
    real = UffdWpTracker.scan_dirty

    def recorded(self: UffdWpTracker, *a: Any) -> Any:
        names.append(threading.current_thread().name)
        return real(self, *a)

    monkeypatch.setattr(UffdWpTracker, "scan_dirty", recorded)
    return names


@pytest.mark.parametrize("precopy", [False, True], ids=["frozen", "pre-copy"])
def test_scans_beside_the_collect_find_what_one_thread_finds(
    target: tuple[subprocess.Popen[bytes], LineChannel, int, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precopy: bool,
) -> None:
    p, ch, a, b = target
    d = tmp_path / "d"
    dump(p.pid, d, track="uffd-wp")
    assert ch.cmd(f"data {a + 100 * PAGE:x} 50 9") == "ok"
    assert ch.cmd(f"data {a + (A - 3) * PAGE:x} 3 11") == "ok"  # the last pages of A
    assert ch.cmd(f"drop {a + 200 * PAGE:x} 40") == "ok"  # the parent's, dropped
    assert ch.cmd(f"data {b + (B - 10) * PAGE:x} 10 3") == "ok"  # first touched since the parent
    names = _scans_on(monkeypatch)
    r = dump(p.pid, d, incremental=True, precopy=precopy, leave_stopped=True)
    try:
        assert names == ["ckpt-scan_0"]
        assert_view_equals_memory(p.pid, r.layer)
        with open(f"/proc/{p.pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
    finally:
        os.kill(p.pid, signal.SIGCONT)
    pages = open_layer(r.layer).layers[0].meta.pages
    mine = [(a, a + A * PAGE), (b, b + B * PAGE)]
    stored = {int(x) for x in pages.data if any(lo <= x < hi for lo, hi in mine)}
    want = [a + i * PAGE for i in [*range(100, 150), *range(A - 3, A)]] + [
        b + i * PAGE for i in range(B - 10, B)
    ]
    assert stored == set(want)
    absent = {int(x) for x in pages.absent if any(lo <= x < hi for lo, hi in mine)}
    assert absent == {a + i * PAGE for i in range(200, 240)}
    # The tracking goes on: the next layer holds what was written after this one, nothing more.
    assert ch.cmd(f"data {a + 5 * PAGE:x} 1 4") == "ok"
    r2 = dump(p.pid, d, incremental=True, precopy=False)
    pages = open_layer(r2.layer).layers[0].meta.pages
    assert {int(x) for x in pages.data if any(lo <= x < hi for lo, hi in mine)} == {a + 5 * PAGE}


def test_a_collect_failing_beside_the_scans(
    target: tuple[subprocess.Popen[bytes], LineChannel, int, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The collect fails while the scans may still run: the dump waits for them before it undoes
    the tracking (their dirty bits are consumed: later incrementals refuse), and leaves no layer."""
    p, ch, a, _ = target
    d = tmp_path / "d"
    dump(p.pid, d, track="uffd-wp")
    assert ch.cmd(f"data {a:x} 64 5") == "ok"
    names = _scans_on(monkeypatch)

    def failing(*_: Any, **__: Any) -> Any:
        raise TargetError("injected failure in the collect")

    monkeypatch.setattr(dump_mod, "_collect", failing)
    with pytest.raises(TargetError, match="injected failure"):
        dump(p.pid, d, incremental=True, precopy=False)
    monkeypatch.undo()
    assert names == ["ckpt-scan_0"]
    assert uffd_fds(p.pid) == []  # taken out of the process, after the scans ended
    with pytest.raises(TrackerError):
        dump(p.pid, d, incremental=True)
    assert [x.name for x in d.glob("layer-*")] == ["layer-0001.ckpt"]
    assert ch.cmd(f"same {a:x} 1") == "ok"  # it runs on, its memory its own
    with open(f"/proc/{p.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()
