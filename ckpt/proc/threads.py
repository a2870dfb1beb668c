"""Per-thread state read from outside, for a multi-threaded restore (issue 12 B2).

A restore makes every thread by cloning the main one once that one has the process's credentials
and settings, so whatever the kernel keeps per thread and the clone copies (credentials,
capabilities, no_new_privs, seccomp filters, personality, loginuid) comes back as the main thread's.
A thread whose own differs is recorded with the names of what differs (`own`): the restore refuses
it rather than give that thread the main thread's. Everything here is a /proc read, but for what
the caller's injected batch answered already (personality) and what the caller read already (the
names, from each thread's stat): the freeze grows by two file reads per thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ckpt.proc import procfs
from ckpt.proc.procfs import as_text, read_text

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


# The lines of CLONED_STATUS in a status text: found at once, not each of its ~60 lines split
# (~25 us a thread in the freeze).
_CLONED_LINE = re.compile("^(" + "|".join(CLONED_STATUS) + "):(.*)$", re.M)


def _status(pid: int, tid: int, read: Mapping[str, str] | None = None) -> dict[str, str]:
    """The CLONED_STATUS fields, their blanks made one space. ``read``: the fields as the caller
    read them from this thread's status (read_status)."""
    if read is not None:
        return {k: " ".join(read[k].split()) for k in CLONED_STATUS if k in read}
    return _fields(_read(pid, tid, "status") or "")


def _fields(text: str) -> dict[str, str]:
    return {k: " ".join(v.split()) for k, v in _CLONED_LINE.findall(text)}


# A status text's lines from Uid: to Groups: and from CapInh: to SpeculationIndirectBranch: (where
# this kernel prints every CLONED_STATUS line, _spans_hold_all says): threads whose two spans are
# the same text have the same fields, parsed once (the parse is ~25 us a thread, the spans ~3).
_SPANS = (("\nUid:", "\nGroups:"), ("\nCapInh:", "\nSpeculationIndirectBranch:"))
_NEEDLES = tuple("\n" + k + ":" for k in CLONED_STATUS)
_layout: list[bool] = []  # (once per process: the kernel's layout of status does not change)


def _bounds(text: str) -> list[tuple[int, int]] | None:
    """Where ``text``'s two spans lie (start, end of its last line), or None where a span's first
    or last line is missing."""
    out = []
    for first, last in _SPANS:
        a, b = text.find(first), text.find(last)
        end = text.find("\n", b + 1) if b >= 0 else -1
        if a < 0 or end < 0 or b < a:
            return None
        out.append((a, end))
    return out


def _spans(text: str) -> str | None:
    """The two spans of ``text`` as one key, or None where one cannot be found."""
    bounds = _bounds(text)
    return None if bounds is None else "".join(text[a:e] for a, e in bounds)


def _spans_hold_all(text: str) -> bool:
    """Whether every CLONED_STATUS line that ``text`` has lies inside its two spans."""
    bounds = _bounds(text)
    if bounds is None:
        return False
    return all((i := text.find(n)) < 0 or any(a <= i < e for a, e in bounds) for n in _NEEDLES)


def _cloned(
    pid: int,
    tid: int,
    personality: Mapping[int, int],
    status: Mapping[str, str] | None = None,
    early: Mapping[int, Mapping[str, str | None]] | None = None,
) -> dict[str, str | None]:
    """The thread's CLONED_STATUS and CLONED_FILES. ``early``: what read_cloned read of it."""
    known = early.get(tid) if early is not None else None
    state: dict[str, str | None] = dict(known) if known is not None else dict(_status(pid, tid, status))
    for name in CLONED_FILES:
        if name == "personality" and tid in personality:  # (as the file shows it)
            state[name] = f"{personality[tid] & 0xFFFFFFFF:08x}"
        elif known is None or name not in known:
            got = _read(pid, tid, name)
            state[name] = None if got is None else got.strip()
    return state


def main_state(pid: int, personality: Mapping[int, int], status: Mapping[str, str]) -> dict[str, str | None]:
    """The main thread's CLONED_STATUS (from its ``status`` as read_status read it) and CLONED_FILES
    (its personality() answer, or the file; its loginuid file): what add_thread_state compares the
    others with (its ``main``), read while frozen."""
    return _cloned(pid, pid, personality, status)


