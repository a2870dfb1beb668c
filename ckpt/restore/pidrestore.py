"""One process (not a tree) restored into a new pid namespace (`--pidns`, restore/pidns.py)."""

from __future__ import annotations

from collections.abc import Callable

from ckpt.image import MergedView
from ckpt.restore.helper import Helper
from ckpt.restore.pidns import PidNamespace, inside_pids, root_helper, root_notes
from ckpt.restore.plan import RestorePlan
from ckpt.restore.restorer import RestoredProcess, restore_one


def restore_alone(
    view: MergedView,
    t0: float,
    *,
    plan: RestorePlan | None = None,
    inherit_fds: dict[str, int] | None = None,
    before_run: Callable[[int], None] | None = None,
) -> RestoredProcess:
    """The process of `view`, pid 2 or more inside a new namespace whose init is its parent: the
    pid it saw (its dumped pid, or its pid inside the namespace it was dumped in), always free
    there; or, if that was pid 1 (it was its namespace's init), the new namespace's init itself.
    Run in the restore's tracer thread (restorer.restore_process)."""
    (want,) = inside_pids(view).values()  # refuses pid 1 before anything starts
    ns: PidNamespace | None = None

    def start_helper(plan: RestorePlan) -> Helper:
        nonlocal ns
        ns, helper = root_helper(plan, want)
        return helper

    def last_word(pid: int) -> None:
        # The init runs before the last word (a migration's commit): past the commit nothing may
        # fail, and a failed start kills the copy, which the original must outlive.
        assert ns is not None
        ns.start(want)
        if before_run is not None:
            before_run(pid)

    try:
        rp = restore_one(
            view, t0, plan=plan, inherit_fds=inherit_fds, before_run=last_word, start_helper=start_helper
        )
    except BaseException:
        if ns is not None:
            ns.kill()  # and with the init, whatever of the namespace still lives
        raise
    assert ns is not None
    rp.init_pid, rp.pid_kept, rp.note, rp.ns_pid = ns.init, True, "", want
    rp.warnings.extend(root_notes(view))
    return rp
