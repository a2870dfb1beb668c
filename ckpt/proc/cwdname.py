"""A working directory literally named "x (deleted)", told at dump from a removed one.

/proc/PID/cwd reads "PATH (deleted)" for a removed directory, and just as well for one so named.
Only the dump can tell them apart, by the directory itself (the link, followed) against the name:
the same directory means the name is its own. A restore then knows the name stands for a removed
directory (restore/plan.py, from format 8); the literal one is refused here, named."""

from __future__ import annotations

import os

DELETED = " (deleted)"


def refusal(pid: int, name: str | None = None) -> str | None:
    """``name``: /proc/PID/cwd's link as the caller read it this freeze (dump.py's mm "cwd")."""
    try:
        if name is None:
            name = os.readlink(f"/proc/{pid}/cwd")
        if not name.startswith("/") or not name.endswith(DELETED):
            return None
        cwd = os.stat(f"/proc/{pid}/cwd")
        named = os.stat(name)
    except OSError:
        return None  # (removed: no such name, as a removed directory's)
    if (named.st_dev, named.st_ino) != (cwd.st_dev, cwd.st_ino):
        return None  # removed; another directory took the name since
    return (
        f"a working directory whose name ends in ' (deleted)' ({name}): a restore could not tell it "
        "from a removed one (/proc shows both alike)"
    )
