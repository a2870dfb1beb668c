"""Per-thread state read from outside, for a multi-threaded restore (issue 12 B2).

A restore makes every thread by cloning the main one once that one has the process's credentials
and settings, so whatever the kernel keeps per thread and the clone copies (credentials,
capabilities, no_new_privs, seccomp filters, personality, loginuid) comes back as the main thread's.
A thread whose own differs is recorded with the names of what differs (`own`): the restore refuses
it rather than give that thread the main thread's. Everything here is a /proc read: nothing is
injected, so the freeze grows by a few file reads per thread.
"""

from __future__ import annotations

from typing import Any

from ckpt.proc.procfs import read_text

# /proc/PID/task/TID/status lines that are the thread's own and that clone copies from its creator.
CLONED_STATUS = {
    "Uid": "user ids",
    "Gid": "group ids",
    "Groups": "supplementary groups",
    "CapInh": "inheritable capabilities",
    "CapPrm": "permitted capabilities",
    "CapEff": "effective capabilities",
    "CapBnd": "capability bounding set",
    "CapAmb": "ambient capabilities",
    "NoNewPrivs": "no_new_privs",
    "Seccomp": "seccomp mode",
    "Seccomp_filters": "seccomp filters",
    "Speculation_Store_Bypass": "speculative store bypass control",
    "SpeculationIndirectBranch": "indirect branch speculation control",
}
# Files of /proc/PID/task/TID that are per thread and copied by clone.
CLONED_FILES = {"personality": "personality", "loginuid": "loginuid"}


def _read(pid: int, tid: int, name: str) -> str | None:
    return read_text(
        f"/proc/{pid}/task/{tid}/{name}",
        pid,
        errors="surrogateescape",
        gone=f"thread {tid} of process {pid} exited",
        denied=False,
        missing_ok=name in CLONED_FILES,  # a kernel without CONFIG_AUDIT has no loginuid
    )


def _status(pid: int, tid: int) -> dict[str, str]:
    out = {}
    for ln in (_read(pid, tid, "status") or "").splitlines():
        k, _, v = ln.partition(":")
        if k in CLONED_STATUS:
            out[k] = " ".join(v.split())
    return out


def _cloned(pid: int, tid: int) -> dict[str, str | None]:
    state: dict[str, str | None] = dict(_status(pid, tid))
    for name in CLONED_FILES:
        got = _read(pid, tid, name)
        state[name] = None if got is None else got.strip()
    return state


def thread_comm(pid: int, tid: int) -> str:
    """The thread's name (at most 15 bytes; not UTF-8 necessarily)."""
    return (_read(pid, tid, "comm") or "").rstrip("\n")


def add_thread_state(pid: int, threads: dict[int, dict[str, Any]]) -> None:
    """Add `comm` and `own` to each thread's props (ckpt.proc.props._thread_props dicts): its name,
    and what of its cloned state differs from the main thread's (pid's)."""
    # Only another thread is compared with the main one: a single-threaded process (the common
    # case) needs none of its reads (~0.1 ms of the freeze).
    main = _cloned(pid, pid) if pid in threads and len(threads) > 1 else {}
    names = {**CLONED_STATUS, **CLONED_FILES}
    for tid, tp in threads.items():
        tp["comm"] = thread_comm(pid, tid)
        if tid == pid:
            tp["own"] = []
            continue
        mine = _cloned(pid, tid)
        tp["own"] = [names[k] for k in names if mine.get(k) != main.get(k)]