def read_cloned(pid: int, tids: Sequence[int]) -> dict[int, dict[str, str | None]]:
    """Of each thread: its CLONED_STATUS fields and its loginuid, for add_thread_state's ``early``.
    Made to be read while the threads run an injected batch (Frozen.batch's ``meanwhile``), whose
    calls change none of these: the freeze's two file reads a thread overlap the batch's run."""
    return cloned_of({tid: (_read(pid, tid, "status") or "", _read(pid, tid, "loginuid")) for tid in tids})


def take_cloned(pid: int, tids: Sequence[int]) -> dict[int, tuple[bytes, bytes]] | None:
    """Of each thread, its status and loginuid as ckpt/proc/grab.py read them in this freeze (taken
    from the grab: no /proc read), for cloned_of once the freeze is over; None where the grab lacks
    one (read_cloned then reads what is left)."""
    out: dict[int, tuple[bytes, bytes]] = {}
    for tid in tids:
        status = procfs.take_file(f"/proc/{pid}/task/{tid}/status")
        loginuid = procfs.take_file(f"/proc/{pid}/task/{tid}/loginuid")
        if status is None or loginuid is None:
            return None
        out[tid] = (status, loginuid)
    return out


def decoded(raw: Mapping[int, tuple[bytes, bytes]]) -> dict[int, tuple[str, str | None]]:
    """take_cloned's bytes as read_cloned's reads decode them."""
    return {
        tid: (as_text(st, "surrogateescape"), as_text(lu, "surrogateescape")) for tid, (st, lu) in raw.items()
    }


def cloned_of(texts: Mapping[int, tuple[str, str | None]]) -> dict[int, dict[str, str | None]]:
    """read_cloned's answer from each thread's status and loginuid texts (None: no loginuid file)."""
    out: dict[int, dict[str, str | None]] = {}
    parsed: dict[str, dict[str, str]] = {}  # _spans -> fields: threads alike are parsed once
    for tid, (text, got) in texts.items():
        key = _spans(text)
        if key is not None and not _layout:
            _layout.append(_spans_hold_all(text))
        if key is not None and not _layout[0]:
            key = None
        fields = parsed.get(key) if key is not None else None
        if fields is None:
            fields = _fields(text)
            if key is not None:
                parsed[key] = fields
        state: dict[str, str | None] = dict(fields)
        state["loginuid"] = None if got is None else got.strip()
        out[tid] = state
    return out


def thread_comm(pid: int, tid: int) -> str:
    """The thread's name (at most 15 bytes; not UTF-8 necessarily)."""
    return (_read(pid, tid, "comm") or "").rstrip("\n")


def add_thread_state(
    pid: int,
    threads: dict[int, dict[str, Any]],
    comms: Mapping[int, str] | None = None,
    personality: Mapping[int, int] | None = None,
    main_status: Mapping[str, str] | None = None,
    early: Mapping[int, Mapping[str, str | None]] | None = None,
    main: Mapping[str, str | None] | None = None,
) -> None:
    """Add `comm` and `own` to each thread's props (ckpt.proc.props._thread_props dicts): its name,
    and what of its cloned state differs from the main thread's (pid's). ``comms``: the names as
    the caller read them in this freeze (read_state_comm); ``personality``: what personality()
    answered in each thread (an injected batch); the files are read for those not given.
    ``main_status``: /proc/PID/status as read_status read it in this freeze (the main thread's).
    ``early``: read_cloned's reads of other threads in this freeze."""
    comms = comms or {}
    personality = personality or {}
    # Only another thread is compared with the main one: a single-threaded process (the common
    # case) needs none of its reads (~0.1 ms of the freeze).
    if main is None:
        main = _cloned(pid, pid, personality, main_status) if pid in threads and len(threads) > 1 else {}
    names = {**CLONED_STATUS, **CLONED_FILES}
    for tid, tp in threads.items():
        comm = comms.get(tid)
        tp["comm"] = thread_comm(pid, tid) if comm is None else comm
        if tid == pid:
            tp["own"] = []
            continue
        mine = _cloned(pid, tid, personality, early=early)
        tp["own"] = [names[k] for k in names if mine.get(k) != main.get(k)]
