"""A process whose memory another process shares without being one of its threads (clone(CLONE_VM)
without CLONE_THREAD, most often with CLONE_SIGHAND too; a vfork child and its parent), refused
before anything of it is touched when that other process is not frozen with it.

While a dump holds the process frozen, the other one runs on in the same memory: pages change under
the copy, it meets the mappings ckpt injects, the tracker's write-protection covers its writes too.
With CLONE_SIGHAND it shares the signal actions as well: it may make SIGTRAP ignored after the freeze
read SigIgn (once per freeze, Frozen._trap_passes), and the single-step's forced SIGTRAP would then
reset that shared action to SIG_DFL (the kernel's force_sig_info_to_task): a change both processes
would keep. And a restore would give the process a memory and a handler table of its own, silently
apart from the other's.

Which processes can share it: one cloned with CLONE_VM by a process that shared it, so its parent
and its children are asked (kcmp KCMP_VM; CLONE_SIGHAND needs CLONE_VM, and execve leaves both).
A sharer reparented elsewhere once the process between them exited is not looked for (that would
take a kcmp against every process); a tree dump asks its root's parent, shared_tables its members."""

from __future__ import annotations

import contextlib
import ctypes
import os

from ckpt.errors import TargetError
from ckpt.proc.stat import read_stat
from ckpt.proc.tree import children

SYS_KCMP, KCMP_VM, KCMP_SIGHAND = 312, 1, 4
_libc = ctypes.CDLL(None, use_errno=True)


def _same(a: int, b: int, kind: int) -> bool:
    return int(_libc.syscall(SYS_KCMP, a, b, kind, 0, 0)) == 0


def sharers(pid: int, with_children: bool) -> list[tuple[int, str, bool]]:
    """(pid, "parent" or "child", also the signal handlers) of each process sharing ``pid``'s memory
    among its parent and, ``with_children``, its children."""
    ppid = read_stat(pid).ppid
    asked = [(ppid, "parent")] if ppid > 0 else []
    if with_children:
        asked += [(c, "child") for c in children(pid)]
    return [(p, who, _same(pid, p, KCMP_SIGHAND)) for p, who in asked if _same(pid, p, KCMP_VM)]


def _in_vfork(pid: int) -> bool:
    """A thread of the process waits in vfork() for its child (the freeze refuses that itself, with
    its own words: Frozen.prepare)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if f.read().strip() == "kernel_clone":
                    return True
    return False


def refuse(pid: int, with_children: bool) -> None:
    """TargetError naming the first process sharing ``pid``'s memory (sharers()), if any."""
    for other, who, sighand in sharers(pid, with_children):
        if who == "child" and not sighand and _in_vfork(pid):
            continue
        what = "memory and signal handlers" if sighand else "memory"
        raise TargetError(
            f"process {pid} shares its {what} with process {other} (its {who}; clone(CLONE_VM) "
            f"without CLONE_THREAD, or vfork), which would run on while it is frozen and which a "
            "restore could not share them with again"
        )
