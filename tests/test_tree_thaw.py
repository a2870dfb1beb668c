"""A signal that comes as a tree dump thaws its processes, or as a process tree left stopped by a dump
is let go again, ends a blocked call exactly as if no dump had been (ckpt/ptrace/parting.py,
ckpt/ptrace/resumestop.py; tests/test_thaw_in_syscall.py is the same for one process).

The tree: `wakeups 2`, a root and two children, each with six threads blocked in pause(),
nanosleep(), clock_nanosleep(), read(), futex() and poll() (tests/targets/wakeups.c). Each round is a
real tree dump (`dumptree.dump_tree`: every member frozen, dumped into its own chain and thawed), and
SIGUSR1 goes to some threads of any members once the first member's thaw begins (after a random spin
of 0-300 us), so that it meets threads still frozen, threads on their way back into their calls and
threads already inside. Every signalled call must return EINTR after exactly one run of its
handler, and no call may return by itself. The same for `--leave-stopped` (a migration's final
round): the tree stays stopped, and `continue_stopped` (a failed migration lets it go so) thaws it
with the signals sent as it does. Idle, and beside a CPU hog. Kept to a bounded count of rounds.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest

from ckpt.dumptree import dump_tree
from ckpt.ptrace import Frozen, raw
from ckpt.ptrace.resumestop import continue_stopped
from tests.test_invisible import cpu_hog
from tests.test_thaw_in_syscall import NRS, _collect
from tests.util import Target

Spawn = Callable[..., Target]
ROUNDS = 24
CHILDREN = 2


class Tree:
    """The running `wakeups CHILDREN` tree: each worker thread's process and label (KIND@PID)."""

    def __init__(self, spawn: Spawn, subreaper: list[int]) -> None:
        self.t = spawn("wakeups", str(CHILDREN))
        lines = [self.t.ready, *(self.t.readline() for _ in range(CHILDREN))]
        self.workers: dict[int, tuple[int, str]] = {}
        self.pids: list[int] = []
        for ln in lines:
            words = ln.split()
            pid = int(words[1])
            self.pids.append(pid)
            if pid != self.t.pid:
                subreaper.append(pid)  # killed and reaped at the end: orphans come to us
            for w in words[2:]:
                tid, label = w.split(":")
                self.workers[int(tid)] = (pid, label)
        assert len(set(self.pids)) == CHILDREN + 1

    def back_in(self, tids: list[int]) -> None:
        """Until each thread sleeps in its call again (test_thaw_in_syscall._back_in)."""
        for tid in tids:
            pid, label = self.workers[tid]
            want = NRS[label.split("@")[0]]
            path = f"/proc/{pid}/task/{tid}/syscall"
            deadline = time.monotonic() + 60
            while (now := Path(path).read_text().split()[0]) == "running" or int(now) not in want:
                assert time.monotonic() < deadline, f"{label} did not go back into its call ({now})"
                time.sleep(0.001)

    def all_stopped(self) -> None:
        """Until every thread of every process is in its group-stop (state T)."""
        deadline = time.monotonic() + 60
        for pid in self.pids:
            for task in Path(f"/proc/{pid}/task").iterdir():
                while (st := (task / "stat").read_text().rsplit(")", 1)[1].split()[0]) != "T":
                    assert time.monotonic() < deadline, f"thread {task.name} of {pid} is {st}, not stopped"
                    time.sleep(0.001)

    def signal(self, go: threading.Event, delay: float, tids: list[int]) -> threading.Thread:
        """A thread that sends SIGUSR1 to `tids` once `go` is set, after a spin of `delay` seconds."""

        def send() -> None:
            go.wait()
            end = time.perf_counter() + delay
            while time.perf_counter() < end:
                pass
            for tid in tids:
                raw.tgkill(self.workers[tid][0], tid, signal.SIGUSR1)

        th = threading.Thread(target=send)
        th.start()
        return th

    def collect(self, tids: list[int]) -> None:
        _collect(self.t, {self.workers[tid][1] for tid in tids})


