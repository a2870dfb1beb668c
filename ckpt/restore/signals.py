"""Signals of the process's shared queue, sent again to the restored process as a whole.

A signal pending for the process (kill(2), sigqueue(3) to the pid), not for one thread, must go back
to the shared queue, where whichever thread has it unblocked first takes it: sent to one thread, it
would wait for that thread alone. The kernel lets another process queue a siginfo only with a
negative si_code other than SI_TKILL (sigqueue, timers, AIO): those keep their si_value. The others
go back with kill(), which keeps the number but names ckpt as the sender.
"""

from __future__ import annotations

import ctypes
import os

from ckpt.ptrace import raw

RT_SIGQUEUEINFO = 129

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def send_to_process(pid: int, sig: int, info: bytes | None) -> None:
    if info is not None:
        code = raw.siginfo_code(info)
        if code < 0 and code != raw.SI_TKILL:
            buf = ctypes.create_string_buffer(info, raw.SIGINFO_SIZE)
            args = (RT_SIGQUEUEINFO, pid, sig, ctypes.addressof(buf))
            if _libc.syscall(*(ctypes.c_long(a) for a in args)) == 0:
                return
    os.kill(pid, sig)
