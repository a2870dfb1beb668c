"""A Ctrl-C the kernel gives to another thread of ckpt still reaches a main thread that waits
(ckpt/sigwake.py): `ckpt restore`'s main thread, serving its restore thread's forks, used to sleep
on with the signal handled elsewhere (test_service_restore's Ctrl-C test hung so under load)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

import pytest

from ckpt import sigwake
from tests.util import ROOT

WAIT = 60

# The restore thread waits until the main thread sleeps in its wait for jobs, then takes a SIGINT
# itself (thread-directed: its C handler runs there, not in the main thread): the main thread must
# wake, raise KeyboardInterrupt and cancel the restore, which the restore thread then sees.
SCRIPT = r"""
import os, select, signal, sys, threading, time
from ckpt.restore import cancel, parent
from ckpt.restore.resume import in_tracer_thread

MAIN = threading.get_native_id()
POLL = {7, 271}  # poll, ppoll: the main thread asleep in the wait for a job or a signal

def asleep():
    with open(f"/proc/self/task/{MAIN}/syscall") as f:
        nr = f.read().split()[0]  # ("running" while it runs)
    return nr.isdigit() and int(nr) in POLL

def restore():
    parent.as_parent(lambda: None)  # a fork's job, served by the main thread as a restore's are
    end = time.monotonic() + 30
    while not asleep():
        assert time.monotonic() < end, "the main thread never waited in a poll"
        time.sleep(0.001)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    stop = cancel.current()
    r, w = os.pipe()
    stop.wake.append(w)
    if not stop.set_:
        select.select([r], [], [])
    cancel.check()
    return "not cancelled"

try:
    print(in_tracer_thread(restore))
except KeyboardInterrupt:
    print("cancelled")
"""


def test_a_ctrl_c_handled_in_the_restore_thread_wakes_the_main_thread() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=WAIT, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (0, "cancelled\n", "")


def test_the_wakeup_fd_before_is_put_back_and_told() -> None:
    """Armed, the wakeup fd is sigwake's; disarmed, the one set before, which is given the signal
    numbers sigwake read meanwhile (signals.deferred_signals reads its own so)."""
    assert threading.current_thread() is threading.main_thread()
    seen: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_handler = signal.signal(signal.SIGUSR1, record)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        wake = sigwake.Wake()
        try:
            assert wake.arm() and wake.fd >= 0
            signal.raise_signal(signal.SIGUSR1)
            wake.drain()
            assert bytes(wake.seen) == bytes([signal.SIGUSR1])
            with pytest.raises(BlockingIOError):  # (not written to the one set before)
                os.read(r, 64)
            signal.raise_signal(signal.SIGUSR1)  # left in the pipe: read as it is disarmed
        finally:
            wake.disarm()
        assert signal.set_wakeup_fd(old_fd, warn_on_full_buffer=False) == w
        assert os.read(r, 64) == bytes([signal.SIGUSR1]) * 2
        assert seen == [signal.SIGUSR1] * 2
    finally:
        signal.set_wakeup_fd(old_fd, warn_on_full_buffer=False)
        signal.signal(signal.SIGUSR1, old_handler)
        os.close(r)
        os.close(w)


def test_cut_short_inside_arm_leaves_no_descriptor_a_signal_writes_to() -> None:
    """A KeyboardInterrupt between set_wakeup_fd()'s return and the store of what it returned: the
    one before is unknown, so the pipe stays the wakeup fd, open (never a reused descriptor's)."""
    wake = sigwake.Wake()
    before = _wakeup_fd()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    wake.fd, wake._w = r, w
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)  # (as arm() would, its result not stored)
    try:
        wake.disarm()
        assert _wakeup_fd() == w and wake.fd == -1
        os.fstat(w)  # (open)
    finally:
        signal.set_wakeup_fd(before, warn_on_full_buffer=False)
        os.close(r)
        os.close(w)


def _wakeup_fd() -> int:
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    return fd


def test_outside_the_main_thread_it_is_not_armed() -> None:
    out: list[tuple[bool, int]] = []

    def other() -> None:
        wake = sigwake.Wake()
        out.append((wake.arm(), wake.fd))
        wake.disarm()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert out == [(False, -1)]


# The main thread waits for a Latch (a task's result: a chunk compressed or sent, a destination's
# answer); a worker waits until it sleeps, then takes a SIGINT itself. The main thread must raise
# KeyboardInterrupt while the latch is still unset. (Before, it slept on in a lock until the
# latch was set, here by the worker after WAIT_SET seconds: "set first".)
LATCH_SCRIPT = r"""
import os, select, signal, threading, time
from ckpt.threadpool import Latch

MAIN = threading.get_native_id()
POLL = {7, 271}
latch = Latch()
r, w = os.pipe()

def asleep():
    with open(f"/proc/self/task/{MAIN}/syscall") as f:
        nr = f.read().split()[0]
    return nr.isdigit() and int(nr) in POLL

def worker():
    end = time.monotonic() + 30
    while not asleep():
        assert time.monotonic() < end, "the main thread never waited in a poll"
        time.sleep(0.001)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    select.select([r], [], [], WAIT_SET)  # the main thread's word, or the bound
    latch.set()

t = threading.Thread(target=worker)
t.start()
try:
    latch.wait()
    print("set first")
except KeyboardInterrupt:
    print("interrupted" if not latch.is_set() else "interrupted late")
    os.write(w, b"x")
t.join()
"""


def test_a_ctrl_c_handled_in_a_worker_wakes_a_main_thread_waiting_for_a_latch() -> None:
    script = LATCH_SCRIPT.replace("WAIT_SET", "20")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (0, "interrupted\n", "")


def test_a_main_thread_latch_wait_leaves_no_descriptor() -> None:
    """The poll's eventfd and pipe are closed once the latch is set (by a thread that waits until
    the main thread sleeps in the poll), and the wakeup fd set before is back."""
    from ckpt.threadpool import Latch

    assert threading.current_thread() is threading.main_thread()
    main = threading.get_native_id()
    before = sorted(os.listdir("/proc/self/fd"))
    wakeup_before = _wakeup_fd()
    latch = Latch()

    def setter() -> None:
        end = time.monotonic() + 30
        while not _in_poll(main) and time.monotonic() < end:
            time.sleep(0.001)
        latch.set()

    t = threading.Thread(target=setter)
    t.start()
    assert latch.wait()
    t.join()
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert _wakeup_fd() == wakeup_before


def _in_poll(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/syscall") as f:
        nr = f.read().split()[0]  # ("running" while it runs)
    return nr.isdigit() and int(nr) in (7, 271)
