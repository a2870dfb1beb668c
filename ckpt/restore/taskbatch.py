"""From the working directory to the robust futex list in one run of injected code (blob.py): the
chdir, the capabilities given back after the files (creds.leave_files), the mm fields, the name, the
signal actions, the umask, the personality (task.set_mm, set_sigactions, set_process), THP, the
membarrier and rseq registrations (props.set_task_props) and the main thread's sigaltstack,
clear_child_tid and robust list (props.set_thread_state). One by one they were ten or so
single-stepped syscalls and a run (each step a ptrace round trip that waits for the helper to be
scheduled, ~0.1-0.2 ms; inside a migration's downtime).

The same calls in the same order, with the same errors: the first failed call of the run is named
(every call runs even after one failed, harmless here: any failure ends the restore and kills the
helper). The chdir comes before the capabilities are raised again, as before: it is made with the
process's own rights. The auxiliary vector stays where set_mm puts it (task.AUXV_OFFSET in the
scratch area), clear of the run's own results and buffers, and the capability header at
creds.CAP_HDR_OFFSET past it; a run that would reach the auxv (a working directory's long path)
goes the one-by-one way, and so does a removed working directory (made again, entered, removed:
files.restore_cwd)."""

from __future__ import annotations

import os
import struct

from ckpt import sysno as nr
from ckpt.ptrace.batch import Call, data_size
from ckpt.restore import blob
from ckpt.restore.creds import CAP_HDR_OFFSET, CAP_V3, Caps, leave_files
from ckpt.restore.files import DELETED, restore_cwd
from ckpt.restore.plan import RestorePlan
from ckpt.restore.props import Step, own_state_calls, set_task_props, set_thread_state, task_props_calls
from ckpt.restore.remote import Remote
from ckpt.restore.task import AUXV_OFFSET, PRCTL_MM_MAP, set_mm, set_process, set_sigactions, sigaction_calls

MM_MAP_WHAT = "setting the mm fields (prctl PR_SET_MM_MAP)"
LEAVE_FILES_WHAT = "raising the capabilities again after opening files"


def set_task_state(remote: Remote, plan: RestorePlan, exe_fd: int, caps: Caps) -> None:
    """files.restore_cwd, creds.leave_files(caps), task.set_mm, set_sigactions, set_process,
    props.set_task_props, set_thread_state (and closes `exe_fd`)."""
    mm, t = plan.mm, plan.task
    calls: list[Step] = []
    cwd_apart = mm.cwd.endswith(DELETED)
    if not cwd_apart:
        path = os.fsencode(mm.cwd) + b"\0"
        calls.append((f"changing directory to {mm.cwd}", Call(nr.CHDIR, (0,), inp=path), True))
    # capset takes the header by a second pointer: it sits apart from the run's area
    hdr = remote.scratch + CAP_HDR_OFFSET
    eff, prm, inh = caps
    m = 0xFFFFFFFF
    data = struct.pack("<6I", eff & m, prm & m, inh & m, eff >> 32 & m, prm >> 32 & m, inh >> 32 & m)
    calls.append((LEAVE_FILES_WHAT, Call(nr.CAPSET, (hdr, 0), out_arg=1, inp=data), True))
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
    calls += task_props_calls(plan)
    if plan.thread.props is not None:
        calls += own_state_calls(plan.thread.props)
    if not remote.scratch or data_size([c for _, c, _ in calls]) > AUXV_OFFSET:
        restore_cwd(remote, plan)
        leave_files(remote, caps)
        set_mm(remote, plan, exe_fd)
        set_sigactions(remote, plan)
        set_process(remote, plan)
        set_task_props(remote, plan)
        set_thread_state(remote, plan)
        return
    if cwd_apart:
        restore_cwd(remote, plan)
    if mm.auxv:
        remote.put(mm.auxv, AUXV_OFFSET)
    remote.put(struct.pack("<Ii", CAP_V3, 0), CAP_HDR_OFFSET)
    got = blob.run(remote, [c for _, c, _ in calls])
    for (what, _, counts), r in zip(calls, got, strict=True):
        if counts:
            blob.check_ret(what, r.ret)
