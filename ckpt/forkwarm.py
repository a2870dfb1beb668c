"""A fork server's dumps freezing their targets no longer than a warm process's (`ckpt service`).

A served dump runs in a child that `ckpt service` forks. Inside its freeze it paid two costs that a
dump in a long-running process does not (docs/benchmarks.md, "The served freeze"):

* Copy-on-write faults. The child shares every page of the service's heap, and the first write to
  one (a reference count, an instruction's inline cache) copies it, ~2-5 us a fault. A served
  incremental of an idle 8-thread process took ~240 minor faults inside its freeze, against ~20 for
  a new `ckpt dump` process: 7.0 against 6.0 ms. ``own_pages()`` makes those pages the child's own
  before the freeze, by MADV_POPULATE_WRITE (the fault's copy without a write: no byte changes):
  first the few hundred that the rehearsal (below) found a freeze writes (``learn()``: in a fork of
  the service, the pages shared at the freeze's start and its own at the thaw), ~1 ms; then, in a
  thread of the child beside the command's start, every other present page of its private writable
  mappings, until ``ready()``, called by every freeze's prepare (ptrace/freeze.py), stops it.
* Code run for the first time. CPython 3.11 quickens a function after its first calls and
  specialises each instruction as it first runs it; the service imports the freeze's code but has
  never run it, so each child ran it cold, as a new process does. ``rehearse()``, as the service
  starts (before it listens): a full dump and a few incremental ones of a helper process of its own
  (`python3 -I -S` with one more thread, both idle), into a private temporary directory removed
  afterwards (a last incremental in a fork, to learn the pages above). The children then inherit
  the freeze's code warm.

Nothing here changes what a dump records: the helper is the service's own child, and the pages made
the child's own hold the same bytes.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from array import array
from collections.abc import Callable

from ckpt.errors import CkptError

# (Imported by every freeze, for ready(): what the rest needs is imported where it is used, so that
# a command that freezes, a restore's among them, starts no slower for it.)

STEP = 256 << 10  # bytes per madvise: a stop waits for one such call at most (~0.1 ms)
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

_populating: tuple[threading.Thread, threading.Event] | None = None
# The pages a served dump's freeze writes, as rehearse() found them in a fork of the service
# (learn()): (start, end) spans, or None (not learned: every present page is made the child's own).
HOT: list[tuple[int, int]] | None = None
PAGE = os.sysconf("SC_PAGE_SIZE")


def _private_writable() -> list[tuple[int, int]]:
    """This process's private writable mappings (its heap, Python's arenas, libraries' data), but the
    kernel's special ones ([stack] is the running thread's own; [vvar] and the like are not memory)."""
    from ckpt.proc.maps import read_maps

    return [
        (v.start, v.end)
        for v in read_maps(os.getpid())
        if v.writable and not v.shared and (v.path == "[heap]" or not v.path.startswith("["))
    ]


def _populate(spans: list[tuple[int, int]], stop: threading.Event | None = None) -> None:
    """prefault.populate (MADV_POPULATE_WRITE) over ``spans``, STEP bytes a call, until ``stop`` is
    set (a call the kernel refuses: that range stays shared)."""
    from ckpt.prefault import populate

    for lo, hi in spans:
        for a in range(lo, hi, STEP):
            if stop is not None and stop.is_set():
                return
            populate(a, min(hi, a + STEP) - a)


def present_private() -> list[tuple[int, int]]:
    """The present pages of this process's private writable mappings, as (start, end) spans: what
    the service's fork left shared (pages never touched are not made here)."""
    from ckpt.memory import PAGE_IS_PRESENT, PagemapScanner

    spans = _private_writable()
    with PagemapScanner(os.getpid()) as sc:
        return [(a, b) for lo, hi in spans for a, b, _ in sc.regions(lo, hi, category_mask=PAGE_IS_PRESENT)]


def _the_rest(stop: threading.Event) -> None:
    try:
        spans = present_private()
    except (OSError, CkptError):
        return  # (no PAGEMAP_SCAN: those faults stay where they fall, as before)
    _populate(spans, stop)


def own_pages() -> None:
    """In a child just forked: the pages a freeze writes (HOT, as the service's rehearsal learned
    them) made its own now, ~1 ms; then every other present page of its private writable mappings,
    in a thread (all signals blocked in it: ptrace's SIGCHLD, a Ctrl-C, stay the command's) that
    ready() stops."""
    global _populating
    if HOT:
        # Learned as the service started: only where this process has private writable memory now
        # (the service's heap may have moved since; a shared mapping there must never be written).
        from ckpt.ranges import intersect

        _populate(intersect(HOT, _private_writable()))
    stop = threading.Event()
    t = threading.Thread(target=_the_rest, args=(stop,), name="ckpt-own-pages", daemon=True)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
    try:
        t.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    _populating = (t, stop)


