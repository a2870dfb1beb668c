"""Tests stop `ckpt migrate` at a named point of the hand-over, to SIGKILL it exactly there.

CKPT_MIGRATE_TEST_HOLD=POINT and CKPT_MIGRATE_TEST_HOLD_FD=FD (a pipe's write end the test passed
down): at POINT the thread writes "POINT\\n" to FD and waits forever; the test, woken by that
line, kills the process. Off (one environment lookup) otherwise. The points, in order:
live-N (after live round N was reported, before the next round or the final one), final-footer,
ready, commit-told, committed, running, killed (docs/migrate.md); a tree's also
tree-walked (its first walk told to the guard) and tree-dumped (the tree stopped by its dump, the
members as dumped not yet told). Besides those, "final-dumped": the main thread once the final dump
returned, the target still raised for its freeze (migrate/targetboost.py), while the committer goes
on.

CKPT_MIGRATE_TEST_PAUSE=POINT with CKPT_MIGRATE_TEST_PAUSE_FD=FD (a pipe's read end): at POINT the
thread writes "POINT\n" to the hold fd as above, then goes on once a byte can be read from FD (the
test does something in between: a tree's process forks after the first walk)."""

from __future__ import annotations

import contextlib
import os
import threading

POINTS = ("final-footer", "ready", "commit-told", "committed", "running", "killed")


def hold(point: str) -> None:
    if os.environ.get("CKPT_MIGRATE_TEST_PAUSE") == point:
        with contextlib.suppress(KeyError, ValueError, OSError):
            os.write(int(os.environ["CKPT_MIGRATE_TEST_HOLD_FD"]), f"{point}\n".encode())
            os.read(int(os.environ["CKPT_MIGRATE_TEST_PAUSE_FD"]), 1)
        return
    if os.environ.get("CKPT_MIGRATE_TEST_HOLD") != point:
        return
    with contextlib.suppress(KeyError, ValueError, OSError):
        os.write(int(os.environ["CKPT_MIGRATE_TEST_HOLD_FD"]), f"{point}\n".encode())
    threading.Event().wait()  # until the test's SIGKILL
