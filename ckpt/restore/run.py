"""`ckpt restore`: restore, then either wait for the process (its status becomes ours) or leave it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

from ckpt.client import exit_status_of
from ckpt.image import MergedView
from ckpt.restore import caller
from ckpt.restore.jobstop import exiting_after, stopped_lines
from ckpt.restore.restorer import RestoredProcess, restore_process

# A terminal sends these to the whole foreground process group, restored process included: like a
# shell waiting for a job, we let the process decide and only report what it did.
IGNORED_WHILE_WAITING = (signal.SIGINT, signal.SIGQUIT)
# Sent to us alone (a supervisor stopping `ckpt restore`): passed on to the process we stand for.
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def _standing_in_for(pid: int) -> Iterator[None]:
    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    old = {s: signal.getsignal(s) for s in (*IGNORED_WHILE_WAITING, *FORWARDED)}
    for s in IGNORED_WHILE_WAITING:
        signal.signal(s, signal.SIG_IGN)
    for s in FORWARDED:
        signal.signal(s, forward)
    try:
        yield
    finally:
        for s, h in old.items():
            if h is not None:
                signal.signal(s, h)


def wait_status(pid: int) -> int:
    """Wait for the restored process (our child) and return its status the way a shell does."""
    with _standing_in_for(pid):
        return exit_status_of(pid)


def _note(rp: RestoredProcess, detach: bool = False) -> None:
    if not rp.pid_kept:
        print(
            f"ckpt: restored as pid {rp.pid} ({rp.note or f'pid {rp.dumped_pid} was not kept'})",
            file=sys.stderr,
        )
    for w in rp.warnings:
        print(f"ckpt: warning: {w}", file=sys.stderr)
    for line in stopped_lines(rp, detach):
        print(f"ckpt: {line}", file=sys.stderr)


def restore(
    view: MergedView,
    *,
    detach: bool = False,
    json_out: bool = False,
    inherit_fds: dict[str, int] | None = None,
    pidns: bool = False,
    new_pids: bool = False,
) -> int:
    """Restore the process of `view`. With `detach`, print its pid (or {"pid": N}) and return 0;
    otherwise wait for it and return its exit status (128 + N if a signal N ended it).
    `pidns`: in a new pid namespace with the dumped pids; then the namespace's init, which passes
    signals on and exits with the root's status, is the process waited for (restore/pidns.py)."""
    try:
        # every thread inside its syscall (resume.py)
        with exiting_after(detach and not pidns):
            rp = restore_process(view, inherit_fds=inherit_fds, pidns=pidns, new_pids=new_pids)
        caller.restored(rp.pid)  # (served by a `ckpt service`: its client's child from now on)
    finally:
        view.close()
    _note(rp, detach and not pidns)
    if detach:
        # One write of the whole line: the restored process may share this stdout, and with
        # PYTHONUNBUFFERED print() would write the text and its newline apart, letting the
        # process's own output in between.
        sys.stdout.write((json.dumps(rp.to_dict()) if json_out else str(rp.pid)) + "\n")
        sys.stdout.flush()
        return 0
    sys.stdout.flush()
    if caller.served():
        return caller.wait_by_client(rp.pid)  # (its parent: the client, which waits as below)
    return wait_status(rp.init_pid or rp.pid)