def ready() -> None:
    """Before a freeze: own_pages()'s thread, if one was started, stopped (it ends within one
    STEP's madvise): nothing of it runs beside the freeze, and the freeze never waits for the rest."""
    global _populating
    if _populating is not None:
        t, stop = _populating
        _populating = None
        stop.set()
        t.join()


class Stopped(CkptError):
    """rehearse() ended early: its caller was asked to stop."""


def rehearse(
    rounds: int = REHEARSALS, dump: Callable[..., object] | None = None, stop: Callable[[], bool] = bool
) -> dict[str, object]:
    """A full dump and ``rounds`` incremental ones of a helper process, in this process, and every
    thread they started ended; then HOT learned from one more in a fork (left None where that
    fork's dump fails). Returns {"dumps": N, "ms": wall, "hot_pages": pages in HOT}. A dump here that
    fails (no ptrace, no tracker) raises its CkptError or OSError: the caller serves on, cold.
    ``stop()``, asked before each step (a signal handler of the caller's sets what it reads: an
    exception raised from the handler could land inside the standard library's own cleanup, e.g.
    tempfile's probe file): Stopped, once the helper is killed and the directory removed."""
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
            for i in range(rounds + 1):
                if stop():
                    raise Stopped("asked to stop")
                dump(p.pid, d, incremental=i > 0)
            _threads_ended(HELPER_WAIT)
            if stop():
                raise Stopped("asked to stop")
            global HOT
            try:
                HOT = learn(p.pid, d, dump)
            except (CkptError, OSError):
                HOT = None  # (its children make every page their own, in the background)
        finally:
            p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    _threads_ended(HELPER_WAIT)
    hot = sum(b - a for a, b in HOT or ()) // PAGE
    return {"dumps": rounds + 1, "ms": round((time.perf_counter() - t0) * 1e3, 1), "hot_pages": hot}


def _threads_ended(timeout: float) -> None:
    """Every other thread of this process gone (a fork server must have none): the grab's workers
    ended (ckpt/proc/grab.py end_workers), Python's joined, and any still on its way out of the
    kernel waited for through a pidfd of the thread."""
    from ckpt.proc import grab

    grab.end_workers()
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


def _shared_now(spans: list[tuple[int, int]]) -> set[int]:
    """The pages of ``spans`` present in this process and still shared with another (a fork's
    parent): not PM_MMAP_EXCLUSIVE in /proc/self/pagemap."""
    out: set[int] = set()
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for lo, hi in spans:
            entries = memoryview(os.pread(fd, (hi - lo) // PAGE * 8, lo // PAGE * 8)).cast("Q")
            out.update(lo + i * PAGE for i, v in enumerate(entries) if v >> 63 and not v >> 56 & 1)
    finally:
        os.close(fd)
    return out


def learn(pid: int, directory: str, dump: Callable[..., object]) -> list[tuple[int, int]]:
    """Which pages of this process an incremental dump's freeze writes, found in a fork of it (as a
    served dump runs): those shared with this process at the freeze's start and its own at the
    thaw's end. Spans, merged."""
    from ckpt.ptrace import Frozen

    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(r)
            spans = _private_writable()
            seen: dict[str, set[int]] = {}
            real_freeze, real_end = Frozen.freeze, Frozen._unblock_sigchld

            def freeze(self: Frozen) -> None:
                seen.setdefault("before", _shared_now(spans))
                real_freeze(self)

            def end(self: Frozen) -> None:
                real_end(self)
                if "before" in seen:
                    seen.setdefault("after", _shared_now(spans))

            Frozen.freeze, Frozen._unblock_sigchld = freeze, end  # type: ignore[method-assign]
            dump(pid, directory, incremental=True)
            view = memoryview(array("Q", sorted(seen["before"] - seen["after"])).tobytes())
            while view:
                view = view[os.write(w, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    parts = []
    try:
        while chunk := os.read(r, 1 << 16):
            parts.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(child, 0)
    if status != 0:
        raise CkptError("the rehearsal's fork could not dump its helper")
    from ckpt.ranges import merge

    return merge([(a, a + PAGE) for a in array("Q", b"".join(parts))])
