"""Kernel objects a killed test program leaves behind it, outliving the run, removed before a run.

The machine the suite runs on may be used again and again (CI's is): what one run leaves charges
limits the next one meets. A POSIX message queue stays until unlinked and stays charged to root's
RLIMIT_MSGQUEUE (800 KiB: ~9 queues of the default size), so after a few runs that killed programs
holding one, every mq_open failed with EMFILE. The tests name theirs after the program's pid
(`/ckpt-test-mq-PID`, `/zdtm-mq-PID`); one whose program is gone is removed here."""

from __future__ import annotations

import os
import re
import subprocess

# Queue names the tests create, with the pid of the program that made them.
OURS = re.compile(r"^(?:ckpt-test-mq|zdtm-mq)-(\d+)$")


def stale_queues(names: list[str]) -> list[str]:
    """Those of ``names`` made by a test program that no longer runs."""
    return [n for n in names if (m := OURS.match(n)) and not os.path.exists(f"/proc/{m.group(1)}")]


def remove_stale_queues() -> list[str]:
    """Unlinks this IPC namespace's stale test queues; returns their names. The queues are listed
    through an mqueue mount made in a mount namespace of its own (`unshare -m`), which ends with the
    command, so the host's mounts are never touched."""
    try:
        p = subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t mqueue none /mnt && ls -1 /mnt"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if p.returncode != 0:
        return []
    import ctypes

    rt = ctypes.CDLL("librt.so.1")
    gone = stale_queues(p.stdout.split())
    for n in gone:
        rt.mq_unlink(f"/{n}".encode())
    return gone
