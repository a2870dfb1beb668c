"""The only place in ckpt that calls ptrace: freezing a process, its registers, remote syscalls.

raw.py (requests and waits), regs.py (register sets), mem.py (/proc/PID/mem), tracee.py (per-thread
stop state), inject.py (remote syscalls), signals.py (deferred Ctrl-C), freeze.py (Frozen).
"""

import ctypes
import sys
import types


def _preload_libc() -> None:
    """python-ptrace finds libc with ctypes.util.find_library, which runs `ldconfig -p` in a child
    process and imports shutil: ~6-10 ms of every ckpt command that traces. The C library this
    process already has loaded is the one it would find; give it that before its first import."""
    if "ptrace.ctypes_libc" in sys.modules:
        return
    m = types.ModuleType("ptrace.ctypes_libc")
    m.LIBC_FILENAME = "libc.so.6"  # type: ignore[attr-defined]
    m.libc = ctypes.CDLL(None, use_errno=True)  # type: ignore[attr-defined]
    sys.modules[m.__name__] = m


_preload_libc()

from ckpt.ptrace.freeze import Frozen  # noqa: E402
from ckpt.ptrace.inject import SigAction  # noqa: E402
from ckpt.ptrace.signals import deferred_signals  # noqa: E402
from ckpt.ptrace.tracee import HeldSignal, release_orphans  # noqa: E402

__all__ = ["Frozen", "HeldSignal", "SigAction", "deferred_signals", "release_orphans"]
