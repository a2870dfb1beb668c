"""The copy buffer faulted in while `ckpt dump` imports (ckpt/prefault.py): sized from the target's
RSS, handed to the dump, and whether the guess was short, right or far too big, the layer equals
the memory page for page."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.dump import dump
from ckpt.prefault import EarlyBuffer
from tests.util import PAGE, Target, assert_view_equals_memory

Spawn = Callable[..., Target]


def _rss_pages(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for ln in f:
            if ln.startswith("Rss:"):
                return int(ln.split()[1]) * 1024 // PAGE
    raise AssertionError("no Rss")


def test_early_buffer_is_sized_from_rss_and_faulted_in(spawn: Spawn) -> None:
    t = spawn("memtarget", "4096")  # 16 MiB region, 3/4 present
    eb = EarlyBuffer.for_pid(t.pid, 2 << 30)
    assert eb is not None and eb.npages >= _rss_pages(t.pid)
    m, populated = eb.take()
    assert populated and len(m) == eb.npages * PAGE
    m[:PAGE] = b"\1" * PAGE  # writable, ours
    capped = EarlyBuffer.for_pid(t.pid, 1 << 20)
    assert capped is not None and capped.npages == 256  # never above the dump's own budget
    capped.take()
    assert EarlyBuffer.for_pid(2**22 + 1, 2 << 30) is None  # no such process: the dump says so itself


@pytest.mark.parametrize("guess", ["short", "right", "far too big"])
def test_dump_with_an_early_buffer_equals_memory(
    spawn: Spawn, datafile: Path, tmp_path: Path, guess: str
) -> None:
    t = spawn("memtarget", "2048", str(datafile))
    need = _rss_pages(t.pid)
    eb = {
        "short": EarlyBuffer(16),
        "right": EarlyBuffer.for_pid(t.pid, 2 << 30),
        "far too big": EarlyBuffer(need * 8),
    }[guess]
    r = dump(t.pid, tmp_path / "d", track="none", leave_stopped=True, early_buffer=eb)
    try:
        assert r.pages_dumped + r.pages_zero >= 1536
        assert_view_equals_memory(t.pid, r.layer)
    finally:
        os.kill(t.pid, signal.SIGCONT)


def test_rss_guess_is_statm_and_agrees_with_smaps_rollup(spawn: Spawn) -> None:
    """The buffer's size comes from /proc/PID/statm's resident counter (smaps_rollup walks every
    page table entry: 13-19 ms of CPU at 256 MiB), which is the same sum of anonymous, file and
    shmem pages as smaps_rollup's Rss, give or take the counters' per-CPU lag."""
    from ckpt.prefault import _rss_bytes

    t = spawn("memtarget", "4096")
    t.cmd("info")  # (settled: it answers only once it has written its pages)
    with open(f"/proc/{t.pid}/statm", "rb") as f:
        statm = int(f.read().split()[1]) * PAGE
    got = _rss_bytes(t.pid)
    assert got is not None and abs(got - statm) <= 64 * PAGE  # (two reads, the counters may move)
    assert abs(got // PAGE - _rss_pages(t.pid)) <= 128  # the guess's 256-page margin covers it
    assert _rss_bytes(2**22 + 1) is None
