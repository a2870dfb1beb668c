"""One process (not a tree) restored into a new pid namespace (`--pidns`, restore/pidns.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from ckpt.image import MergedView
from ckpt.restore.pidns import PidNamespace, refuse_pid_one
from ckpt.restore.plan import RestorePlan, make_plan
from ckpt.restore.restorer import RestoredProcess, complete, prepare


def restore_alone(
    view: MergedView,
    *,
    plan: RestorePlan | None = None,
    inherit_fds: dict[str, int] | None = None,
    before_run: Callable[[int], None] | None = None,
) -> RestoredProcess:
    """The process of `view`, pid 2 or more inside a new namespace whose init is its parent: its
    dumped pid, always free there. Run in the restore's tracer thread (restorer.restore_process)."""
    t0 = time.perf_counter()
    if plan is None:
        plan = make_plan(view, check_data=False, inherit_fds=inherit_fds)
    refuse_pid_one([plan.pid])
    check_ms = round((time.perf_counter() - t0) * 1e3, 3)
    ns = PidNamespace.make()
    try:
        prep = prepare(view, plan, helper=ns.fork(plan.pid))
        prep.timings = {"check": check_ms, **prep.timings}
        prep.t0 = t0
        rp = complete(prep, plan, before_run)
        ns.start(plan.pid)
    except BaseException:
        ns.kill()  # and with the init, whatever of the namespace still lives
        raise
    rp.init_pid, rp.pid_kept, rp.note = ns.init, True, ""
    return rp
