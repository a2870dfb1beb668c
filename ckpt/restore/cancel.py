"""A Ctrl-C while a restore runs: the restore stops before it lets the process go, and kills it.

A restore runs in a thread of its own (resume.in_tracer_thread) while ckpt's main thread serves its
forks; the main thread is where Python raises KeyboardInterrupt. That thread cannot stop the other
where it stands, and before this the restore went on to the end: `ckpt restore` said "interrupted"
and exited 130, leaving a restored process running that nobody waited for. Now the main thread marks
the restore cancelled and waits for it; the restore thread checks the mark before the process is
let go (restorer.complete) and raises KeyboardInterrupt there, whose cleanup kills the helper as any
failure does. A Ctrl-C after that check comes too late to stop it: the restore ends as if it had
come a moment later, once `ckpt restore` ignores SIGINT while it waits for its process.
"""

from __future__ import annotations

import contextlib
import os
import threading

_local = threading.local()  # .cancel: the restore thread's Cancel


class Cancel:
    def __init__(self) -> None:
        self.set_ = False
        self.wake: list[int] = []  # pipes' write ends to write to when set (a test's hold waits on one)

    def set(self) -> None:
        self.set_ = True
        for fd in list(self.wake):
            with contextlib.suppress(OSError):
                os.write(fd, b"x")


def attach(c: Cancel) -> None:
    """(in the restore thread) `c` is this thread's restore's."""
    _local.cancel = c


def current() -> Cancel | None:
    c: Cancel | None = getattr(_local, "cancel", None)
    return c


def check() -> None:
    """(in the restore thread) KeyboardInterrupt if the restore was interrupted meanwhile."""
    c = current()
    if c is not None and c.set_:
        raise KeyboardInterrupt
