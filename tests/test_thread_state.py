"""Per-thread state a dump takes from one read of each thread's stat and from its injected batch
(personality, timer slack) rather than from a /proc file each: the layer must hold exactly what
those files show. A real program (python3) whose threads set their own names (any bytes: a
backslash, a newline, a ")", a byte that is not UTF-8), timer slacks and, for one run, a
personality of their own, which a restore refuses naming it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt.image import open_layer
from tests.test_restore import dump
from tests.util import LineChannel

# Each thread: its name, its timer slack (ns) and a personality of its own (None: the process's).
THREADS: list[tuple[bytes, int, int | None]] = [
    (b"a\\b\nc)d \xff", 70_001, None),
    (b"(x) y)", 123_456, None),
    (b"plain", 50_000, None),
]
ADDR_NO_RANDOMIZE = 0x0040000

PROGRAM = r"""
import ctypes, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
spec = eval(sys.argv[1])  # [(name, slack, personality or None)]
go = threading.Event()
started = [0] * len(spec)  # each thread's id at its place in spec: threads get here in any order
all_set = threading.Barrier(len(spec) + 1)
def work(i, name, slack, pers):
    libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    libc.prctl(29, ctypes.c_ulong(slack), 0, 0, 0)  # PR_SET_TIMERSLACK
    if pers is not None:
        libc.personality(ctypes.c_ulong(pers))  # this thread's alone
    started[i] = threading.get_native_id()
    all_set.wait()
    go.wait()
ts = [threading.Thread(target=work, args=(i, *s), daemon=True) for i, s in enumerate(spec)]
for t in ts:
    t.start()
all_set.wait()
print(" ".join(map(str, started)), flush=True)
sys.stdin.readline()
"""


def _start(spec: list[tuple[bytes, int, int | None]]) -> tuple[subprocess.Popen[bytes], list[int]]:
    p = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, repr(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    tids = [int(w) for w in LineChannel(p, 30).readline().split()]
    return p, tids


def _proc(pid: int, tid: int, name: str) -> bytes:
    # (timerslack_ns is only under /proc/TID, which every thread has though only the leader is listed)
    path = f"/proc/{tid}/{name}" if name == "timerslack_ns" else f"/proc/{pid}/task/{tid}/{name}"
    with open(path, "rb") as f:
        return f.read()


def _stop(p: subprocess.Popen[bytes]) -> None:
    p.kill()
    p.wait()


def test_names_and_timer_slacks_are_recorded_as_proc_shows_them(tmp_path: Path) -> None:
    p, tids = _start(THREADS)
    try:
        for incremental in (False, True):
            out = dump(p.pid, tmp_path / "d", *(["--incremental"] if incremental else []))
            assert out["restorable"], out
            meta = open_layer(Path(str(out["layer"]))).layers[0].meta
            recs = {t.tid: t for t in meta.threads}
            assert sorted(recs) == sorted([p.pid, *tids])
            for tid, (name, slack, _) in zip(tids, THREADS, strict=True):
                props = recs[tid].props
                assert props is not None
                comm = _proc(p.pid, tid, "comm").removesuffix(b"\n")
                assert comm == name  # (PR_SET_NAME keeps 15 bytes: all of these)
                assert props.comm == comm.decode("utf-8", "surrogateescape")
                assert props.timerslack_ns == slack == int(_proc(p.pid, tid, "timerslack_ns"))
                assert props.own == []
            main = recs[p.pid].props
            assert main is not None
            main_comm = _proc(p.pid, p.pid, "comm").removesuffix(b"\n")
            assert main.comm == main_comm.decode("utf-8", "surrogateescape")
            assert main.timerslack_ns == int(_proc(p.pid, p.pid, "timerslack_ns"))
        assert p.poll() is None  # still running, every thread as it was
        for tid, (name, slack, _) in zip(tids, THREADS, strict=True):
            assert _proc(p.pid, tid, "comm") == name + b"\n"
            assert int(_proc(p.pid, tid, "timerslack_ns")) == slack
    finally:
        _stop(p)


def test_a_thread_with_its_own_personality_is_named(tmp_path: Path) -> None:
    spec = [(b"same", 50_000, None), (b"mine", 50_000, ADDR_NO_RANDOMIZE)]
    p, tids = _start(spec)
    try:
        assert int(_proc(p.pid, tids[1], "personality"), 16) & ADDR_NO_RANDOMIZE
        assert not int(_proc(p.pid, p.pid, "personality"), 16) & ADDR_NO_RANDOMIZE
        out = dump(p.pid, tmp_path / "d")
        assert not out["restorable"]
        why = " ".join(out["not_restorable"])  # type: ignore[arg-type]
        assert f"thread {tids[1]} has its own personality" in why, why
        assert f"thread {tids[0]} has its own" not in why, why
        meta = open_layer(Path(str(out["layer"]))).layers[0].meta
        own = {t.tid: t.props.own for t in meta.threads if t.props is not None}
        assert own[tids[1]] == ["personality"] and own[tids[0]] == [] and own[p.pid] == []
        assert p.poll() is None
    finally:
        _stop(p)


@pytest.mark.parametrize("slack", [1, 10**12])
def test_extreme_timer_slacks_are_exact(tmp_path: Path, slack: int) -> None:
    """PR_GET_TIMERSLACK returns the slack as a long: the values at both ends come back whole."""
    p, tids = _start([(b"t", slack, None)])
    try:
        out = dump(p.pid, tmp_path / "d")
        meta = open_layer(Path(str(out["layer"]))).layers[0].meta
        rec = next(t for t in meta.threads if t.tid == tids[0])
        assert rec.props is not None and rec.props.timerslack_ns == slack
        assert int(_proc(p.pid, tids[0], "timerslack_ns")) == slack
        assert os.path.exists(f"/proc/{p.pid}")
    finally:
        _stop(p)
