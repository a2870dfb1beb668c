"""Idle CPUs kept polling while a target is frozen: a CPU wake-up latency request of 0 (PM QoS).

Every stop of a frozen target is a hand-off: ckpt wakes a thread of the target (PTRACE_SINGLESTEP,
PTRACE_CONT, PTRACE_INTERRUPT), sleeps until it stops, and is woken by its stop. Between two such
round trips ckpt works (Python, ~0.1-0.3 ms) while the CPUs the target's threads last ran on sit
idle, and an idle CPU halts: on bare metal it enters a C-state, in a VM the vCPU leaves the guest
(HLT) and only the host can wake it. Measured on the 2-vCPU Firecracker guest of docs/benchmarks.md
(guest halt polling off): one injected getpid() by single-step, 300 times, from Python 90-115 us a
round trip; the same from C 12-17 us; the C tracer given 80 us of work between round trips, as the
Python one has, ~100 us. With every idle CPU polling instead of halting, the Python round trip is
20-24 us: the wake is an IPI to a running CPU, not a trip through the host.

The kernel's way to ask for that is its PM QoS interface (Documentation/power/pm_qos_interface.rst):
a process that opens /dev/cpu_dma_latency and writes a value holds a request on the CPUs' wake-up
latency for as long as the file stays open; the cpuidle governor then chooses no idle state whose
exit latency exceeds the least request, and with 0 that leaves POLL (the idle loop spins until the
CPU has work). A lowered request wakes every idle CPU at once (cpu_latency_qos_apply), so it is in
force when the write returns. Closing the file ends the request, and the kernel closes it at the
process's end whatever happens: nothing of it can outlive ckpt. A program ckpt runs does not
inherit it (O_CLOEXEC), nor does a child it forks (closed in the child at the fork: a forked
`ckpt service` worker or probe would hold it for as long as it lives). cyclictest and tuned's
latency-performance profile hold the same request.

Held from Frozen.prepare() (before the clock of the freeze: the write and its wake of the idle CPUs
take ~60 us here) to the end of the thaw; by a restore from its checks to the running process
(restore_process: its forks, stops and the helper's replies are hand-offs too); and, on each side
of a migration, by the downtime's window (migrate/boost.py). Its price: for that long the idle CPUs
spin (a few ms for a small process's freeze, the whole freeze of a large one), which on a VM is the
host's CPU time, and on a machine with SMT a sibling's share of its core (not measurable here:
docs/benchmarks.md).
CKPT_IDLE_POLL=0 never asks; 1 or unset asks where the device can be opened (root: it is 0600);
where it cannot, nothing changes and nothing is said. Only a cpuidle driver acts on the request: on
a kernel without one (/sys/devices/system/cpu/cpuidle/current_driver "none", as the v1252 build of
this machine's guest kernel, which lacks `haltpoll`), idle CPUs halt whatever it says, and each stop
of a freeze costs its round trip through the host again (docs/benchmarks.md, "The freeze's stops in
C; what a stop costs on this kernel build").
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["DEVICE", "ENABLED", "Held", "current", "enabled", "hold", "polling", "release"]

DEVICE = "/dev/cpu_dma_latency"
ENABLED: bool | None = None  # a test's or a benchmark's say (True: ask, False: never); None: CKPT_IDLE_POLL's
_ZERO = struct.pack("=i", 0)  # the request: a native s32 of microseconds


@dataclass
class Held:
    """An open request: the file whose closing ends it."""

    fd: int


_open: list[Held] = []  # the requests this process holds (a fork's child closes them: _in_child)


def _in_child() -> None:
    # The child's copies of the parent's requests: closed, and their Held marked so, so that a
    # release() in the child cannot close whatever file takes the same number later.
    for h in _open:
        if h.fd >= 0:
            fd, h.fd = h.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
    _open.clear()


os.register_at_fork(after_in_child=_in_child)


def enabled() -> bool:
    # Read at each freeze, not at import: a `ckpt service` serves commands with their own environments.
    if ENABLED is not None:
        return ENABLED
    return os.environ.get("CKPT_IDLE_POLL", "1") != "0"


def hold() -> Held | None:
    """Ask that idle CPUs poll until release(); None when not asked (disabled) or not possible (no
    such device, not allowed)."""
    if not enabled():
        return None
    try:
        fd = os.open(DEVICE, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        os.write(fd, _ZERO)
    except OSError:
        os.close(fd)
        return None
    h = Held(fd)
    _open.append(h)
    return h


def release(h: Held | None) -> None:
    """End the request (the kernel then lets idle CPUs halt again, once no other request holds them)."""
    if h is not None and h.fd >= 0:
        fd, h.fd = h.fd, -1
        with contextlib.suppress(ValueError):
            _open.remove(h)
        os.close(fd)


@contextmanager
def polling() -> Iterator[None]:
    """hold() for the block's length."""
    h = hold()
    try:
        yield
    finally:
        release(h)


def current() -> int | None:
    """The latency in force now (us): the least of every process's requests, or the kernel's default
    (2,000,000,000) where none is held; None when the device cannot be read."""
    try:
        fd = os.open(DEVICE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4)
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack("=i", data)[0] if len(data) == 4 else None
