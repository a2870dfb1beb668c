"""A fork server's dumps freezing their targets no longer than a warm process's (`ckpt service`).

A served dump runs in a child that `ckpt service` forks. Inside its freeze it paid two costs that a
dump in a long-running process does not (docs/benchmarks.md, "The served freeze"):

* Copy-on-write faults. The child shares every page of the service's heap, and the first write to
  one (a reference count, an instruction's inline cache) copies it, ~2-5 us a fault. A served
  incremental of an idle 8-thread process took ~240 minor faults inside its freeze, against ~20 for
  a new `ckpt dump` process: 7.0 against 6.0 ms. ``own_pages()`` makes every present page of the
  child's private writable mappings its own before the freeze, by MADV_POPULATE_WRITE (the fault's
  copy without a write: no byte changes), in a thread of the child beside the command's start;
  ``ready()``, just before the seize, waits for it to end.
* Code run for the first time. CPython 3.11 quickens a function after its first calls and
  specialises each instruction as it first runs it; the service imports the freeze's code but has
  never run it, so each child ran it cold, as a new process does. ``rehearse()``, as the service
  starts (before it listens): a full dump and a few incremental ones of a helper process of its own
  (`python3 -I -S` with one more thread, both idle), into a private temporary directory removed
  afterwards. The children then inherit the freeze's code warm.

Nothing here changes what a dump records: the helper is the service's own child, and the pages made
the child's own hold the same bytes.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

from ckpt.errors import CkptError

MADV_POPULATE_WRITE = 23  # Linux 5.14
STEP = 1 << 20  # bytes per madvise: each is one call of ~0.5 ms at most
PIDFD_THREAD = os.O_EXCL  # pidfd_open() of a thread that is not a leader (Linux 6.9)
REHEARSALS = 8  # incremental dumps after the full one: enough calls to quicken the freeze's code
HELPER_WAIT = 30.0  # seconds for the helper to start, and for a rehearsal's threads to end

# The helper: one more thread, both blocked in read() (as an idle process is), ready on stdout.
HELPER = (
    "import os,sys,threading\n"
    "r,w=os.pipe()\n"
    "threading.Thread(target=os.read,args=(r,1),daemon=True).start()\n"
    "sys.stdout.write('ready\\n');sys.stdout.flush()\n"
    "sys.stdin.buffer.read(1)\n"
)

_populating: threading.Thread | None = None


def _private_writable() -> list[tuple[int, int]]:
    """This process's private writable mappings (its heap, Python's arenas, libraries' data), but the
    kernel's special ones ([stack] is the running thread's own; [vvar] and the like are not memory)."""
    out = []
    with open("/proc/self/maps", "rb") as f:
        for ln in f:
            parts = ln.split(None, 5)
            perms = parts[1]
            if perms[1:2] != b"w" or perms[3:4] != b"p":
                continue
            name = parts[5].strip() if len(parts) > 5 else b""
            if name.startswith(b"[") and name != b"[heap]":
                continue
            lo, hi = parts[0].split(b"-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def _populate(spans: list[tuple[int, int]]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for lo, hi in spans:
        for a in range(lo, hi, STEP):
            madvise(a, min(hi, a + STEP) - a, MADV_POPULATE_WRITE)  # (a failure: that range stays shared)


def present_private() -> list[tuple[int, int]]:
    """The present pages of this process's private writable mappings, as (start, end) spans: what
    the service's fork left shared (pages never touched are not made here)."""
    from ckpt.memory import PAGE_IS_PRESENT, PagemapScanner

    spans = _private_writable()
    with PagemapScanner(os.getpid()) as sc:
        return [(a, b) for lo, hi in spans for a, b, _ in sc.regions(lo, hi, category_mask=PAGE_IS_PRESENT)]


def own_pages() -> None:
    """In a child just forked: make the pages it shares with its parent its own, in a thread (all
    signals blocked in it: ptrace's SIGCHLD, a Ctrl-C, stay the command's). ready() waits for it."""
    global _populating
    try:
        spans = present_private()
    except (OSError, CkptError):
        return  # (no PAGEMAP_SCAN: the faults stay in the freeze, as before)
    t = threading.Thread(target=_populate, args=(spans,), name="ckpt-own-pages", daemon=True)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
    try:
        t.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    _populating = t


def ready() -> None:
    """Before a freeze: own_pages()'s thread, if one was started, has ended (~10 ms of one CPU for
    ~20 MiB, which the command's start usually covers)."""
    global _populating
    t = _populating
    if t is not None:
        t.join()
        _populating = None


def rehearse(rounds: int = REHEARSALS, dump: Callable[..., object] | None = None) -> dict[str, object]:
    """A full dump and ``rounds`` incremental ones of a helper process, in this process, and every
    thread they started ended. Returns {"dumps": N, "ms": wall}. A dump that fails (no ptrace here,
    no tracker) raises its CkptError or OSError: the caller serves on, cold."""
    import shutil
    import subprocess
    import tempfile

    if dump is None:
        from ckpt.api import dump as api_dump

        dump = api_dump
    try:
        os.close(os.pidfd_open(os.getpid(), PIDFD_THREAD))
    except OSError as e:  # (what tells that its threads have ended, below)
        raise CkptError(f"this kernel has no pidfd of a thread (Linux 6.9): {e.strerror}") from None
    t0 = time.perf_counter()
    d = tempfile.mkdtemp(prefix="ckpt-rehearsal-")  # (0700: a layer holds the helper's memory)
    try:
        p = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", HELPER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert p.stdout is not None
            if not select.select([p.stdout], [], [], HELPER_WAIT)[0] or p.stdout.readline() != b"ready\n":
                raise CkptError("the rehearsal's helper process did not start")
            dump(p.pid, d)
            for _ in range(rounds):
                dump(p.pid, d, incremental=True)
        finally:
            p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    _threads_ended(HELPER_WAIT)
    return {"dumps": rounds + 1, "ms": round((time.perf_counter() - t0) * 1e3, 1)}


def _threads_ended(timeout: float) -> None:
    """Every other thread of this process gone (a fork server must have none): Python's joined, and
    any still on its way out of the kernel waited for through a pidfd of the thread."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread():
            t.join(max(deadline - time.monotonic(), 0.0))
    me = threading.get_native_id()
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        if tid == me:
            continue
        try:
            fd = os.pidfd_open(tid, PIDFD_THREAD)
        except ProcessLookupError:
            continue  # gone already
        try:
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0.0))[0]:
                raise CkptError(f"a rehearsal's thread {tid} did not end within {timeout:g}s")
        finally:
            os.close(fd)
