"""What makes a multi-threaded layer unrestorable (plan.py asks; restore/threads.py builds the rest).

Every thread is cloned from the main one after it has the process's credentials, so a thread whose
own cloned state differed (ckpt.proc.threads: credentials, capabilities, seccomp, personality,
loginuid) cannot be given back: refused, naming it. A layer older than version 3 did not record the
threads' names nor that difference: its other threads are refused too.
"""

from __future__ import annotations

from ckpt.image.format import ThreadRecord


def thread_refusals(main: ThreadRecord, others: list[ThreadRecord]) -> list[str]:
    out: list[str] = []
    old = [t.tid for t in others if t.props is None or t.props.comm is None]
    if old:
        out.append(
            f"{len(others) + 1} threads in a layer older than format version 3, which did not record "
            "their names nor whether their credentials were the process's"
        )
    for t in others:
        if t.props is not None and t.props.own:
            out.append(f"thread {t.tid} has its own {', '.join(t.props.own)} (not the main thread's)")
        if len(t.xsave) != len(main.xsave):
            out.append(
                f"thread {t.tid} has {len(t.xsave)} bytes of FPU state, the main thread {len(main.xsave)}"
            )
    return out


def thread_warnings(others: list[ThreadRecord]) -> list[str]:
    """As for the main thread's (plan.check_props): the restored process's parent is `ckpt restore`."""
    return [
        f"thread {t.tid} has a parent-death signal ({t.props.pdeathsig}); its parent is now `ckpt "
        "restore`, so it gets that signal when ckpt restore --detach exits"
        for t in others
        if t.props is not None and t.props.pdeathsig
    ]
