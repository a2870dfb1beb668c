"""The only place in ckpt that calls ptrace: freezing a process, its registers, remote syscalls.

raw.py (requests and waits), regs.py (register sets), mem.py (/proc/PID/mem), tracee.py (per-thread
stop state), inject.py (remote syscalls), signals.py (deferred Ctrl-C), freeze.py (Frozen), binding.py
(the ptrace() call and the register struct), gcpause.py (no garbage collection while frozen),
rtboost.py (the freezing thread real-time while frozen).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckpt.ptrace.freeze import Frozen
    from ckpt.ptrace.inject import SigAction
    from ckpt.ptrace.signals import deferred_signals
    from ckpt.ptrace.tracee import HeldSignal, release_orphans

# Each name from its module when first asked for: a restore uses raw, regs, batch, sigchld and
# parting, never a freeze (freeze, inject, tracee, signals, rtboost, gcpause, mem: ~3 ms of its start).
_FROM = {"Frozen": "freeze", "SigAction": "inject", "deferred_signals": "signals", "HeldSignal": "tracee",
         "release_orphans": "tracee"}  # fmt: skip


def __getattr__(name: str) -> Any:
    mod = _FROM.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"ckpt.ptrace.{mod}"), name)


__all__ = ["Frozen", "HeldSignal", "SigAction", "deferred_signals", "release_orphans"]
