"""Which signal actions a restore helper already has, so that only the others are set.

A helper runs the stub (helper.py) from an execve(), and execve leaves every action SIG_DFL, except
those ignored before it, which stay SIG_IGN, each with no flags, an empty mask and no restorer
(flush_signal_handlers, kernel/signal.c). A tree's helpers are clone3()s of such a helper made before
any restore step, and no step of a restore sets an action before set_sigactions (the one other
rt_sigaction ckpt injects, tree.py's, is into a zombie's helper, which then exits). So at that
point an action is known from /proc/PID/status alone: SigIgn says which are SIG_IGN, and SigCgt
must be empty (a handler would mean the helper is not what this module assumes: then nothing is
skipped). A dumped action equal to what the helper has needs no call: most processes change a few
of their 64 actions, and one rt_sigaction each was ~60 calls to assemble, write and read back.
A single-step's forced SIGTRAP resets an ignored SIGTRAP to SIG_DFL (force_sig_info_to_task),
which is why the status is read at the moment of use, after every step before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ckpt.errors import CkptError
from ckpt.image.format import SigactionRecord
from ckpt.proc.stat import read_status

SIG_DFL, SIG_IGN = 0, 1


def helper_ignored(pid: int) -> int | None:
    """The mask of signals the helper ignores (bit sig-1), if its actions are as execve left them
    (no handler caught: SigCgt 0); None when that cannot be said."""
    try:
        st = read_status(pid)
        ign, cgt = int(st["SigIgn"], 16), int(st["SigCgt"], 16)
    except (CkptError, OSError, KeyError, ValueError):
        return None
    return ign if cgt == 0 else None


def to_set(actions: Sequence[SigactionRecord], ignored: int | None) -> list[SigactionRecord]:
    """The dumped `actions` that differ from what the helper has (all of them when `ignored` is
    None: the helper's actions unknown)."""
    if ignored is None:
        return list(actions)
    out = []
    for a in actions:
        have = SIG_IGN if ignored >> (a.sig - 1) & 1 else SIG_DFL
        if a.handler != have or a.flags or a.restorer or a.mask:
            out.append(a)
    return out
