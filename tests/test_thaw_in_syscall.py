"""A signal that comes as a dump thaws its target ends a blocked call exactly as if no dump had
been (issue 9 part 4; ckpt/ptrace/parting.py).

A thread frozen inside pause(), nanosleep(), clock_nanosleep(), read(), futex() or poll() holds the
kernel's restart code; let go by PTRACE_DETACH it re-enters its call from user mode, and a signal
that came in that trip ran its handler *before* the restarted call, which then slept on (a `while
(!go) pause();` for ever). Thawed by a thread that ends right after (as `ckpt dump` does), each thread
makes that trip traced and goes straight back into its call; a signal during the trip is delivered
from inside the call. tests/targets/wakeups.c prints one line per return of each call; here
thousands of freezes, injections and thaws, each with SIGUSR1 sent to some threads while the thaw
runs (after a random spin), idle and beside a CPU hog: every signal must end its call with EINTR
after exactly one run of its handler, and no call may return by itself.

Kept to a bounded count of rounds (not a time), so the suite's length does not depend on the machine.
"""

from __future__ import annotations

import functools
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import pytest

from ckpt import sysno as nr
from ckpt.dump import dump
from ckpt.ptrace import Frozen, raw, sigchld
from ckpt.ptrace.parting import in_exiting_thread
from tests.test_invisible import cpu_hog
from tests.util import Target

Spawn = Callable[..., Target]
ROUNDS = 600
EINTR = 4


def _workers(t: Target) -> dict[int, str]:
    words = t.ready.split()
    return {int(a): b for a, b in (w.split(":") for w in words[2:])}


# The calls each thread may sleep in: its own, or restart_syscall (219), where the kernel continues
# a sleep with a timeout (and any poll) that a freeze interrupted.
NRS = {
    "pause": {34},
    "nanosleep": {35, 219},
    "clock_nanosleep": {230, 219},
    "read": {0},
    "futex": {202},
    "poll": {7, 219},
}


def _back_in(pid: int, tid: int, kind: str) -> None:
    """Until the thread sleeps in its call again: after it printed a return it runs its loop, and a
    signal that came before the next call would run its handler outside it, in any process."""
    deadline = time.monotonic() + 60
    path = f"/proc/{pid}/task/{tid}/syscall"
    while (now := Path(path).read_text().split()[0]) == "running" or int(now) not in NRS[kind]:
        assert time.monotonic() < deadline, f"{kind} did not go back into its call ({now})"
        time.sleep(0.001)


def _collect(t: Target, want: set[str]) -> None:
    """One line per signalled call: each ended with EINTR after one run of its handler."""
    got: dict[str, str] = {}
    while len(got) < len(want):
        words = t.readline().split()
        assert words[0] == "ret" and words[1] in want and words[1] not in got, words
        got[words[1]] = " ".join(words[2:])
    assert got == {k: f"-1 {EINTR} 1" for k in want}


def _send(go: threading.Event, delay: float, pid: int, tids: list[int]) -> None:
    """SIGUSR1 to `tids` once the thaw begins, after a spin of `delay` seconds."""
    go.wait()
    end = time.perf_counter() + delay
    while time.perf_counter() < end:
        pass
    for tid in tids:
        raw.tgkill(pid, tid, signal.SIGUSR1)


def _cycle(pid: int, rnd: random.Random, go: threading.Event) -> None:
    """A freeze, 0-2 injected syscalls, and the thaw, with the signals let loose as it begins."""
    with Frozen(pid, use_vdso=rnd.random() < 0.7) as f:
        for tid in rnd.sample(f.tids, rnd.randint(0, 2)):
            assert f.syscall(nr.GETPID, tid=tid) == pid
        go.set()


def signalled_thaws(t: Target, rounds: int, sigchld_blocked: bool = False) -> None:
    """``rounds`` freezes of tests/targets/wakeups.c, each thawed by a thread that ends, with SIGUSR1
    sent to some of its threads as the thaw begins; every signalled call ends with EINTR after one
    run of its handler. ``sigchld_blocked``: the sender started with SIGCHLD blocked, as ckpt's own
    threads are (else a thread of ours takes it and the freeze's waits are Python's: Frozen's
    _shared_sigchld). The seed is printed."""
    seed = random.randrange(2**32)
    print(f"seed {seed} (rerun with this seed in random.Random to replay the sequence)")
    rnd = random.Random(seed)
    workers = _workers(t)
    for _ in range(rounds):
        chosen = rnd.sample(sorted(workers), rnd.randint(1, len(workers)))
        for tid in chosen:
            _back_in(t.pid, tid, workers[tid])
        go = threading.Event()
        sender = threading.Thread(target=_send, args=(go, rnd.random() * 3e-4, t.pid, chosen))
        with sigchld.blocked() if sigchld_blocked else nullcontext():
            sender.start()
        try:
            in_exiting_thread(functools.partial(_cycle, t.pid, rnd, go))
        finally:
            go.set()
            sender.join()
        _collect(t, {workers[tid] for tid in chosen})
    assert t.proc.poll() is None


@pytest.mark.parametrize("load", ["idle", "busy"])
def test_signal_during_the_thaw_ends_the_call(spawn: Spawn, load: str) -> None:
    t = spawn("wakeups")
    with cpu_hog() if load == "busy" else nullcontext():
        signalled_thaws(t, ROUNDS)


def test_dump_leaves_every_call_inside(spawn: Spawn, tmp_path: Path) -> None:
    """`ckpt.dump.dump` thaws from a thread that ends: after a full and an incremental dump, every
    call still ends with EINTR at SIGUSR1, and none returned by itself."""
    t = spawn("wakeups")
    workers = _workers(t)
    for i in range(4):
        for tid, kind in workers.items():
            _back_in(t.pid, tid, kind)
        dump(t.pid, tmp_path, incremental=i > 0)
        for tid in workers:
            raw.tgkill(t.pid, tid, signal.SIGUSR1)
        _collect(t, set(workers.values()))
