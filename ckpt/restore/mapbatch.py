"""The dumped mappings made in runs of injected code (blob.py), not one ptrace round trip per call.

A small process's ~20 mappings of a few files were ~30 single-stepped syscalls (an openat per file,
an mmap per mapping, a close per file): each a setregs, a step, a wait for the helper to be
scheduled and stop, a getregs. Here the files are opened in one run, then the mappings made in
another (their names given too, PR_SET_VMA_ANON_NAME, whose failure is ignored as before: a kernel
without CONFIG_ANON_VMA_NAME) and the files closed at its end. A mapping of an object (memfd, SysV
segment...) is made by its own calls (objects.map_object) where it comes: the calls gathered before
it are run first, so the order of the mappings is the plan's. Every call of a run is made even after
one failed (blob.py), which is harmless here: a failure ends the restore and kills the helper; the
error names the first call of its run that failed. As every file is opened before any mapping is
made, a restore in which both an open and an earlier mapping would fail names the open (one by
one, it named the mapping): either way it is refused, naming a real cause.
"""

from __future__ import annotations

import os

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.ptrace.batch import Call
from ckpt.restore import blob
from ckpt.restore.remote import Remote

AT_FDCWD = nr.AT_FDCWD & (2**64 - 1)


class MapBatch:
    """Calls gathered for one run: each with the result it must give (`want`; None: any), and
    whether its failure ends the restore (`must`)."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.fds: dict[tuple[str, int], int] = {}
        self._calls: list[tuple[str, Call, int | None, bool]] = []

    def open_all(self, files: list[tuple[str, int]]) -> None:
        """Open each (path, flags) not open yet, in one run."""
        want = [f for f in dict.fromkeys(files) if f not in self.fds]
        calls = [
            (f"opening {path}", Call(nr.OPENAT, (AT_FDCWD, 0, flags | nr.O_CLOEXEC, 0), out_arg=1,
                                     inp=os.fsencode(path) + b"\0"))
            for path, flags in want
        ]  # fmt: skip
        for f, fd in zip(want, blob.check_all(self.remote, calls), strict=True):
            self.fds[f] = fd

    def add(self, what: str, call: Call, want: int | None = None, must: bool = True) -> None:
        self._calls.append((what, call, want, must))

    def run(self, close_files: bool = False) -> None:
        """The calls gathered so far (and, with `close_files`, a close of every file opened)."""
        if close_files:
            for fd in self.fds.values():
                self.add("closing a mapped file", Call(nr.CLOSE, (fd,)), must=False)
            self.fds = {}
        calls, self._calls = self._calls, []
        got = blob.run(self.remote, [c for _, c, _, _ in calls])
        for (what, _, want, must), r in zip(calls, got, strict=True):
            if not must:
                continue
            blob.check_ret(what, r.ret)
            if want is not None and r.ret != want:
                raise RestoreError(f"{what} landed at {r.ret:#x}")
