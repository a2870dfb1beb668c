"""Where a migration's downtime goes, across both processes: with CKPT_MIGRATE_TIMELINE=FILE each
side appends `pid monotonic-ms event` lines to FILE (bench/bench_migrate.py --timeline reads them).
CLOCK_MONOTONIC is one clock for every process of the machine, so the two sides' lines interleave."""

from __future__ import annotations

import os
import time


def mark(event: str) -> None:
    """One line: pid, monotonic ms, the event, and the CPU ms of this process so far (all its
    threads: under load the wall time between two marks is mostly waiting for a CPU)."""
    path = os.environ.get("CKPT_MIGRATE_TIMELINE")  # (at each mark: a service imports this once)
    if path:
        now = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e3
        line = f"{os.getpid()} {now:.3f} {event} cpu={time.process_time() * 1e3:.3f}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
