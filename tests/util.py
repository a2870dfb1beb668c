"""Shared test helpers: build C targets, run them under control, run the ckpt CLI.

Targets report readiness and answer commands through pipes, so no test ever sleeps and hopes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ROOT / "tests" / "targets"
BIN = TARGETS / "bin"
PAGE = 4096
# The seed of every property test (hypothesis): fixed so that a run replays; set CKPT_HYPOTHESIS_SEED
# to explore others. pytest's header prints it.
HYPOTHESIS_SEED = int(os.environ.get("CKPT_HYPOTHESIS_SEED", "20261201"))
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37


def subreaper_on() -> int:
    """This process made a child subreaper; what it was before, for subreaper_restore. Fixtures
    nest: one torn down first must give back the state the outer one still needs, not turn it off
    (a target killed by an outer fixture's teardown would have its children reparented to init, and
    they would run on after the run: a test_pidns_start tree's child did)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    return was.value


def subreaper_restore(was: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1 if was else 0, 0, 0, 0)


# The owner part of this run's network lock names (ckpt/netlock.py owner(); set by tests/conftest.py).
LOCK_OWNER = f"{os.getpid() & 0xFFFFFFFF:08x}"


def build_c(name: str, extra: Sequence[str] = (), where: Path = TARGETS) -> Path:
    """Compile tests/targets/NAME.c (or WHERE/NAME.c) once per content; safe against concurrent test runs."""
    src = where / f"{name}.c"
    headers = b"".join(h.read_bytes() for h in sorted(where.glob("*.h")))
    digest = hashlib.sha256(src.read_bytes() + headers + " ".join(extra).encode()).hexdigest()[:12]
    BIN.mkdir(exist_ok=True)
    out = BIN / f"{name}-{digest}"
    if out.exists():
        return out
    with open(BIN / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            subprocess.run(
                ["gcc", "-O1", "-g", "-pthread", "-Wall", "-o", str(tmp), str(src), *extra], check=True
            )
            tmp.rename(out)
    return out


class LineChannel:
    """A line protocol over a child's stdin/stdout pipes, with a deadline on every answer.

    Shared by the tests, the benchmarks and the guest script of tests/vm (stdlib only, so any of them
    can import it). `context` adds to the error what is worth knowing when an answer never comes
    (e.g. the stderr of a `ckpt restore`)."""

    def __init__(
        self, proc: subprocess.Popen[bytes], timeout: float = 30.0, context: Callable[[], str] = lambda: ""
    ) -> None:
        self.proc = proc
        self.timeout = timeout
        self.context = context
        self._buf = b""

    def readline(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            r, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                raise TimeoutError(
                    f"pid {self.proc.pid} did not answer within {self.timeout}s{self.context()}"
                )
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(
                    f"pid {self.proc.pid} closed its stdout (status {self.proc.poll()}){self.context()}"
                )
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def cmd(self, line: str) -> str:
        self.send(line)
        return self.readline()


STARTED: set[int] = set()  # pids of every target this test process started (see Target)


class Target:
    """A running target that speaks the line protocol of tests/targets/*.c."""

    def __init__(self, argv: Sequence[str], timeout: float = 30.0, **popen: object) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            **popen,  # type: ignore[call-overload]
        )
        self.pid = self.proc.pid
        STARTED.add(self.pid)
        self.chan = LineChannel(self.proc, timeout)
        first = self.readline()
        if not first.startswith("ready"):
            raise RuntimeError(f"target did not get ready: {first!r}")
        self.ready = first

    def readline(self) -> str:
        return self.chan.readline()

    def cmd(self, line: str) -> str:
        return self.chan.cmd(line)

    def info(self) -> dict[str, int]:
        words = self.cmd("info").split()
        return {
            words[i]: int(words[i + 1], 0) if words[i + 1] != "(nil)" else 0
            for i in range(0, len(words) - 1, 2)
        }

    def sum(self) -> str:
        return self.cmd("sum").split()[1]

    def state(self) -> str:
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def stopped_state(self, timeout: float = 60.0) -> str:
        """The state once the target has entered a group-stop. A dump that leaves its target stopped
        (--leave-stopped, a migration's final round) queues SIGSTOP and detaches: the target stops
        when it next runs, which under load can come after the dump has returned (state R until
        then). waitid(WSTOPPED|WNOWAIT) is woken by the stop itself and leaves it unreaped."""
        done = threading.Event()

        def wait() -> None:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, self.pid, os.WSTOPPED | os.WNOWAIT)
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        assert done.wait(timeout), f"target {self.pid} did not stop within {timeout}s (state {self.state()})"
        # A thaw of a process that was stopped already: the waitid answers at once (the group-stop
        # never ended), while each thread its detach woke is still on its way back into that stop
        # (state R for a moment, inside the kernel: __ptrace_unlink reinstates the stop and wakes
        # it). That return tells nobody (no CLD_STOPPED for a stop already reported), so it is
        # looked for, briefly.
        end = time.monotonic() + timeout
        while (state := self.state()) != "T" and time.monotonic() < end:
            time.sleep(0.001)
        return state

    def pin(self) -> None:
        """Every thread kept on one CPU, so that dumps of the stopped target store the same bytes.
        A dump's injected syscalls return to user mode, and there the kernel writes into the
        thread's rseq area the CPU it runs on (cpu_id_start, cpu_id): two dumps of a stopped
        target whose injected code ran on two CPUs differ in those 8 bytes (seen in CI)."""
        cpu = min(os.sched_getaffinity(self.pid))
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})

    def tracer(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for ln in f:
                if ln.startswith("TracerPid:"):
                    return int(ln.split()[1])
        return 0

    def read_mem(self, addr: int, size: int) -> bytes:
        fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        try:
            return os.pread(fd, size, addr)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()


def run_ckpt(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a separate process, so a dump never ptraces the test runner's children
    from the runner itself (as a user would), and stderr is what a user would see."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="200")
    p = subprocess.run(
        [sys.executable, "-m", "ckpt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"ckpt {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def assert_view_equals_memory(pid: int, layer: str | Path, window: int = 8 << 20) -> None:
    """The merged view of `layer` equals the memory of process `pid`, page for page, in every mapping
    the layer dumped; the process must not run in between (idle in a read, or stopped). The threads'
    rseq areas are left out: the kernel writes the CPU a thread returns to user space on into them
    (a thaw restarts the syscall the thread was in, on whichever CPU it is woken), so 2 bytes of an
    idle target's memory can change after a correct dump (seen once, in tests/test_service.py).

    Memory is observed without disturbing it: present pages through /proc/PID/mem, the others by the
    kernel's rule (anonymous: zeros; private file mapping: the file), so nothing is faulted in that the
    next dump would see. [vdso] is read whole. Large mappings are compared a window at a time."""
    import numpy as np

    from ckpt import ranges
    from ckpt.image import open_layer
    from ckpt.memory import PM_PRESENT, PM_SWAPPED, read_pagemap, swap_active

    view = open_layer(layer)
    # Without swap, a swap entry is a uffd-wp marker on a never-touched page: it reads as zeros, and
    # reading it through /proc/PID/mem would fault a page in.
    bits = np.uint64(PM_PRESENT | (PM_SWAPPED if swap_active() else 0))
    rseq = [(a, n) for a, n, _ in (th.rseq for th in view.top.threads if th.rseq is not None)]
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for v in view.layers[0].meta.vmas:
            if v.status != "dumped":
                continue
            for lo in range(v.start, v.end, window):
                hi = min(v.end, lo + window)
                if v.path == "[vdso]":
                    want = os.pread(fd, hi - lo, lo)
                else:
                    buf = bytearray(hi - lo)
                    if v.inode and v.path.startswith("/"):
                        with open(v.path, "rb") as f:
                            f.seek(v.offset + (lo - v.start))
                            got = f.read(len(buf))
                        buf[: len(got)] = got
                    ents = read_pagemap(pid, lo, hi)
                    idx = np.flatnonzero(ents & bits).astype(np.uint64)
                    for a, b in ranges.runs(np.uint64(lo) + idx * np.uint64(PAGE)):
                        buf[int(a) - lo : int(b) - lo] = os.pread(fd, int(b - a), int(a))
                    want = bytes(buf)
                have = view.read(lo, hi - lo)
                for a, n in rseq:
                    x, y = max(a, lo), min(a + n, hi)
                    if x < y and have != want:
                        want = want[: x - lo] + have[x - lo : y - lo] + want[y - lo :]
                if have != want:
                    bad = [i for i in range(0, len(want), PAGE) if have[i : i + PAGE] != want[i : i + PAGE]]
                    first = bad[0]
                    a, b = have[first : first + PAGE], want[first : first + PAGE]
                    nbytes = sum(x != y for x, y in zip(a, b, strict=True))
                    pm = int(read_pagemap(pid, lo + first, lo + first + PAGE)[0])
                    raise AssertionError(
                        f"{layer}: {len(bad)} pages from {lo + first:#x} of mapping {v.start:#x}-{v.end:#x} "
                        f"{v.path or 'anon'} ({v.perms}) differ from the process's memory ({nbytes} bytes "
                        f"of the first; pagemap entry {pm:#x})"
                    )
    finally:
        os.close(fd)
