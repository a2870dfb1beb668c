"""The restore's plan made on a thread of its own while the helper starts.

Starting the helper (fork and exec of the stub, its clone3, the pipe that says the child's pid,
the seize) is mostly waiting on the kernel; planning the restore (the checks, the page table) is
Python that holds the GIL: side by side they overlap. The helper is started and seized by the
calling thread, the one that restores it (ptrace's tracer is a thread, not a process), so that it
is under PTRACE_O_EXITKILL as soon as before; the plan, free of side effects, may run anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

from ckpt.restore import caller
from ckpt.restore.handoff import in_thread
from ckpt.restore.helper import Helper, kill_helper, spawn_helper
from ckpt.restore.plan import RestorePlan


def plan_beside_helper(make: Callable[[], RestorePlan], want_pid: int) -> tuple[RestorePlan, Helper]:
    """(make(), a seized helper with `want_pid` if free). Should the plan refuse, that refusal is
    raised (before any error of the helper's: it is what a user must read) and no helper is left."""
    planned = in_thread(make, "ckpt-plan")
    try:
        helper = spawn_helper(want_pid if want_pid != caller.pid() else None)
    except BaseException as e:
        err = planned.exception()  # waits for the plan
        if err is not None:
            raise err from None
        raise e
    try:
        plan = planned.result()
    except BaseException:
        kill_helper(helper.pid)
        raise
    return plan, helper
