"""A wait of the main thread that a signal ends, whichever thread of ckpt the kernel handed it to.

Python runs a signal's handler (KeyboardInterrupt for a Ctrl-C) in the main thread only, at its
next bytecode; the C handler that records the signal runs in whatever thread the kernel picked. A
main thread blocked in a lock (a queue's get, a join) is woken only by a signal the kernel gives
to it, as EINTR, and not even then if the C handler ran a moment before the wait began: the main
thread preempted between its last look at pending signals and its futex wait takes the signal on
its way back to user mode and then blocks with it already handled. `ckpt restore` hung so, its
Ctrl-C seen by nobody (test_service_restore's test_ctrl_c_mid_restore_leaves_no_process, 2 runs
in 71 under load with one more thread of ckpt running beside the main one; tests/test_sigwake.py).

The cure is the self-pipe: the wakeup fd (signal.set_wakeup_fd), which the C handler writes the
signal's number to in any thread, polled beside what the wait is for. Once the poll returns, the
main thread runs bytecode again, and the handler with it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class Wake:
    """The read end a signal makes readable (-1 where no signal handler runs: not the main thread)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = bytearray()  # signal numbers read, for the wakeup fd this one stood in for

    def drain(self) -> None:
        """Empty the pipe (a signal is acted on by its handler, not by what is read here)."""
        while self.fd >= 0:
            try:
                got = os.read(self.fd, 256)
            except BlockingIOError:
                return
            if not got:
                return
            self.seen += got


@contextmanager
def wakeup() -> Iterator[Wake]:
    """(for a wait of the calling thread) A Wake whose fd a signal makes readable, for the block.
    The wakeup fd set before is put back at the end and given what this one saw, as if it had
    been set all along (signals.deferred_signals reads its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield Wake(-1)
        return
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    wake = Wake(r)
    old = -2
    try:
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):  # (not allowed here: a wait as before, woken by EINTR only)
            old = -2
            yield Wake(-1)
            return
        yield wake
    finally:
        if old != -2:
            with suppress(ValueError, OSError):  # (the old owner closed its fd meanwhile)
                signal.set_wakeup_fd(old, warn_on_full_buffer=False)
            wake.drain()
            if old >= 0 and wake.seen:
                with suppress(OSError):
                    os.write(old, bytes(wake.seen))
        os.close(r)
        os.close(w)
