"""Kernel feature probes for `ckpt check`: each feature is tried for real, never guessed from versions."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ckpt import sysno as nr
from ckpt.memory import PM_SOFT_DIRTY, pagemap_entry, pagemap_scan_supported
from ckpt.proc.maps import PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass
class Feature:
    name: str
    ok: bool
    detail: str


def _probe_soft_dirty() -> Feature:
    """Clear our own soft-dirty bits, write one page, and look for bit 55 on it."""
    m = mmap.mmap(-1, PAGE_SIZE * 2, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0:1] = b"x"
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("4")
        except OSError as e:
            return Feature("soft-dirty", False, f"clear_refs: {e.strerror}")
        before = pagemap_entry(os.getpid(), addr)
        m[1:2] = b"y"
        after = pagemap_entry(os.getpid(), addr)
        if before & PM_SOFT_DIRTY:
            return Feature(
                "soft-dirty", False, "bit 55 still set after clear_refs 4 (clearing does not work)"
            )
        if not after & PM_SOFT_DIRTY:
            return Feature(
                "soft-dirty",
                False,
                "a written page never shows bit 55 (kernel built without CONFIG_MEM_SOFT_DIRTY)",
            )
        return Feature("soft-dirty", True, "clear_refs 4 clears bit 55; a write sets it")
    finally:
        m.close()


def _probe_uffd_wp_async() -> Feature:
    fd = _libc.syscall(nr.USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        e = ctypes.get_errno()
        return Feature("uffd-wp-async", False, f"userfaultfd(): {os.strerror(e)}")
    try:
        api = (ctypes.c_uint64 * 3)(nr.UFFD_API, nr.UFFD_FEATURE_WP_ASYNC | nr.UFFD_FEATURE_WP_UNPOPULATED, 0)
        if _libc.ioctl(fd, ctypes.c_ulong(nr.UFFDIO_API), ctypes.byref(api)) < 0:
            e = ctypes.get_errno()
            return Feature(
                "uffd-wp-async", False, f"UFFDIO_API with WP_ASYNC|WP_UNPOPULATED: {os.strerror(e)}"
            )
        return Feature("uffd-wp-async", True, f"UFFDIO_API features {api[1]:#x}")
    finally:
        os.close(fd)


def _probe_pagemap_scan() -> Feature:
    ok = pagemap_scan_supported()
    return Feature("pagemap-scan", ok, "PAGEMAP_SCAN ioctl answers" if ok else "ioctl refused (Linux < 6.7?)")


def _with_child(fn: Callable[[int, int], Feature]) -> Feature:
    """Run a probe against a forked child that holds a page of known bytes at a known address."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        buf = ctypes.create_string_buffer(b"ckpt-probe-bytes", PAGE_SIZE)
        os.write(w, ctypes.addressof(buf).to_bytes(8, "little"))
        while True:
            signal.pause()
    os.close(w)
    try:
        addr = int.from_bytes(os.read(r, 8), "little")
        return fn(pid, addr)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _probe_ptrace(pid: int, addr: int) -> Feature:
    from ckpt.ptrace.resumestop import frozen_briefly

    try:
        t0 = time.perf_counter()
        got = frozen_briefly(pid, lambda fz: fz.syscall(nr.GETPID))
        ms = (time.perf_counter() - t0) * 1e3
    except Exception as e:  # a probe reports, it does not fail
        return Feature("ptrace", False, f"seize/interrupt/inject: {e}")
    if got != pid:
        return Feature("ptrace", False, f"injected getpid() returned {got}, expected {pid}")
    return Feature("ptrace", True, f"PTRACE_SEIZE + INTERRUPT + injected syscall, {ms:.1f} ms")


def _probe_proc_mem(pid: int, addr: int) -> Feature:
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            data = os.pread(fd, 16, addr)
        finally:
            os.close(fd)
    except OSError as e:
        return Feature("proc-mem", False, e.strerror or str(e))
    return Feature("proc-mem", data == b"ckpt-probe-bytes", "pread of /proc/PID/mem")


def _probe_vm_readv(pid: int, addr: int) -> Feature:
    import numpy as np

    from ckpt.memory import PageBuffer, read_pages

    buf = PageBuffer(1)
    try:
        page = addr & ~(PAGE_SIZE - 1)
        rr = read_pages(pid, np.array([page], dtype=np.uint64), buf)
        off = addr - page
        ok = len(rr.addrs) == 1 and bytes(buf.view[off : off + 16]) == b"ckpt-probe-bytes"
        return Feature(
            "process-vm-readv", ok, "read another process's page" if ok else "bytes differ or read failed"
        )
    except OSError as e:
        return Feature("process-vm-readv", False, e.strerror or str(e))
    finally:
        buf.close()


def _probe_tcp() -> Feature:
    from ckpt import netlock
    from ckpt.proc.tcp import probe_tcp_repair

    ok, detail = probe_tcp_repair()
    if ok:
        ok, lock = netlock.probe()
        detail = f"{detail}; {lock}"
    return Feature("tcp-repair", ok, detail)


def _probe_idle_poll() -> Feature:
    """Whether a freeze can keep the idle CPUs polling (ckpt/idlepoll.py): the request taken, the
    kernel's aggregate read back as 0, and let go."""
    from ckpt import idlepoll

    if not idlepoll.enabled():
        return Feature("idle-poll", False, "off (CKPT_IDLE_POLL=0)")
    h = idlepoll.hold()
    if h is None:
        return Feature("idle-poll", False, f"cannot open {idlepoll.DEVICE} for writing")
    try:
        now = idlepoll.current()
    finally:
        idlepoll.release(h)
    if now != 0:
        return Feature("idle-poll", False, f"{idlepoll.DEVICE} reads {now} while 0 is asked")
    return Feature("idle-poll", True, f"{idlepoll.DEVICE}: idle CPUs poll while a target is frozen")


@dataclass
class CheckReport:
    kernel: str
    features: list[Feature]
    auto_tracker: str

    def to_dict(self) -> dict[str, object]:
        return {
            "kernel": self.kernel,
            "features": {f.name: {"ok": f.ok, "detail": f.detail} for f in self.features},
            "auto_tracker": self.auto_tracker,
        }


def check() -> CheckReport:
    feats = [
        _with_child(_probe_ptrace),
        _with_child(_probe_proc_mem),
        _with_child(_probe_vm_readv),
        _probe_soft_dirty(),
        _probe_uffd_wp_async(),
        _probe_pagemap_scan(),
        _probe_tcp(),
        _probe_idle_poll(),
    ]
    by = {f.name: f.ok for f in feats}
    if by["soft-dirty"]:
        auto = "soft-dirty"
    elif by["uffd-wp-async"] and by["pagemap-scan"] and by["ptrace"]:
        auto = "uffd-wp"
    else:
        auto = "hash"
    return CheckReport(os.uname().release, feats, auto)


__all__ = ["CheckReport", "Feature", "asdict", "check"]
