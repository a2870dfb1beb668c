"""Open a file with the rights of a dumped process, not ckpt's.

A layer names files (mappings, fds, exe, cwd) and claims credentials; both are untrusted. ckpt often
runs as root, so opening a named file with its own rights would hand a crafted layer whatever root
can read. Here the open happens in a thread of its own whose kernel credentials are first switched
to the layer's filesystem ids, supplementary groups and (when the layer records them) effective
capabilities: the kernel's own permission checks (mode bits, ACLs, directory search, LSMs) decide.

Credentials are per thread in the kernel; only glibc's wrappers broadcast set*id calls to every
thread. The raw syscalls below change the calling thread alone, and that thread ends after the open,
taking its credentials with it.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from typing import TYPE_CHECKING

from ckpt import sysno as nr
from ckpt.threadpool import start as start_thread

if TYPE_CHECKING:  # ckpt.image uses this module
    from ckpt.image.format import TaskRecord

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
CAP_V3 = 0x20080522
NO_ID = 0xFFFFFFFF


def _sys(n: int, *args: int | ctypes.Array[ctypes.c_char]) -> int:
    conv = (a if isinstance(a, ctypes.Array) else ctypes.c_long(a) for a in args)
    r = _libc.syscall(ctypes.c_long(n), *conv)
    return int(r) if r >= 0 else -ctypes.get_errno()


def _capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread."""
    hdr = ctypes.create_string_buffer(struct.pack("<Ii", CAP_V3, 0), 8)
    data = ctypes.create_string_buffer(24)
    if _sys(nr.CAPGET, hdr, data) < 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    e0, p0, i0, e1, p1, i1 = struct.unpack("<6I", data.raw)
    return e0 | e1 << 32, p0 | p1 << 32, i0 | i1 << 32


def _capset(eff: int, prm: int, inh: int) -> int:
    hdr = ctypes.create_string_buffer(struct.pack("<Ii", CAP_V3, 0), 8)
    m = 0xFFFFFFFF
    data = ctypes.create_string_buffer(
        struct.pack("<6I", eff & m, prm & m, inh & m, eff >> 32 & m, prm >> 32 & m, inh >> 32 & m), 24
    )
    return _sys(nr.CAPSET, hdr, data)


def _become(task: TaskRecord) -> None:
    """Switch the calling thread to the task's filesystem rights, or fail: never open with more.

    Without the privilege to switch (ckpt not root), the thread keeps ckpt's own ids: the kernel
    then checks ckpt's rights, which the user running it has anyway."""
    fsuid, fsgid = task.uid[3], task.gid[3]
    groups = (ctypes.c_uint32 * max(len(task.groups), 1))(*task.groups)
    me = os.geteuid()
    r = _libc.syscall(ctypes.c_long(nr.SETGROUPS), ctypes.c_long(len(task.groups)), groups)
    if r < 0 and me == 0:
        raise OSError(ctypes.get_errno(), "cannot take the process's groups")
    for call, want in ((nr.SETFSGID, fsgid), (nr.SETFSUID, fsuid)):
        _sys(call, want)
        if _sys(call, NO_ID) != want and me == 0:
            raise PermissionError(1, "cannot take the process's filesystem ids")
    eff, prm, inh = _capget()
    # setfsuid away from 0 already dropped the filesystem capabilities; a recorded effective set
    # narrows the rest (a root process that gave up CAP_DAC_OVERRIDE reads no more than it could).
    want_eff = eff & task.security.cap_eff if task.security is not None else eff
    if task.security is None and fsuid == 0:
        want_eff = eff  # a format 1 layer records no capabilities: a root process had them all
    if want_eff != eff and _capset(want_eff, prm, inh) < 0:
        raise OSError(ctypes.get_errno(), "cannot narrow the capabilities")


def open_as(task: TaskRecord, path: str, flags: int, mode: int = 0) -> int:
    """os.open(path, flags) with the rights of the process `task` describes; raises OSError."""
    out = open_many_as(task, [path], flags, mode)[0]
    if isinstance(out, BaseException):
        raise out
    return out


def open_many_as(task: TaskRecord, paths: list[str], flags: int, mode: int = 0) -> list[int | BaseException]:
    """open_as for each of `paths`, in one thread (a thread's start is ~0.3-2 ms, a restore of a
    process with a dozen private file mappings paid it for each): for each path its fd, or what
    open_as would have raised (the switch's own failure, for every path, if that failed)."""
    result: list[int | BaseException] = []

    def run() -> None:
        try:
            _become(task)
        except BaseException as e:  # handed to the caller's thread
            result.extend([e] * len(paths))
            return
        for path in paths:
            try:
                result.append(os.open(path, flags | os.O_CLOEXEC, mode))
            except BaseException as e:
                result.append(e)

    th = threading.Thread(target=run, name="ckpt-open-as", daemon=True)
    start_thread(th)
    th.join()
    if len(result) != len(paths):  # (the thread cut short: every fd it opened is closed)
        for fd in result:
            if isinstance(fd, int):
                os.close(fd)
        raise RuntimeError("the thread opening files with the process's rights ended early")
    return result
