"""The only place in ckpt that calls ptrace: freezing a process, its registers, remote syscalls.

raw.py (requests and waits), regs.py (register sets), mem.py (/proc/PID/mem), tracee.py (per-thread
stop state), inject.py (remote syscalls), signals.py (deferred Ctrl-C), freeze.py (Frozen), binding.py
(the ptrace() call and the register struct), gcpause.py (no garbage collection while frozen),
rtboost.py (the freezing thread real-time while frozen).
"""

from ckpt.ptrace.freeze import Frozen
from ckpt.ptrace.inject import SigAction
from ckpt.ptrace.signals import deferred_signals
from ckpt.ptrace.tracee import HeldSignal, release_orphans

__all__ = ["Frozen", "HeldSignal", "SigAction", "deferred_signals", "release_orphans"]
