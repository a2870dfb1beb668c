"""A freeze's batch runs end with a signal the process ignores, where it has one the thread does not
block (ckpt/ptrace/batch.py quiet_signals), and their threads are left in that end's stop until the
thaw, not moved on to an interrupt-stop by Frozen.settle (one stop more per thread, taken before for
fear of a death of ckpt there: once waited for, the stop holds no signal to deliver; before the wait,
a quiet one is delivered to no effect).

Checked: each thread's stop once the injections are done (PTRACE_GETSIGINFO: a signal-delivery-
stop's signal, or an interrupt-stop), and a target whose `ckpt dump` is SIGKILLed there, with quiet
ends and with real-time ones: it runs on, no handler of its ran, no signal is left pending, no call of
its returned early (it reads its commands with read(), which EINTR would end). The choice itself is
a property test over masks."""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ckpt.proc.maps import read_maps
from ckpt.ptrace import Frozen, raw
from ckpt.ptrace import batch as bt
from tests.test_batch import _status
from tests.test_freeze_sigkill import _killed_in_its_freeze, _pending
from tests.util import HYPOTHESIS_SEED, Target

Spawn = Callable[..., Target]
GETTID = 186
INTERRUPT_STOP = 128 << 8 | signal.SIGTRAP  # PTRACE_EVENT_STOP's exit code
THREADS = 4
# (catch, ignore) -> the end signal the other threads' runs take: None for the highest real-time one
CASES = {
    ("-", 0): signal.SIGURG,
    ("urg", 0): signal.SIGWINCH,
    ("urg,winch", 0): signal.SIGCHLD,
    ("urg,winch", int(signal.SIGPIPE)): signal.SIGPIPE,
    ("urg,winch,chld", 0): None,
    ("urg,winch,chld", bt.SIGRTMAX): bt.SIGRTMAX,  # an ignored real-time one goes first
    ("-", bt.SIGRTMAX - 3): bt.SIGRTMAX - 3,
}


def _stop_code(tid: int) -> int:
    """The stop a thread is in, as its tracer (this thread) sees it: a signal-delivery-stop's signal,
    or an interrupt-stop's SIGTRAP | PTRACE_EVENT_STOP << 8 (PTRACE_GETSIGINFO's si_code there)."""
    signo, _, code = struct.unpack_from("<iii", raw.getsiginfo(tid))
    return code if signo == signal.SIGTRAP and code == INTERRUPT_STOP else signo


def _spawn(spawn: Spawn, catch: str, ignore: int) -> Target:
    t = spawn("quietends", str(THREADS), catch, str(ignore))
    assert len(os.listdir(f"/proc/{t.pid}/task")) == THREADS
    return t


@pytest.mark.parametrize(("catch", "ignore"), list(CASES))
def test_runs_end_in_a_quiet_stop_where_there_is_one(spawn: Spawn, catch: str, ignore: int) -> None:
    t = _spawn(spawn, catch, ignore)
    want = CASES[(catch, ignore)]
    with Frozen(t.pid) as f:
        status = _status(t.pid, t.pid)
        f.note_sigign(status["SigIgn"], status["SigCgt"])
        got = f.batch({tid: [bt.Call(GETTID)] for tid in f.tids}, read_maps(t.pid), status["SigQ"])
        assert {tid: r[0].ret for tid, r in got.items()} == {tid: tid for tid in f.tids}
        f.release_scratch()  # (the code unmapped by an injected call in the main thread: then settle)
        codes = {tid: _stop_code(tid) for tid in f.tids}
        others = {tid: c for tid, c in codes.items() if tid != t.pid}
        assert codes[t.pid] == INTERRUPT_STOP  # (its last call, the munmap, is a single-step's)
        assert set(others.values()) == {bt.SIGRTMAX if want is None else int(want)}, codes
        assert f.held_signals == {}
    assert t.cmd("count") == "urg 0 winch 0 chld 0"
    assert not _pending(t.pid)


@pytest.mark.parametrize(("catch", "ignore"), [("-", 0), ("urg,winch,chld", 0), ("-", bt.SIGRTMAX - 3)])
def test_a_killed_dump_leaves_quiet_stops_harmless(
    tmp_path: Path, spawn: Spawn, catch: str, ignore: int
) -> None:
    """The dump's own runs (its questions to each thread) end as above, and stay in their stops:
    its death lets every thread go with nothing delivered that the target would see (a real-time
    end's SIG_DFL would kill it)."""
    t = _spawn(spawn, catch, ignore)
    _killed_in_its_freeze(t, tmp_path / "d")
    assert t.cmd("count") == "urg 0 winch 0 chld 0"
    assert not _pending(t.pid)
    assert t.proc.poll() is None


MASK = st.integers(0, (1 << 64) - 1)


def bit(s: int) -> int:
    return 1 << (s - 1)


@seed(HYPOTHESIS_SEED)
@settings(max_examples=500, deadline=None, database=None)
@given(blocked=MASK, ignored=MASK, caught=MASK, room=st.booleans())
def test_the_end_signal_is_never_one_that_acts(blocked: int, ignored: int, caught: int, room: bool) -> None:
    """Whatever the masks: a quiet pick is one the thread does not block and whose delivery the
    process ignores, never one that acts when sent, nor glibc's 32 and 33; real-time quiet ones
    first (with room in the queue); otherwise an unblocked real-time one, with room; None only when
    nothing is left. (A caught signal is never ignored: the status lines cannot say both.)"""
    ignored &= ~caught
    quiet = bt.quiet_signals(ignored, caught)
    sig = bt.pick_signal(blocked, quiet, room)
    free_quiet = quiet & ~blocked
    if free_quiet and (room or free_quiet & ((1 << 31) - 1)):
        assert sig is not None and bit(sig) & free_quiet
        assert sig not in (32, 33) and not bit(sig) & bt.ACT_WHEN_SENT
        assert bit(sig) & ignored or (bit(sig) & bt.DEFAULT_IGNORED and not bit(sig) & caught)
        rt_quiet = [s for s in range(bt.SIGRTMIN, bt.SIGRTMAX + 1) if free_quiet & bit(s)]
        if room and rt_quiet:
            assert sig == max(rt_quiet)
        elif not room:
            assert sig < 32
    elif room and any(not blocked & bit(s) for s in range(bt.SIGRTMIN, bt.SIGRTMAX + 1)):
        assert sig is not None and bt.SIGRTMIN <= sig <= bt.SIGRTMAX and not blocked & bit(sig)
    else:
        assert sig is None
