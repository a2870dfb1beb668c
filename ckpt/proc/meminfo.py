"""/proc/meminfo's MemAvailable: what a restore or a dump may allocate without pushing the machine
into reclaim or the OOM killer (the kernel's own estimate, page cache that can be dropped included)."""

from __future__ import annotations


def available(*, swap: bool = False) -> int | None:
    """MemAvailable in bytes, plus SwapFree with `swap`; None when /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo", "rb") as f:
            info = {k: v for k, _, v in (ln.partition(b":") for ln in f)}
        kb = int(info[b"MemAvailable"].split()[0])
        if swap:
            kb += int(info.get(b"SwapFree", b"0 kB").split()[0])
        return kb * 1024
    except (OSError, ValueError, KeyError, IndexError):
        return None
