"""/proc/PID/stat and status: identity, state, start time, mm fields, signal masks."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ckpt.errors import TargetError, TargetExited
from ckpt.proc.procfs import read_bytes

PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    start_time: int  # clock ticks after boot: with boot_id it names the process across pid reuse
    num_threads: int
    start_code: int
    end_code: int
    start_stack: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def is_zombie(self) -> bool:
        return self.state in ("Z", "X")


def _read(path: str, pid: int) -> bytes:
    return read_bytes(path, pid, denied=False)


def read_stat(pid: int, tid: int | None = None) -> ProcStat:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    raw = _read(path, pid).decode("utf-8", "replace")
    # comm is in parentheses and may itself contain ") ": split at the last one.
    lp, rp = raw.index("("), raw.rindex(")")
    comm = raw[lp + 1 : rp]
    f = raw[rp + 2 :].split()

    # f[0] is field 3 (state); field n is f[n - 3].
    def fld(n: int) -> int:
        return int(f[n - 3])

    return ProcStat(
        pid=int(raw[:lp]),
        comm=comm,
        state=f[0],
        ppid=fld(4),
        flags=fld(9),
        start_time=fld(22),
        num_threads=fld(20),
        start_code=fld(26),
        end_code=fld(27),
        start_stack=fld(28),
        start_data=fld(45),
        end_data=fld(46),
        start_brk=fld(47),
        arg_start=fld(48),
        arg_end=fld(49),
        env_start=fld(50),
        env_end=fld(51),
    )


def read_state_comm(pid: int, tid: int) -> tuple[str, str]:
    """A thread's state letter and its name, from its stat alone: half of read_stat's cost, which
    parses every field (a freeze reads this for each thread). The name is the comm file's own bytes
    (stat shows it unescaped), decoded as that file is read (surrogateescape)."""
    raw = _read(f"/proc/{pid}/task/{tid}/stat", pid)
    lp, rp = raw.index(b"("), raw.rindex(b")")
    state = raw[rp + 2 : rp + 3].decode("ascii", "replace")
    return state, raw[lp + 1 : rp].decode("utf-8", "surrogateescape")


def read_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for ln in _read(f"/proc/{pid}/status", pid).decode("utf-8", "replace").splitlines():
        k, _, v = ln.partition(":")
        out[k] = v.strip()
    return out


class Status(Mapping[str, str]):
    """/proc/PID/status as read_status gives it, each field found in the text when first asked for
    (a freeze asks ~20 of its ~55: a dict of them all made there cost ~0.05-0.1 ms, cold)."""

    __slots__ = ("_got", "_text")

    def __init__(self, text: str) -> None:
        self._text = "\n" + text
        self._got: dict[str, str | None] = {}

    def get(self, key: str, default: Any = None) -> Any:
        got = self._got.get(key, _UNSEEN)
        if got is _UNSEEN:
            text = self._text
            at = text.find(f"\n{key}:")
            if at < 0:
                got = None
            else:
                start = at + len(key) + 2
                end = text.find("\n", start)
                got = text[start : None if end < 0 else end].strip()
            self._got[key] = got
        return default if got is None else got

    def __getitem__(self, key: str) -> str:
        got = self.get(key)
        if got is None:
            raise KeyError(key)
        return str(got)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def _all(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ln in self._text[1:].splitlines():
            k, _, v = ln.partition(":")
            out[k] = v.strip()
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


_UNSEEN = object()


def read_status_lazy(pid: int) -> Status:
    """read_status's fields, each found when asked for (Status)."""
    return Status(_read(f"/proc/{pid}/status", pid).decode("utf-8", "replace"))


def status_fields(pid: int, keys: tuple[str, ...]) -> dict[str, str]:
    """Only these fields of /proc/PID/status (as read_status gives them; those absent left out),
    found in the text instead of a dict of all ~55 lines made."""
    status = read_status_lazy(pid)
    return {k: v for k in keys if (v := status.get(k)) is not None}


def list_threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        raise TargetExited(f"process {pid} does not exist (or exited)") from None


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def check_dumpable(pid: int) -> ProcStat:
    """Refuse, with one clear sentence, the pids ckpt must never try to seize."""
    if pid <= 0:
        raise TargetError(f"invalid pid {pid}")
    if pid == os.getpid():
        raise TargetError(f"pid {pid} is ckpt itself; it cannot dump its own process")
    if not os.path.exists(f"/proc/{pid}"):
        raise TargetError(f"no process with pid {pid}")
    st = read_stat(pid)
    if st.pid != pid:
        # /proc/TID of a non-leader thread resolves too; we dump whole thread groups only.
        raise TargetError(f"pid {pid} is a thread of process {st.pid}; give the process id")
    status = read_status(pid)
    tgid = int(status.get("Tgid", pid))
    if tgid != pid:
        raise TargetError(f"pid {pid} is a thread of process {tgid}; give the process id")
    if st.is_kernel_thread:
        raise TargetError(f"pid {pid} ({st.comm}) is a kernel thread; it has no user memory to dump")
    if st.is_zombie:
        raise TargetError(f"pid {pid} ({st.comm}) is a zombie; it has exited and has no memory to dump")
    if pid == os.getppid():
        raise TargetError(f"pid {pid} is ckpt's parent; dumping it would deadlock on our own wait")
    return st
