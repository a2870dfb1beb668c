"""A restored main thread kept real-time up to its last stop, when a migration's downtime raised its
helper (ckpt/migrate/warm.py, boost.py).

The restore sets the dumped scheduling state from outside (props.set_from_outside) before the
commit, where a failure still aborts cleanly. The thread's trip back into the syscall it was dumped
in (resume.let_run, ptrace/parting.py) comes after, and is several more stops: each waited for a CPU
behind the machine's ordinary tasks once the thread had its own policy again (1.6-11 ms between
the COMMIT and RUNNING under the project's load, for ~0.5 ms of work). So the thread is raised
again right after its own state was set, and given its own policy back at its last stop, just
before it runs by itself: no instruction of the restored process runs raised.

The second setting cannot fail where the first did not (the same call on the same stopped thread);
should it anyway, the copy, committed by then, runs on, and the restore's warnings say so."""

from __future__ import annotations

import os

from ckpt.image.format import ThreadProps
from ckpt.rtprio import raise_thread
from ckpt.targetrt import write_slack


class LastSched:
    """`raise_again()` after the dumped state is set; `give_back()` at the last stop."""

    def __init__(self, tid: int, props: ThreadProps | None) -> None:
        self.tid = tid
        self.props = props
        self.raised = False
        self.note = ""

    def raise_again(self) -> None:
        if self.props is not None:
            self.raised = raise_thread(self.tid) is not None

    def give_back(self) -> None:
        if not self.raised or self.props is None:
            return
        self.raised = False
        try:
            os.sched_setscheduler(self.tid, self.props.policy, os.sched_param(self.props.rt_priority))
        except OSError as e:
            self.note = f"the restored process runs SCHED_FIFO 1: its own policy could not be set back ({e})"
            return
        # The raise's SCHED_OTHER comes back with the default slack, and a write while real-time
        # is ignored: the dumped slack is set again now.
        err = write_slack(self.tid, self.props.timerslack_ns)
        if err is not None:
            self.note = f"the restored process has the default timer slack: its own was not set back ({err})"
