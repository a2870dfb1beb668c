"""The mm fields, the name, the signal actions, the umask and the personality in one run of injected
code (blob.py): task.set_mm, set_sigactions and set_process one after the other were five
single-stepped syscalls and a run (each step a ptrace round trip that waits for the helper to be
scheduled, ~0.1-0.2 ms; inside a migration's downtime).

The same calls in the same order, with the same errors: the first failed call of the run is named
(every call runs even after one failed, harmless here: any failure ends the restore and kills the
helper). The auxiliary vector stays where set_mm puts it (task.AUXV_OFFSET in the scratch area),
clear of the run's own results and buffers; a run that would reach it (hundreds of signal actions
cannot: there are 64) goes the one-by-one way."""

from __future__ import annotations

from ckpt import sysno as nr
from ckpt.ptrace.batch import Call, data_size
from ckpt.restore import blob
from ckpt.restore.plan import RestorePlan
from ckpt.restore.remote import Remote
from ckpt.restore.task import AUXV_OFFSET, PRCTL_MM_MAP, set_mm, set_process, set_sigactions, sigaction_calls

MM_MAP_WHAT = "setting the mm fields (prctl PR_SET_MM_MAP)"


def set_mm_actions_process(remote: Remote, plan: RestorePlan, exe_fd: int) -> None:
    """task.set_mm, set_sigactions, set_process (and closes `exe_fd`)."""
    mm, t = plan.mm, plan.task
    calls: list[tuple[str, Call, bool]] = []  # (what, call, whether its failure counts)
    rec_args = (
        mm.start_code, mm.end_code, mm.start_data, mm.end_data, mm.start_brk, mm.brk, mm.start_stack,
        mm.arg_start, mm.arg_end, mm.env_start, mm.env_end,
    )  # fmt: skip
    auxv = remote.scratch + AUXV_OFFSET if mm.auxv else 0
    rec = PRCTL_MM_MAP.pack(*rec_args, auxv, len(mm.auxv), exe_fd & 0xFFFFFFFF)
    mm_map = Call(nr.PRCTL, (nr.PR_SET_MM, nr.PR_SET_MM_MAP, 0, len(rec), 0), out_arg=2, inp=rec)
    calls.append((MM_MAP_WHAT, mm_map, True))
    if exe_fd >= 0:
        calls.append(("closing the executable", Call(nr.CLOSE, (exe_fd,)), False))
    if plan.comm:
        name = plan.comm.encode("utf-8", "surrogateescape")[:15] + b"\0"
        calls.append(("setting the name", Call(nr.PRCTL, (nr.PR_SET_NAME, 0), out_arg=1, inp=name), True))
    calls += [(what, c, True) for what, c in sigaction_calls(remote, plan)]
    calls.append(("setting the umask", Call(nr.UMASK, (t.umask,)), False))  # returns the old mask
    calls.append(("setting the personality", Call(nr.PERSONALITY, (t.personality,)), True))
    if not remote.scratch or data_size([c for _, c, _ in calls]) > AUXV_OFFSET:
        set_mm(remote, plan, exe_fd)
        set_sigactions(remote, plan)
        set_process(remote, plan)
        return
    if mm.auxv:
        remote.put(mm.auxv, AUXV_OFFSET)
    got = blob.run(remote, [c for _, c, _ in calls])
    for (what, _, counts), r in zip(calls, got, strict=True):
        if counts:
            blob.check_ret(what, r.ret)
