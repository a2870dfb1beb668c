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

Armed and disarmed by the waiter itself, `wake.arm()` inside its `try` and `wake.disarm()` in its
`finally`, not through a context manager: a KeyboardInterrupt as a context manager's `__enter__`
returns skips its `__exit__`, which a generator's `finally` then runs whenever the garbage collector
gets to it, putting back a wakeup fd that may no longer be the current one
(tests/test_interrupt_handoff.py found it so). A KeyboardInterrupt between set_wakeup_fd()'s
return and the store of what it returned leaves the one before unknown: then ckpt's pipe stays the
wakeup fd and is never closed (a descriptor closed and reused would get signal numbers written
into it).
"""

from __future__ import annotations

import os
import select
import signal
import threading
from contextlib import suppress

_UNSET = -2


class Wake:
    """A pipe a signal makes readable, for a wait of the main thread (`fd`: its read end, -1 until
    armed, and where no signal handler runs: another thread)."""

    def __init__(self) -> None:
        self.fd = -1
        self._w = -1
        self._old = _UNSET  # the wakeup fd before ours, once set_wakeup_fd() has said it
        self.seen = bytearray()  # signal numbers read, for the wakeup fd this one stood in for

    def arm(self) -> bool:
        """Ours the wakeup fd: whether it is (not outside the main thread, nor where Python refuses)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._old = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            self._close()
            return False
        return True

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

    def wait_for(self, fd: int) -> None:
        """(armed) Sleep until `fd` is readable or a signal came; a signal's handler runs as this
        returns (KeyboardInterrupt from here). The pipe is emptied: what `fd` says is the caller's."""
        p = select.poll()
        p.register(fd, select.POLLIN)
        p.register(self.fd, select.POLLIN)
        p.poll()
        self.drain()

    def disarm(self) -> None:
        """The wakeup fd before put back and given what this one saw, as if it had been set all
        along (signals.deferred_signals reads its own); the pipe closed."""
        if self._w < 0:
            return
        if self._old == _UNSET:  # (cut short inside arm: ours may be the wakeup fd, the one before unknown)
            cur = signal.set_wakeup_fd(-1, warn_on_full_buffer=False)
            if cur == self._w:
                signal.set_wakeup_fd(cur, warn_on_full_buffer=False)
                self.fd = self._w = -1  # left open for good: never a reused descriptor's
                return
            signal.set_wakeup_fd(cur, warn_on_full_buffer=False)
        else:
            try:
                signal.set_wakeup_fd(self._old, warn_on_full_buffer=False)
            except (ValueError, OSError):  # (its owner closed it meanwhile)
                signal.set_wakeup_fd(-1, warn_on_full_buffer=False)
            self.drain()
            if self._old >= 0 and self.seen:
                with suppress(OSError):
                    os.write(self._old, bytes(self.seen))
        self._close()

    def _close(self) -> None:
        r, w = self.fd, self._w
        self.fd = self._w = -1
        os.close(r)
        os.close(w)
