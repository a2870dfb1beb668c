"""ckpt dirtyrate: exact per-interval dirty sets of a real C target (which tells the test the pages it
wrote between two samples), the WSS curve, and no tracking left behind: at the end, on Ctrl-C
(SIGINT to ckpt), and when the target exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ckpt.image import Layer
from ckpt.teach.dirtyrate import from_runs, measure, runs
from ckpt.teach.wss import curve
from tests.examples_util import dirtier, step, uffds
from tests.util import ROOT, LineChannel, Target, run_ckpt

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="200")


@pytest.fixture
def targets() -> Iterator[list[Target]]:
    ts: list[Target] = []
    yield ts
    for t in ts:
        t.close()


@pytest.mark.parametrize("pattern", ["seq", "random", "hot"])
def test_finds_exactly_the_pages_written(targets: list[Target], pattern: str) -> None:
    """Between two samples the target writes a known set (it prints the page indices); dirtyrate
    reports exactly that set inside the target's buffer, interval by interval."""
    t = dirtier("-m", "4M", "-S", "-p", pattern, "-H", "256K", "-s", "11")
    targets.append(t)
    lo, hi = t.base, t.base + t.npages * 4096  # type: ignore[attr-defined]
    counts = [0, 1, 5, 40, 3, 200, 0, 17]
    expected: list[set[int]] = []

    def wait(_secs: float) -> bool:
        if len(expected) == len(counts):
            return True
        expected.append(set(step(t, counts[len(expected)])))
        return False

    got: list[set[int]] = []

    def on(iv: object) -> None:
        pages = iv.pages  # type: ignore[attr-defined]
        got.append({int(p) for p in pages if lo <= p < hi})
        in_buf = [m for m in iv.mappings if int(m["start"], 16) == lo]  # type: ignore[attr-defined]
        assert (in_buf[0]["pages"] if in_buf else 0) == len(got[-1])

    s = measure(t.pid, wait=wait, on_interval=on)
    assert got == expected
    assert s.intervals == len(counts) and s.end == "stopped"
    assert uffds(t.pid) == 0  # tracking taken out
    assert t.cmd("sum").startswith("checksum ")  # and the target runs on


def test_wss_curve_hand_computed() -> None:
    sets = [np.array(s, np.uint64) for s in ([1, 2, 3], [2, 3], [4], [1])]
    pts = curve(sets, 100.0)
    assert [(p.window_ms, p.pages, p.max_pages) for p in pts] == [
        (100.0, 7 / 4, 3),  # 3, 2, 1, 1
        (200.0, 8 / 3, 3),  # {1,2,3}, {2,3,4}, {4,1}
        (300.0, 4.0, 4),
        (400.0, 4.0, 4),
    ]


def test_runs_round_trip() -> None:
    pages = np.array([0x1000, 0x2000, 0x3000, 0x9000, 0xB000, 0xC000], np.uint64)
    assert runs(pages) == [[0x1000, 3], [0x9000, 1], [0xB000, 2]]
    assert (from_runs(runs(pages)) == pages).all()


def _lines(out: str) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in out.splitlines() if ln.strip()]


def test_cli_json_lines_and_untracked_after(targets: list[Target], tmp_path: Path) -> None:
    t = dirtier("-m", "8M", "-r", "20", "-p", "hot", "-H", "1M")
    targets.append(t)
    svg = tmp_path / "rate.svg"
    p = run_ckpt("dirtyrate", "--pid", str(t.pid), "--interval", "50", "--duration", "0.5", "--json",
                 "--pages", "--plot", str(svg))  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = _lines(p.stdout)
    ivs, last = lines[:-1], lines[-1]
    assert len(ivs) == 10 and last["intervals"] == 10 and last["end"] == "duration"
    for iv in ivs:
        assert {"t_ms", "pages_dirty", "dirty_mb_s", "mappings", "pages"} <= iv.keys()
        assert sum(n for _, n in iv["pages"]) == iv["pages_dirty"]  # type: ignore[attr-defined]
    wss = last["wss"]
    assert isinstance(wss, list) and wss[0]["window_ms"] > 0
    # a WSS never shrinks with a longer window, and never exceeds the memory
    assert [w["pages"] for w in wss] == sorted(w["pages"] for w in wss)
    assert uffds(t.pid) == 0 and t.state() in ("S", "R")
    ET.parse(svg)  # a valid SVG


def _start(pid: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "ckpt", "dirtyrate", "--pid", str(pid), "--interval", "20", "--json"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)


def test_ctrl_c_removes_tracking(targets: list[Target]) -> None:
    t = dirtier("-m", "8M", "-r", "5")
    targets.append(t)
    p = _start(t.pid)
    ch = LineChannel(p, 60)
    first = json.loads(ch.readline())  # an interval: the tracking is armed
    assert first["event"] == "interval" and uffds(t.pid) == 1
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    last = _lines(ch._buf.decode() + out.decode())[-1]
    assert last["end"] == "interrupted"
    assert uffds(t.pid) == 0 and t.state() in ("S", "R")


def test_target_exit_ends_the_run(targets: list[Target]) -> None:
    t = dirtier("-m", "4M", "-S")
    targets.append(t)
    p = _start(t.pid)
    ch = LineChannel(p, 60)
    assert json.loads(ch.readline())["event"] == "interval"
    assert t.proc.stdin is not None
    t.proc.stdin.close()  # end of commands: the target prints its checksum and exits
    assert t.readline().startswith("checksum ")
    t.proc.wait(30)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert _lines(ch._buf.decode() + out.decode())[-1]["end"] == "target exited"


def test_bad_input_is_one_line(targets: list[Target]) -> None:
    t = dirtier("-m", "1M", "-S")
    targets.append(t)
    for args, msg in (
        (["--interval", "0"], "--interval must be at least 1 ms"),
        (["--plot", "x.gif"], "must end in .svg or .png"),
        (["--duration", "-1"], "--duration must be positive"),
        (["--interval", "nan"], "--interval must be at least 1 ms"),
        (["--interval", "1e12"], "at most 3600000 ms"),
    ):
        p = run_ckpt("dirtyrate", "--pid", str(t.pid), *args)
        assert p.returncode != 0 and p.stderr.startswith("ckpt: ") and msg in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert uffds(t.pid) == 0
    p = run_ckpt("dirtyrate", "--pid", "999999999")
    assert p.returncode != 0 and p.stderr.startswith("ckpt: ") and "Traceback" not in p.stderr


def test_beside_a_dump_chain(targets: list[Target], tmp_path: Path) -> None:
    """A process whose dump chain holds the tracking: dirtyrate leaves the chain's mappings to it
    (says so, counts nothing there) and never consumes its dirty bits: the next incremental dump
    still finds every page written meanwhile."""
    t = dirtier("-m", "4M", "-S", "-p", "random", "-s", "3")
    targets.append(t)
    d = tmp_path / "chain"
    run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--track", "uffd-wp", check=True)
    written: set[int] = set()

    def wait(_secs: float) -> bool:
        if written:
            return True
        written.update(step(t, 30))
        return False

    s = measure(t.pid, wait=wait)
    assert s.intervals == 1 and any("another userfaultfd" in w for w in s.warnings)
    assert uffds(t.pid) == 1  # the chain's own, still there
    p = run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--incremental", "--json", check=True)
    with Layer.open(json.loads(p.stdout.splitlines()[-1])["layer"]) as layer:
        data = {int(a) for a in layer.pages.data}
    assert written <= data  # the chain saw every write dirtyrate watched