@contextmanager
def _signals_at_thaw(monkeypatch: pytest.MonkeyPatch, go: threading.Event) -> Iterator[set[int]]:
    """`go` set as the first Frozen.thaw of the block begins; yields the threads that thaws let go
    from inside their syscall (ptrace/parting.py) rather than by a plain detach. Hooks of the test
    only: every thaw runs as it would, and the kernel sees the same calls."""
    thaw, parted = Frozen.thaw, Frozen._parted
    inside: set[int] = set()

    def on_thaw(self: Frozen, *a: Any, **kw: Any) -> None:
        go.set()
        thaw(self, *a, **kw)

    def on_parted(self: Frozen, th: Any) -> bool:
        done = parted(self, th)
        if done:
            inside.add(th.tid)
        return done

    with monkeypatch.context() as m:
        m.setattr(Frozen, "thaw", on_thaw)
        m.setattr(Frozen, "_parted", on_parted)
        yield inside


def _round(
    tree: Tree, rnd: random.Random, monkeypatch: pytest.MonkeyPatch, run: Callable[[threading.Event], None]
) -> None:
    chosen = rnd.sample(sorted(tree.workers), rnd.randint(1, len(tree.workers)))
    tree.back_in(sorted(tree.workers))
    go = threading.Event()
    sender = tree.signal(go, rnd.random() * 3e-4, chosen)
    try:
        run(go)
    finally:
        go.set()
        sender.join()
    tree.collect(chosen)


def _last_probe(tree: Tree) -> None:
    """Every call is still inside, and answers one signal once: nothing returned by itself."""
    every = sorted(tree.workers)
    tree.back_in(every)
    for tid in every:
        raw.tgkill(tree.workers[tid][0], tid, signal.SIGUSR1)
    tree.collect(every)
    assert tree.t.proc.poll() is None


@pytest.mark.parametrize("load", ["idle", "busy"])
def test_tree_dump_thaw_ends_each_call_once(
    spawn: Spawn, subreaper: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load: str
) -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed} (rerun with this seed in random.Random to replay the sequence)")
    rnd = random.Random(seed)
    tree = Tree(spawn, subreaper)
    with cpu_hog() if load == "busy" else nullcontext():
        for i in range(ROUNDS):

            def run(go: threading.Event, i: int = i) -> None:
                with _signals_at_thaw(monkeypatch, go) as inside:
                    r = dump_tree(tree.t.pid, tmp_path, incremental=i > 0, fallback_full=True)
                assert len(r.tree) == CHILDREN
                assert set(tree.workers) <= inside, "a thread was thawed by a plain detach"

            _round(tree, rnd, monkeypatch, run)
    _last_probe(tree)


@pytest.mark.parametrize("load", ["idle", "busy"])
def test_left_stopped_tree_continues_inside_each_call(
    spawn: Spawn, subreaper: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load: str
) -> None:
    """dump_tree(leave_stopped=True), as migrate's final round: every process stops; then
    continue_stopped, as a failed migration lets the tree go, with the signals sent as it thaws."""
    seed = random.randrange(2**32)
    print(f"seed {seed} (rerun with this seed in random.Random to replay the sequence)")
    rnd = random.Random(seed)
    tree = Tree(spawn, subreaper)
    with cpu_hog() if load == "busy" else nullcontext():
        for i in range(ROUNDS):

            def run(go: threading.Event, i: int = i) -> None:
                dump_tree(tree.t.pid, tmp_path, incremental=i > 0, fallback_full=True, leave_stopped=True)
                tree.all_stopped()
                with _signals_at_thaw(monkeypatch, go) as inside:
                    assert continue_stopped(tree.pids) == []
                assert set(tree.workers) <= inside, "a thread was let go by a plain detach"

            _round(tree, rnd, monkeypatch, run)
    _last_probe(tree)


def test_continue_stopped_after_a_plain_sigstop(spawn: Spawn, subreaper: list[int]) -> None:
    """Any group-stop (here a SIGSTOP of each process) is ended so: each call stays inside, and a
    SIGUSR1 sent while the processes were stopped is delivered once, from inside the call."""
    tree = Tree(spawn, subreaper)
    every = sorted(tree.workers)
    for _ in range(3):
        tree.back_in(every)
        for pid in tree.pids:
            os.kill(pid, signal.SIGSTOP)
        tree.all_stopped()
        for tid in every:
            raw.tgkill(tree.workers[tid][0], tid, signal.SIGUSR1)
        assert continue_stopped(tree.pids) == []
        tree.collect(every)
    _last_probe(tree)
