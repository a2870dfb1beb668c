"""The destination's last restore step on one CPU: the warm-restore thread (the tracer) and the
restore helper pinned to the CPU the tracer runs on, from the final layer until the helper's own
affinity is set from the dump (props.set_sched, just before the commit).

`complete` is a ping-pong of ~20 ptrace stops and runs of injected code between the two. Left to the
scheduler, each wake-up of one by the other may land on the other CPU: an inter-processor interrupt,
or on an idle CPU of this kind of VM (cpuidle haltpoll with guest_halt_poll_ns=0: an idle vCPU halts
at once) a halted vCPU that the host must schedule again first. On one CPU the tracer blocks in its
wait and the helper runs right there, and back: measured at load 12-15 (bench_migrate --only aims),
`complete` 4.6 -> 3.5 ms median.

Only where the helper's affinity is set again from the dump for the main thread and every other
thread (each record's props.affinity), so that no restored thread keeps the pin. The calling thread
keeps it: it must be one that ends with the restore (the warm restore's thread does,
restore/resume.exits_after). Best effort; CKPT_MIGRATE_PIN=0 turns it off (to measure)."""

from __future__ import annotations

import contextlib
import os

from ckpt.restore.plan import RestorePlan


def enabled() -> bool:
    return os.environ.get("CKPT_MIGRATE_PIN", "1") != "0"


def current_cpu() -> int | None:
    """The CPU the calling thread runs on (field 39 of its stat)."""
    try:
        with open("/proc/thread-self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def given_back(plan: RestorePlan) -> bool:
    """Whether the restore sets every thread's affinity from the dump (and so takes the pin off)."""
    return all(t.props is not None and t.props.affinity for t in [plan.thread, *plan.threads])


def pin_helper(helper: int, plan: RestorePlan) -> bool:
    """The calling thread and `helper` on the calling thread's CPU; whether they were."""
    if not enabled() or not given_back(plan):
        return False
    cpu = current_cpu()
    if cpu is None:
        return False
    with contextlib.suppress(OSError):
        os.sched_setaffinity(helper, {cpu})
        os.sched_setaffinity(0, {cpu})
        return True
    return False
