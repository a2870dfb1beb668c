"""Who holds a pid a restore wanted, for the refusal that names it (restore/tree.py).

A tree child's pid is part of what its parent knows: waitpid(pid), kill(pid), a pid file. Given
another pid, the child comes back different in a way the parent cannot see, so the restore refuses,
naming the pid and the process holding it, unless the caller accepts new pids (--new-pids)."""

from __future__ import annotations

from ckpt.errors import CkptError
from ckpt.proc.stat import read_status

NEW_PIDS_HINT = (
    "--pidns keeps every pid in a pid namespace of its own; --new-pids accepts new ones (its "
    "parent's waitpid() or kill() of the old pid would then be wrong)"
)


def holder(pid: int) -> str:
    """'process N (comm)', 'thread N of process T (comm)', or what is known when it is gone."""
    try:
        st = read_status(pid)
    except (OSError, ValueError, CkptError):
        return "a process that is gone since (or not visible here)"
    name = "".join(c if c.isprintable() else "?" for c in st.get("Name", "?"))[:64]
    tgid = st.get("Tgid", str(pid)).strip()
    if tgid != str(pid):
        return f"thread {pid} of process {tgid} ({name})"
    return f"process {pid} ({name})"


def refusal(pid: int, ppid: int, why: str) -> str:
    """The one line: the child's pid, its parent, why it cannot be kept, and the ways out."""
    return f"pid {pid} (a child of pid {ppid}) cannot be kept: {why}; {NEW_PIDS_HINT}"
