"""A target must never notice a dump: thousands of freezes, injected syscalls and thaws of threads
blocked in read(), clock_nanosleep(), nanosleep(), futex(), poll() and select(), idle and under CPU
load, and not one of those calls returns early (the target counts every return; tests/targets/blockers.c).

Kept to a bounded count of rounds (not a time), so the suite's length does not depend on the machine.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest

from ckpt import sysno as nr
from ckpt.dump import dump
from ckpt.errors import TargetExited
from ckpt.image import LayerMeta, LayerWriter
from ckpt.ptrace import Frozen, sigchld
from tests.util import Target

Spawn = Callable[..., Target]
ROUNDS = 1500


@contextmanager
def cpu_hog() -> Iterator[subprocess.Popen[bytes]]:
    """A process spinning on a CPU beside the target and the tracer (this machine has two)."""
    p = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("load", ["idle", "busy"])
def test_freezes_and_injections_are_invisible(spawn: Spawn, load: str) -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed} (rerun with this seed in random.Random to replay the sequence)")
    rnd = random.Random(seed)
    t = spawn("blockers", *(["2"] if load == "busy" else []))
    with cpu_hog() if load == "busy" else nullcontext():
        for i in range(ROUNDS):
            # Both ways to find a syscall instruction: the vdso's, and the one a blocked thread is
            # stopped just after (or two patched bytes).
            with Frozen(t.pid, use_vdso=rnd.random() < 0.7) as f:
                tids = f.tids
                for tid in rnd.sample(tids, rnd.randint(0, len(tids))):
                    for _ in range(rnd.randint(1, 3)):
                        assert f.syscall(nr.GETPID, tid=tid) == t.pid
                if rnd.random() < 0.1:
                    addr = f.mmap_scratch()
                    f.munmap_scratch(addr)
            if i % 250 == 249:
                assert t.cmd("check") == "early 0 last none", f"after {i + 1} rounds"
    assert t.cmd("check") == "early 0 last none"
    assert t.proc.poll() is None
    os.kill(t.pid, signal.SIGKILL)


def test_exit_between_two_polls_keeps_the_parents_status(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target is our child and dies between two of the freeze's polls of its leader: its exit
    status stays for our own wait (subprocess.Popen's), never reaped by the freeze.

    The cause of test_killed_at_random_moments[threadspawner] seeing "exit status 0": a waitid peek
    (WNOWAIT) then a waitpid that could reap; Popen.wait() then got ECHILD, which it reports as 0.
    """
    t = spawn("blockers")
    real = os.waitid
    armed = [True]

    def waitid(idtype: int, ident: int, options: int) -> os.waitid_result | None:
        if armed[0] and ident == t.pid and options & os.WNOHANG:
            # This poll came just before the death: it found nothing (whatever was there stays for
            # the next poll), and the process dies before that one. Forced on the first poll, not
            # left to a race: on an idle CPU the stop is often already there at every poll, and
            # the death would then first be seen by the thaw, which raises nothing.
            armed[0] = False
            os.kill(t.pid, signal.SIGKILL)
            while t.state() != "Z":
                os.sched_yield()
            return None
        return real(idtype, ident, options)

    monkeypatch.setattr(os, "waitid", waitid)
    with pytest.raises(TargetExited), Frozen(t.pid) as f:
        for _ in range(100):
            f.syscall(nr.GETPID)
    monkeypatch.undo()
    assert not armed[0]
    assert t.proc.wait(timeout=30) == -signal.SIGKILL


def test_waits_without_sigchld_when_another_thread_takes_it(spawn: Spawn) -> None:
    """A thread of ours that ckpt did not start, with SIGCHLD unblocked (a program using the API),
    would swallow the SIGCHLD a wait is woken by: Frozen sees it and waits with waitid(WNOWAIT)
    watchers instead. Every stop is still seen (no timeout, which would raise)."""
    t = spawn("blockers")
    stop = threading.Event()
    th = threading.Thread(target=stop.wait)
    th.start()  # SIGCHLD unblocked, as in any thread of a program that did nothing about it
    try:
        assert threading.get_native_id() not in sigchld.unblocked_threads()
        assert th.native_id in sigchld.unblocked_threads()
        for _ in range(20):
            with Frozen(t.pid, timeout=30) as f:
                assert f._shared_sigchld
                for tid in f.tids:
                    assert f.syscall(nr.GETPID, tid=tid) == t.pid
    finally:
        stop.set()
        th.join()
    assert t.cmd("check") == "early 0 last none"


def test_ckpt_threads_started_in_a_dump_block_sigchld(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compression threads a dump starts inherit SIGCHLD blocked (dump runs inside
    sigchld.blocked()): none of them can swallow the SIGCHLD the dump's waits are woken by."""
    t = spawn("memtarget", "64")
    with sigchld.blocked():
        before = set(sigchld.unblocked_threads())  # e.g. numpy's OpenBLAS thread, in pytest's process
    seen: list[tuple[set[int], set[int]]] = []
    real = LayerWriter.finish

    def finish(self: LayerWriter, meta: LayerMeta, filled: Any = None) -> Path:
        pool = {int(n) for n in os.listdir("/proc/self/task")} - before
        seen.append((pool, set(sigchld.unblocked_threads())))
        return real(self, meta, filled)

    monkeypatch.setattr(LayerWriter, "finish", finish)
    dump(t.pid, tmp_path, threads=4)
    ((pool, unblocked),) = seen
    assert len(pool) > 1  # the writer's threads (and this one) were running
    assert unblocked <= before
