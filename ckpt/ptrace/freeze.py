"""Frozen: every thread of a process held in a ptrace-stop, and everything done to it undone at thaw.

Freezing seizes (PTRACE_SEIZE + PTRACE_INTERRUPT) each thread listed in /proc/PID/task, waits for
each to stop, and lists again until a listing shows no new thread: a stopped thread cannot create
another, so when a listing adds nothing, every thread is held.

Whatever is changed in the target while it is frozen is recorded so thaw() can undo it, in order:
scratch mappings are unmapped, scratch stack bytes and patched code bytes are put back, registers of
an injection that did not finish are restored, signals taken off threads are given back, and every
thread is detached. thaw() never raises because the target died; kill() is the other way out.

ptrace belongs to the tracing *thread*: every ptrace call must come from the thread that froze.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from types import TracebackType

from ckpt import forkwarm, idlepoll
from ckpt import sysno as nr
from ckpt.cbuf import array_type, vector
from ckpt.errors import CkptError, FreezeError, InjectionError, TargetError, TargetExited
from ckpt.proc import list_threads, read_maps, read_stat
from ckpt.proc.maps import Vma
from ckpt.proc.pidns import in_our_pidns, own_tids
from ckpt.ptrace import batch as bt
from ckpt.ptrace import gcpause, inject, lostmap, parting, quickstops, raw, regs, rtboost, sigchld
from ckpt.ptrace.binding import ptrace_registers_t
from ckpt.ptrace.inject import SigAction
from ckpt.ptrace.mem import ProcMem, process_alive
from ckpt.ptrace.signals import deferred_signals
from ckpt.ptrace.tracee import HeldSignal, TracedThread, add_orphan, release_orphans

__all__ = ["Frozen", "deferred_signals", "release_orphans", "thaw_all"]

RED_ZONE = bt.RED_ZONE  # x86_64 SysV ABI: the 128 bytes below rsp belong to the function running there
SCRATCH_ALIGN = bt.SCRATCH_ALIGN  # (batch.assemble_sp's code finds its stack area as _stack_area does)
STOP_GRACE = 0.5  # at thaw, how long a thread that is not in a stop gets to reach one
PTRACE_O_SUSPEND_SECCOMP = 1 << 21
PAGE = 4096


def _start(v: Vma) -> int:
    return v.start


def code_map_size(size: int) -> int:
    """The bytes of batch()'s code mapping for ``size`` bytes of code."""
    return max(-(-size // PAGE) * PAGE, 4 * PAGE)


USER_TOP = 0x7FFFFFFFF000  # [vsyscall] lies above: no gap there is ours
MAX_LISTINGS = 1000  # a process that keeps making threads faster than we can seize them: give up


def _state(pid: int, tid: int) -> str:
    try:
        return read_stat(pid, tid).state
    except TargetExited:
        return "gone"


def _wchan(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            return f.read().strip() or "-"
    except OSError:
        return "?"


def _dying(pid: int) -> bool:
    """A SIGKILL is pending for the process, or some thread of it is already a zombie."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                fields = dict(ln.split(":", 1) for ln in f if ":" in ln)
            pending = int(fields.get("SigPnd", "0"), 16) | int(fields.get("ShdPnd", "0"), 16)
            if pending >> (signal.SIGKILL - 1) & 1 or fields.get("State", "").strip()[:1] in ("Z", "X"):
                return True
    except (OSError, ValueError):
        return True  # gone while we looked
    return False


# Synchronous signals: one that is pending while blocked turns fatal as soon as the kernel forces the
# same signal (a single-step trap, a fault: force_sig unblocks and resets it), and a dump could only
# record it as a plain kill(). ckpt's injection no longer forces SIGTRAP, but such a process is
# refused anyway, as CRIU refuses it.
SYNC_SIGNALS = (signal.SIGTRAP, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)
STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)  # what SIGCONT discards


def _refuse_unsafe(pid: int) -> tuple[bool, int]:
    """Refuse, before touching it, a process that a freeze could harm or could not stop. Returns
    whether it is in group-stop (a thread in state T), and how many of its threads are running
    (state R: rtboost.contended), read from the same status files."""
    stopped = False
    running = 0
    try:
        tids = list_threads(pid)
    except TargetExited:
        return False, 0  # freeze() says so
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                fields = dict(ln.split(":", 1) for ln in f if ":" in ln)
            blocked = int(fields["SigBlk"], 16)
            pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
        except (OSError, KeyError, ValueError):
            continue  # exited while we looked
        bad = [s for s in SYNC_SIGNALS if (pending & blocked) >> (s - 1) & 1]
        if bad:
            names = ", ".join(signal.Signals(s).name for s in bad)
            raise FreezeError(
                f"process {pid} has {names} pending and blocked (thread {tid}); a freeze could make it "
                "fatal, so ckpt does not dump it (as CRIU does not)"
            )
        state = fields.get("State", "").strip()[:1]
        stopped = stopped or state == "T"
        running += state == "R"
        if state == "D" and _wchan(pid, tid) == "kernel_clone":
            raise FreezeError(
                f"process {pid} is in vfork() (thread {tid} waits for its child to exec or exit) and "
                "cannot be stopped until then; dump it afterwards"
            )
    return stopped, running


def _lonely_spot(maps: Sequence[Vma], size: int) -> int:
    """An address for ``size`` bytes with a free page on either side (0: none found), so that the
    mapping cannot merge with a neighbour: /proc/PID/smaps read meanwhile (dump.py reads it beside
    the freeze) then shows every mapping of the process with its own start and flags."""
    vs = sorted((v for v in maps if v.end <= USER_TOP), key=lambda v: v.start)
    for lo, hi in zip(reversed(vs[:-1]), reversed(vs[1:]), strict=True):
        if hi.start - lo.end >= size + 2 * PAGE and hi.path != "[stack]":  # not in its guard gap
            return hi.start - PAGE - size
    return 0


class _Guard:
    """Frozen._guard()'s context manager (stateless: blocks may nest)."""

    __slots__ = ("_fz",)

    def __init__(self, fz: Frozen) -> None:
        self._fz = fz

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: object) -> None:
        if et is not None and issubclass(et, (ProcessLookupError, TargetExited)):
            self._fz._killed = True
            raise self._fz._exited() from None


def _status_field(pid: int, key: str) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith(key + ":"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _tracer_of(pid: int, tid: int | None = None) -> int:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    try:
        with open(path) as f:
            for ln in f:
                if ln.startswith("TracerPid:"):
                    return int(ln.split()[1])
    except OSError:
        pass
    return 0


class Frozen:
    """Context manager: ``with Frozen(pid) as f:`` freezes on entry and always thaws on exit."""

    def __init__(self, pid: int, *, timeout: float = 10.0, use_vdso: bool = True) -> None:
        self.pid = pid
        self.timeout = timeout  # per thread stop / per injected syscall
        self.use_vdso = use_vdso  # False forces the code-patching path (for tests)
        self.was_stopped = False  # in group-stop (state T) before we came: stays stopped after thaw
        # tid -> the stop signal of the group-stop its first stop reported (ckpt/jobstop.py)
        self.group_stops: dict[int, int] = {}
        self.scratch_maps: list[tuple[int, int]] = []  # (addr, size) mapped by mmap_scratch, unmapped at thaw
        self._threads: dict[int, TracedThread] = {}
        self._frozen = False
        self._tracer = 0  # native id of the thread that seized
        self._mem = ProcMem(pid)
        self._vdso_site: int | None = None
        self._vdso_searched = False
        self._saved_regs: dict[int, ptrace_registers_t] = {}  # injections not yet undone
        self._patches: dict[int, bytes] = {}  # addr -> original bytes
        self._scratch_saved: list[tuple[int, bytes]] = []  # stack bytes under scratch(), in save order
        self._our_child = False  # we are the target's parent: never reap its leader (see raw.wait)
        self._killed = False  # a thread we held in a stop went away: only SIGKILL does that
        self._guard_cm = _Guard(self)
        self._own_ids: dict[int, int] = {}  # tid -> its tid in the process's own pid namespace
        self._flat_ns = False  # in ckpt's own pid namespace (known at prepare())
        # SIGCHLD blocked in the tracing thread from freeze to thaw, so threads started meanwhile
        # (copy and compression pools) never take the SIGCHLD a wait is woken by (sigchld.py).
        self._sigchld: AbstractContextManager[None] | None = None
        self._shared_sigchld = False  # another thread of ours may take SIGCHLD: waits use sigchld.watch
        self._code: tuple[int, int] | None = None  # batch()'s code mapping: (address, size)
        self._jobs: dict[int, quickstops.Job] = {}  # each thread's record for quickstops.c
        # The process's start time (stat), read by prepare() just before the seize: which process the
        # pid names (a pid reused between that read and the seize would be frozen in its place anyway).
        self.start_time: int | None = None
        self.blob_tids: set[int] = set()  # threads the last batch() ran code in (the others: one by one)
        self._stopping = False  # thawing with leave_stopped: each thread goes to the group-stop
        self._prepared: bool | None = None  # prepare() done, freeze() not yet: was it group-stopped
        self._gc_paused = False  # gcpause.pause() taken by prepare(), resumed when the freeze ends
        self._boosted: rtboost.Boost | None = None  # the freezing thread real-time (rtboost.py)
        self._idle: idlepoll.Held | None = None  # idle CPUs polling, prepare() to thaw (idlepoll.py)
        self._contended = True  # another task wanted the CPUs at prepare(): boost (rtboost.contended)
        # ckpt's own threads run beside this freeze (a dump's: procgrab.c's workers, its scan thread),
        # set by the caller before prepare(): they compete for the CPUs as another task would, so the
        # freeze is boosted whatever the load (rtboost.py, "ckpt's own threads").
        self.helpers = False
        self.let_go_at = 0.0  # time.perf_counter() when the last thaw let the last thread go
        self._no_suspend = False  # PTRACE_O_SUSPEND_SECCOMP refused once: the next seizes go without
        # The process's SigIgn and SigCgt (status), read once per freeze: a frozen process cannot
        # change them.
        self._sigign: int | None = None
        self._sigcgt: int | None = None
        self._quiet = 0  # the quiet end signals (batch.quiet_signals) of the batch() running
        # A SIGCONT came while frozen, and the thaw left the process stopped all the same (leave_stopped).
        self.continued_meanwhile = False
        # tid -> an injected mmap whose thread was left running by its failure (lostmap.py)
        self._lost_mmaps: dict[int, lostmap.PendingMmap] = {}
        self._lost_found: list[int] = []  # addresses of scratch_maps found so, not made by mmap_scratch
        self._settling: list[TracedThread] = []  # resumed by settle(), their stop not yet waited for
        # Threads the thaw sent on into their syscalls (_kick_parting, _start_parting): their
        # registers and syscalls, for _parted, or None where nothing was left to do, or what failed
        # there (raised by _parted).
        self._sent: dict[int, tuple[dict[str, int], set[int]] | BaseException | None] = {}
        self._unparted: set[int] = set()  # threads _kick_parting found in no syscall to go back into
        self._in_get_signal: set[int] = set()  # threads _kick_parting sends on without a kick

    # ----- context manager -------------------------------------------------------------------------
    def __enter__(self) -> Frozen:
        self.freeze()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.thaw()

    # ----- state -----------------------------------------------------------------------------------
    @property
    def tids(self) -> list[int]:
        self._settled()  # (the callers go on to ptrace or read the threads: each in its stop)
        return sorted(t for t, th in self._threads.items() if not th.dead)

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def held_signals(self) -> dict[int, list[int]]:
        """Signals taken off threads while frozen (tid -> signal numbers). They are no longer in the
        kernel's pending sets, so a dump must record them from here; thaw delivers them again."""
        self._settled()
        return {t: [h.sig for h in th.held] for t, th in self._threads.items() if th.held}

    def _exited(self) -> TargetExited:
        return TargetExited(f"process {self.pid} exited during the dump")

    def _thread(self, tid: int | None) -> TracedThread:
        if not self._frozen:
            raise FreezeError(f"process {self.pid} is not frozen")
        if threading.get_native_id() != self._tracer:
            # Another thread's ptrace calls would fail with ESRCH and look like a dead target.
            raise FreezeError(
                f"process {self.pid} was frozen by another thread; ptrace only works from that one"
            )
        self._settled()
        if tid is None:
            live = self.tids
            if not live:
                raise self._exited()
            tid = self.pid if self.pid in live else live[0]
        th = self._threads.get(tid)
        if th is None:
            raise TargetError(f"thread {tid} is not a frozen thread of process {self.pid}")
        if th.dead:
            raise self._exited()
        if not th.stopped:
            raise InjectionError(f"thread {th.tid} of process {self.pid} is not in a ptrace-stop")
        return th

    def _wait(self, tid: int, timeout: float) -> raw.WaitResult | None:
        # /proc is asked only where waitpid may stay silent about a death: a leader whose other
        # threads are unreaped zombies (raw.wait). A lone leader's or another thread's exit is
        # reported to its tracer like any stop; the read (~20 us) came before most sleeps of a
        # freeze once ckpt's thread no longer yields to the woken target (rtboost.py).
        return raw.wait(
            tid,
            timeout,
            dead=(lambda: not process_alive(self.pid, tid))
            if tid == self.pid and len(self._threads) > 1
            else None,
            keep_exit=self._our_child and tid == self.pid,
            shared=self._shared_sigchld,
        )

    def _guard(self) -> _Guard:
        """ESRCH from a thread we hold in a stop means SIGKILL woke it: the whole process is going.
        (One object for every block: entered ~75 times a freeze of 8 threads, where a generator's
        context manager cost ~1 us more each.)"""
        return self._guard_cm

    # ----- freeze ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """What freeze() checks and sets up before it stops anything: /proc reads (~0.3-0.5 ms)
        that run while the process still runs. A caller that times the freeze calls it first, so
        that the clock starts at the seize; freeze() calls it when the caller did not. Undone by
        thaw() (a prepared, never frozen process: SIGCHLD unblocked again)."""
        if self._frozen or self._prepared is not None:
            return
        # A served command's thread that makes its pages its own stops here, before any freeze of
        # any kind (a dump's, a tree's member's, a resumed stop's): nothing of it runs beside one.
        forkwarm.ready()
        release_orphans()
        if not process_alive(self.pid):
            raise self._exited()
        tracer = _tracer_of(self.pid)
        if tracer == os.getpid() and _dying(self.pid):
            # Threads of ours that a SIGKILL caught during an earlier thaw stay attached to us until
            # the process is reaped: it is going, not traced by someone else.
            raise self._exited()
        if tracer:
            who = " (this process)" if tracer == os.getpid() else ""
            raise FreezeError(f"process {self.pid} is already being traced by pid {tracer}{who} (TracerPid)")
        earlier = None if self.helpers else rtboost.runnable()  # (and again: rtboost.runnable's race)
        stopped, running = _refuse_unsafe(self.pid)
        # Boost the freeze only if something else wants the CPUs (rtboost.py), ckpt's own helpers
        # among them: decided here, before it.
        self._contended = self.helpers or rtboost.contended(running, earlier)
        self._sigchld = sigchld.blocked()
        self._sigchld.__enter__()
        # Checked once per freeze: threads started later by ckpt inherit the blocked mask.
        self._shared_sigchld = bool(sigchld.unblocked_threads())
        self._tracer = threading.get_native_id()
        # Made here, not at the seize: the library's first load in a new ckpt process (each `ckpt
        # dump`) cost its first freeze ~0.3-0.4 ms, and this thread's signalfd for SIGCHLD (one per
        # thread: a dump freezes in a thread of its own, run_handed_over) a few tens of us.
        quickstops.lib()
        sigchld.thread_fd()
        with suppress(TargetExited):
            st = read_stat(self.pid)
            self._our_child = st.ppid == os.getpid()
            self.start_time = st.start_time
        self._prepared = stopped
        # Decided here, outside the freeze: a process in ckpt's own pid namespace (the common case)
        # names its threads as ckpt does, so _own_tids needs no /proc read while it is frozen.
        with suppress(OSError):
            self._flat_ns = in_our_pidns(self.pid)
        # Last, once nothing here can refuse: the idle CPUs poll from now to the thaw's end, so
        # that each stop's wake of the target and of ckpt costs an IPI, not a halted (v)CPU's
        # wake-up (idlepoll.py; its ~60 us before the freeze's clock starts).
        self._idle = idlepoll.hold()
        # So do the collector's pause and this thread's boost (~40 us, which freeze() made after
        # the clock's start): undone with the rest by thaw(), as a prepared-only process is.
        self._pause_and_boost()

    def _pause_and_boost(self) -> None:
        if not self._gc_paused:  # no collection inside the freeze (gcpause.py)
            gcpause.pause()
            self._gc_paused = True
        if self._boosted is None:  # not preempted at each stop of the target (rtboost.py)
            self._boosted = rtboost.boost(self._contended)

    def freeze(self) -> None:
        if self._frozen:
            return
        if self._prepared is None:
            self.prepare()
        elif threading.get_native_id() != self._tracer:
            raise FreezeError(f"process {self.pid} must be frozen by the thread that prepared it")
        stopped, self._prepared = bool(self._prepared), None
        self._frozen = True
        self.continued_meanwhile = False
        self._pause_and_boost()  # (made by prepare(): again only after a thaw of this same Frozen)
        with deferred_signals():
            try:
                self.was_stopped = stopped
                self.group_stops = {}
                self._attach_all()
                # What the seize reported, not the /proc read before it: a SIGCONT or a stop that
                # came in between changed it (the layer's stop comes from group_stops, jobstop.py).
                self.was_stopped = bool(self.group_stops)
                # Every thread just reported a stop, not an exit: alive, no /proc read needed. A
                # thread whose wait said otherwise (exiting) leaves the question to /proc.
                settled = all(th.stopped and not th.dead for th in self._threads.values())
                if not self.tids or not (settled or process_alive(self.pid)):
                    raise self._exited()
            except TargetExited:
                self._release(leave_stopped=False)
                raise self._exited() from None
            except FreezeError as e:
                errors = self._release(leave_stopped=False)
                if errors:
                    raise FreezeError(f"{e}; {'; '.join(errors)}") from None
                raise
            except BaseException:
                self._release(leave_stopped=False)
                raise

    def _end_boost(self) -> bool:
        b, self._boosted = self._boosted, None
        rtboost.unboost(b)
        return b is not None

    def _unblock_sigchld(self) -> None:
        """The freeze (or prepare) is over: SIGCHLD, the garbage collector and the freezing thread's
        scheduling as they were."""
        self._end_boost()
        idle, self._idle = self._idle, None
        idlepoll.release(idle)
        if self._gc_paused:
            self._gc_paused = False
            gcpause.resume()
        if self._sigchld is not None:
            cm, self._sigchld = self._sigchld, None
            cm.__exit__(None, None, None)

    def _attach_all(self) -> None:
        attempts: dict[int, int] = {}
        for _ in range(MAX_LISTINGS):
            try:
                listed = list_threads(self.pid)
            except TargetExited:
                raise self._exited() from None
            new = [t for t in listed if t not in self._threads and attempts.get(t, 0) < 100]
            if not new:
                return
            seized = []
            fast = self._seize_all(new)
            for tid in new:
                attempts[tid] = attempts.get(tid, 0) + 1
                if tid in fast or self._seize(tid):
                    seized.append(tid)
            # Non-leaders first: a leader that dies is not reported until its other threads are reaped.
            order = sorted(seized, key=lambda t: t == self.pid)
            came = self._first_stops(order)
            for tid in order:
                self._wait_first_stop(tid, came.get(tid))
        raise FreezeError(f"process {self.pid} keeps creating threads faster than they can be stopped")

    def _seize_all(self, tids: list[int]) -> set[int]:
        """_seize's ordinary course for every thread of ``tids`` in one call of quickstops.c (~12 us
        a thread of Python less): those seized and interrupted. A thread whose seize failed is not
        seized, and _seize tries it again from Python, where each error has its meaning; so does
        every thread once the seccomp option was refused (_no_suspend: _refuse_seccomp reads its
        status first)."""
        if self._no_suspend:
            return set()
        got = quickstops.seize(tids, raw.PTRACE_O_TRACESYSGOOD | PTRACE_O_SUSPEND_SECCOMP)
        if got is None:
            return set()
        out: set[int] = set()
        failed: OSError | None = None
        for tid, (err, ierr) in got.items():
            if err:
                continue
            raw.forget(tid)  # (seized now: nothing kept of an earlier freeze holds)
            self._threads[tid] = TracedThread(tid)
            out.add(tid)
            if ierr and ierr != errno.ESRCH and failed is None:  # (ESRCH: exiting, the wait says so)
                failed = OSError(ierr, f"PTRACE_INTERRUPT of thread {tid}: {os.strerror(ierr)}")
        if failed is not None:
            raise failed
        return out

    def _seize(self, tid: int) -> bool:
        try:
            flags = raw.PTRACE_O_TRACESYSGOOD
            try:
                # Injected syscalls must not meet the target's seccomp filters (a filter that kills
                # on one would kill the target): suspended while traced, where allowed. Asked for
                # every thread, so that no /proc read (status's Seccomp:) is made per thread inside
                # the freeze: the option changes nothing for a thread without a filter, and only
                # ckpt's own capability (CAP_SYS_ADMIN, no filter of its own) decides whether the
                # kernel takes it.
                if self._no_suspend:
                    self._refuse_seccomp(tid)
                raw.seize(tid, flags | (0 if self._no_suspend else PTRACE_O_SUSPEND_SECCOMP))
            except OSError as e:
                if self._no_suspend or e.errno not in (errno.EPERM, errno.EINVAL):
                    raise
                self._refuse_seccomp(tid)
                # Not allowed (EPERM), or a kernel without CONFIG_CHECKPOINT_RESTORE (EINVAL): as an
                # ordinary tracer (without CAP_SYS_ADMIN dump.py refuses strict mode before this). An
                # EPERM here too is the seize's own (no ptrace at all, a zombie leader), not the
                # option's: the next threads still ask for it.
                raw.seize(tid, flags)
                self._no_suspend = True
        except ProcessLookupError:
            return False  # exited between the listing and now
        except PermissionError:
            if not process_alive(self.pid, tid):
                return False  # exiting (a zombie leader after pthread_exit cannot be seized)
            tracer = _tracer_of(self.pid, tid)
            if tracer:
                raise FreezeError(
                    f"process {self.pid} is already being traced by pid {tracer} (TracerPid of thread {tid})"
                ) from None
            raise FreezeError(
                f"cannot ptrace process {self.pid} (thread {tid}): permission denied "
                "(needs root or CAP_SYS_PTRACE, and no Yama restriction)"
            ) from None
        self._threads[tid] = TracedThread(tid)
        with suppress(ProcessLookupError):  # exiting: the wait reports it
            raw.interrupt(tid)
        return True

    def _refuse_seccomp(self, tid: int) -> None:
        """Before seizing without PTRACE_O_SUSPEND_SECCOMP (only then: no /proc read per thread
        otherwise): a thread in seccomp strict mode would be killed by an injected syscall, one under
        a filter could be killed or answered wrongly. Refused before it is seized."""
        try:
            with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                mode = next((ln.split()[1] for ln in f if ln.startswith("Seccomp:")), "0")
        except (OSError, IndexError):
            return  # exited: the seize says so
        if mode in ("1", "2"):
            raise FreezeError(
                f"process {self.pid}: thread {tid} is in seccomp {'strict' if mode == '1' else 'filter'} "
                "mode, and seccomp cannot be suspended while tracing it (PTRACE_O_SUSPEND_SECCOMP "
                "refused to ckpt: under a filter of its own, or without CAP_SYS_ADMIN)"
            )

    def _first_stops(self, tids: list[int]) -> dict[int, raw.WaitResult]:
        """The first stop of each of ``tids`` (just seized and interrupted), waited for in one call
        of quickstops.c, in that order: those that came; _wait_first_stop waits for the rest (a
        thread that exits, or does not stop in time) as it always has."""
        q = self._quick(tids[0]) if tids else None
        if q is None:
            return {}
        so, job = q
        job.leader_check = int(len(self._threads) > 1)
        ids = vector(ctypes.c_int32, tids)  # (array types made once: ckpt/cbuf.py)
        k = len(ids)
        out, errs = array_type(ctypes.c_int32, k)(), array_type(ctypes.c_int32, k)()
        regs, masks = array_type(quickstops.UserRegs, k)(), array_type(ctypes.c_uint64, k)()
        n = so.ckpt_qs_stops(ctypes.byref(job), ids, len(tids), out, regs, masks, errs)
        came = {tid: raw.WaitResult(tid, out[i]) for i, tid in enumerate(tids[:n])}
        for i, tid in enumerate(tids[:n]):
            # Its registers and mask at the stop it is held in (no thread of it runs before the
            # batch's first look at them: Frozen.batch, syscall): kept, as raw.py's own reads are.
            if not errs[i] and came[tid].is_event_stop:
                raw.know_regs(tid, regs[i])
                raw.know_mask(tid, int(masks[i]))
        return came

    def _wait_first_stop(self, tid: int, first: raw.WaitResult | None = None) -> None:
        th = self._threads[tid]
        w = first if first is not None else self._wait(tid, self.timeout)
        if w is None:
            if not process_alive(self.pid):
                raise self._exited()
            raise FreezeError(
                f"thread {tid} of process {self.pid} did not stop within {self.timeout:g}s "
                f"(state {_state(self.pid, tid)}, wchan {_wchan(self.pid, tid)})"
            )
        th.note(w)
        if w.exited and not w.gone:
            del self._threads[tid]  # exited, and that wait reaped it
        elif w.exited:
            pass  # dead but not reaped yet (a leader waits for its threads): thaw reaps it
        elif w.is_signal_stop:
            # It stopped to take a signal before our interrupt: keep it stopped right here, and
            # give that signal back at detach (from this very stop, with its siginfo).
            with self._guard():
                th.hold(w.sig)
        elif w.is_event_stop and w.sig in STOP_SIGNALS:
            # A group-stop (SEIZE reports it with its stop signal; an interrupt-stop says SIGTRAP):
            # the job-control stop the process was in when we came, which a dump records.
            self.group_stops[tid] = w.sig
        # Otherwise an interrupt-stop, or a group-stop (SIGSTOP'd process): either is our stop.

    def end_group_stop(self) -> None:
        """SIGCONT to the process while every thread of it is held here: its group-stop (a SIGSTOP, a
        --leave-stopped dump) ends with no thread running, and thaw then lets each one frozen inside
        a syscall go straight back into it (ptrace/resumestop.py), as if it had never stopped."""
        self._thread(None)  # frozen, and by this thread
        os.kill(self.pid, signal.SIGCONT)
        self.was_stopped = False
        self.group_stops.clear()
        # A SIGCONT discards the stop signals still pending (prepare_signal): a SIGSTOP we took off a
        # thread at the freeze (queued by the dump, not acted on yet) goes the same way.
        for th in self._threads.values():
            th.held = [h for h in th.held if h.sig not in STOP_SIGNALS]

    # ----- thaw ------------------------------------------------------------------------------------
    def sigcont_came(self) -> bool:
        """Before a thaw that leaves the process stopped: whether a SIGCONT came while frozen (the held
        ones dropped now, continued_meanwhile set). A tree's thaw asks every member first, so that it
        can name, before any SIGSTOP, each member that the thaw stops: one stopped when frozen is
        stopped again only if a SIGCONT ended that stop meanwhile."""
        if self._frozen and self._drop_sigcont():
            self.continued_meanwhile = True
        return self.continued_meanwhile

    def thaw(self, leave_stopped: bool = False, before_stop: Callable[[], None] | None = None) -> None:
        """Undo everything and detach. Idempotent; a target that died meanwhile is not an error.
        `before_stop`: called before the SIGSTOP of a leave-stopped thaw of a process that was
        stopped when frozen, if a SIGCONT came that sigcont_came() did not see (one a thread
        took after it: the tree's thaw had not named this process)."""
        if not self._frozen:
            if self._prepared is not None:  # prepared only: nothing of the process was touched
                if threading.get_native_id() != self._tracer:
                    raise FreezeError(f"process {self.pid} must be thawed by the thread that prepared it")
                self._prepared = None
                self._unblock_sigchld()
            return
        if threading.get_native_id() != self._tracer:
            raise FreezeError(f"process {self.pid} must be thawed by the thread that froze it")
        with deferred_signals():
            errors = self._release(leave_stopped, before_stop)
            release_orphans()
        if errors:
            raise InjectionError(f"thawing process {self.pid} left it changed: {'; '.join(errors)}")

    def _release(self, leave_stopped: bool, before_stop: Callable[[], None] | None = None) -> list[str]:
        """Everything thaw does; returns the failures that matter (none when the target is dead)."""
        errors: list[str] = []

        def attempt(what: str, fn: object, *args: object) -> None:
            try:
                fn(*args)  # type: ignore[operator]
            except (OSError, CkptError) as e:
                errors.append(f"{what}: {e}")

        # An ordinary thread again before any thread of the target is let go, and the CPU offered to
        # them once they are: the time a real-time thread runs is not charged to its share, so the
        # threads woken by their detach would not take the CPU from it, and a next freeze could stop
        # them again before they ran what is due to them (a held signal's handler, given back at
        # this thaw: tests/test_batch.py::test_batches_are_invisible, back-to-back freezes).
        was_boosted = self._end_boost()
        try:
            self._settled()
        except (OSError, CkptError) as e:  # (a thread not stopped: _detach tries again)
            errors.append(f"settle: {e}")
            self._settling.clear()
        # Nothing of ours left in the process (a dump's freeze releases all before its end): no
        # /proc read to ask whether it is alive.
        undo = self.scratch_maps or self._scratch_saved or self._patches or self._code or leave_stopped
        named = self.continued_meanwhile  # (sigcont_came before this thaw: its SIGSTOP foretold)
        if undo and process_alive(self.pid):
            for th in self._threads.values():
                if not th.dead and not th.stopped and (leave_stopped or th.tid in self._saved_regs):
                    # Left running by an injection cut short: stopped first, as the injected
                    # munmaps below may run in it (the leader's), and its own lost mmap goes too.
                    # Every thread when left stopped: one may stop taking a SIGCONT, which must be
                    # known before the SIGSTOP below is decided (held, it would be given back after
                    # that SIGSTOP at detach, and continue the process).
                    self._stop_again(th)
                    if th.stopped:
                        self._unmap_lost(th, errors)
            # (once, after every thread is stopped: a SIGCONT held or queued by then is seen)
            if leave_stopped and self._drop_sigcont():
                self.continued_meanwhile = True
            for addr, size in reversed(self.scratch_maps):
                attempt(f"munmap {addr:#x}", self._unmap, addr, size)
            self.scratch_maps.clear()
            self._lost_found.clear()
            self._code = None
            attempt("restore scratch", self._put_back_scratch)
            for addr in list(self._patches):
                attempt(f"restore code at {addr:#x}", self._unpatch, addr)
            if leave_stopped and (not self.was_stopped or self.continued_meanwhile):
                # Queued while every thread is held: the first thread to run after detach takes it and
                # stops the group before it returns to user code. A process that was in group-stop
                # needs none: detach puts each thread back into the group-stop still in effect
                # (an extra SIGSTOP would stay pending until SIGCONT: visibly not as before), unless
                # a SIGCONT ended that group-stop meanwhile.
                if self.was_stopped and not named and before_stop is not None:
                    before_stop()
                attempt("SIGSTOP", os.kill, self.pid, signal.SIGSTOP)
        self._stopping = leave_stopped
        self._start_parting(self._kick_parting())
        for th in self._threads.values():
            if not th.dead:
                self._detach(th, errors)
        self.let_go_at = time.perf_counter()  # (the last thread let go: a dump's held_ms)
        self._sent.clear()
        self._unparted.clear()
        if was_boosted:
            os.sched_yield()
        # Failures to undo things in a process that was killed meanwhile are moot (asked only
        # when something failed: a /proc read the usual thaw does without).
        killed = self._killed or (bool(errors) and not process_alive(self.pid))
        self._reap_dead()
        self._mem.close()
        self._threads.clear()
        self._saved_regs.clear()
        self._patches.clear()
        self._scratch_saved.clear()
        self._lost_mmaps.clear()
        self._lost_found.clear()
        self._code = None
        self._sigign = self._sigcgt = None
        self._frozen = False
        self._unblock_sigchld()
        return [] if killed else errors

    def _drop_sigcont(self) -> bool:
        """Whether a SIGCONT came while frozen (held by an injection, or still queued); the held ones
        are dropped. For a thaw that leaves the process stopped, as the user asked: the SIGCONT is
        taken as sent just before the thaw's SIGSTOP, which discards a queued SIGCONT (the kernel's
        prepare_signal); a held one given back after that SIGSTOP would continue the process."""
        came = False
        for th in self._threads.values():
            if any(h.sig == signal.SIGCONT for h in th.held):
                came = True
                th.held = [h for h in th.held if h.sig != signal.SIGCONT]
        bit = 1 << (signal.SIGCONT - 1)
        if not came:
            with suppress(ValueError):
                came = bool(int(_status_field(self.pid, "ShdPnd") or "0", 16) & bit)
        for tid in self.tids if not came else ():
            if inject.pending_signals(self.pid, tid) & bit:
                return True
        return came

    def _detach(self, th: TracedThread, errors: list[str]) -> None:
        tid = th.tid
        if tid in self._sent:  # on its way to parting already: nothing else of ours is on it
            try:
                self._parted(th)
            except ProcessLookupError:
                th.dead = True
                self._killed = True
            except (OSError, CkptError) as e:
                errors.append(f"thaw of thread {tid}: {e}")
            return
        if not th.stopped:
            self._stop_again(th)
            if th.dead:
                return
            if not th.stopped:
                if self._lost_mmaps.pop(tid, None) is not None:
                    errors.append(f"an injected mmap cut short in thread {tid} may be left mapped")
                self._saved_regs.pop(tid, None)  # cannot be put back: the error below says so
                self._drop_held_sigcont(th)
                for h in th.held:  # they would be lost with this object: back on the queue now
                    with suppress(OSError):
                        raw.requeue_signal(self.pid, tid, h.sig, h.info)
                th.held.clear()
                add_orphan(self.pid, tid, self._tracer)
                errors.append(
                    f"thread {tid} cannot be detached before it stops; the next freeze() or thaw() in this "
                    "thread lets it go once it has (or this process's exit)"
                )
                return
        self._unmap_lost(th, errors)
        self._drop_held_sigcont(th)
        try:
            self._restore_regs(tid)  # an injection that was cut short
            sig = 0
            held = list(th.held)
            if held and th.signal_stop:
                # From a signal-delivery-stop the detach signal is delivered at once, with the siginfo
                # we set: give the oldest that way, so it still comes first.
                first = held.pop(0)
                raw.setsiginfo(tid, first.info)
                sig = first.sig
            for h in held:
                raw.requeue_signal(self.pid, tid, h.sig, h.info)
            th.held.clear()
            if sig == 0 and not held and self._parted(th):
                return
            raw.detach(tid, sig)
        except ProcessLookupError:
            th.dead = True  # stopped threads only leave their stop through SIGKILL
            self._killed = True
        except OSError as e:
            errors.append(f"detach {tid}: {e}")
        except CkptError as e:  # (parting: this thread's end lets it go anyway)
            errors.append(f"thaw of thread {tid}: {e}")

    def _drop_held_sigcont(self, th: TracedThread) -> None:
        """A detach that leaves the process stopped with ckpt's SIGSTOP gives back no SIGCONT: one a
        thread took after that SIGSTOP was decided (it stopped only now) counts as sent before it, as
        in _drop_sigcont. (With no SIGSTOP sent, it is given back: the process runs, as it would had
        the SIGCONT come just after the thaw.)"""
        if (
            self._stopping
            and (not self.was_stopped or self.continued_meanwhile)  # (its SIGSTOP sent)
            and any(h.sig == signal.SIGCONT for h in th.held)
        ):
            th.held = [h for h in th.held if h.sig != signal.SIGCONT]
            self.continued_meanwhile = True

    def _stop_again(self, th: TracedThread) -> None:
        """A thread seized but never stopped, or left running by an injection that could not be
        stopped: brought to a stop (within STOP_GRACE), without the step's SIGTRAP."""
        tid = th.tid
        with suppress(OSError):
            raw.interrupt(tid)
        w = self._wait(tid, STOP_GRACE)
        if w is not None:
            th.note(w)
            if w.is_signal_stop and not _step_trap(tid, w.sig):
                with suppress(OSError):
                    th.hold(w.sig)
            if th.stopped and tid in self._saved_regs:
                self._take_step_trap(th)

    def _take_step_trap(self, th: TracedThread) -> None:
        """A thread whose injected single-step outlived its waits may have the step's forced SIGTRAP
        still queued behind this stop: taken off here (a resume meets a pending, unblocked signal
        before any instruction), or the detach would deliver it and SIG_DFL kill the target. A
        SIGTRAP of someone else's met so is held, as any signal. The resume may meet a trap first:
        the PTRACE_INTERRUPT that brought the thread here, sent while it was already stopped, is
        queued behind that stop (ptrace(2): another trap after the current one); then again."""
        tid = th.tid
        deadline = time.monotonic() + STOP_GRACE
        while True:
            try:
                pending = inject.pending_signals(self.pid, tid)
                if not pending & inject.SIGTRAP_BIT or raw.getsigmask(tid) & inject.SIGTRAP_BIT:
                    return
                raw.singlestep(tid)
            except OSError:
                return
            th.stopped = False
            w = self._wait(tid, max(deadline - time.monotonic(), 0.0))
            if w is None:
                return  # running: the caller's not-stopped path says so
            th.note(w)
            if w.exited or not th.stopped:
                return
            if w.is_signal_stop:
                if _step_trap(tid, w.sig):
                    return
                with suppress(OSError):
                    th.hold(w.sig)  # someone's, dequeued first (a SIGTRAP of theirs merged): again

    def _parted(self, th: TracedThread) -> bool:
        """Let a thread frozen inside a blocking syscall go straight back into it (ptrace/parting.py)
        when the thread thawing it ends right after (parting.in_exiting_thread): no trip through user
        mode in which a signal would run its handler before a restarted pause() that then sleeps on.
        False: detach it as usual (a group-stopped process, a plain thread; the caller gives a held
        signal back by a detach). A signal-delivery-stop with nothing to give back (a batch's own end
        signal, suppressed) is a stop inside get_signal like any other: the thread is parted from it."""
        tid = th.tid
        if tid in self._sent:  # on its way into its syscall already (_start_parting)
            sent = self._sent.pop(tid)
            if isinstance(sent, BaseException):
                raise sent
            if sent is not None:
                r, want = sent
                self._into_syscall(th, r, want)
            return True
        if not parting.tracer_exits() or self.was_stopped or self._stopping or tid in self._unparted:
            return False
        r = regs.get_regs(tid)
        want = parting.kernel_restart_targets(r)
        if not want:
            return False
        self._kick(th)
        if self._back_in_get_signal(th, r):
            parting.into_syscall(tid, r, want, timeout=self.timeout, shared=self._shared_sigchld)
        return True

    def _into_syscall(self, th: TracedThread, r: dict[str, int], want: set[int]) -> None:
        """parting.into_syscall(started=True) for a thread _start_parting sent on: its enter-stop and
        the resume into its syscall in one call of quickstops.c where it goes as expected."""
        tid = th.tid
        shared = self._shared_sigchld
        q = self._quick(tid) if len(want) == 1 else None
        if q is None:
            parting.into_syscall(tid, r, want, timeout=self.timeout, shared=shared, started=True)
            return
        so, job = q
        job.want = min(want)
        kind = so.ckpt_qs_enter(ctypes.byref(job))
        if kind == quickstops.ERRNO:
            raise quickstops.error(job, f"letting thread {tid} go back into its syscall")
        if kind == quickstops.RUNNING:
            left = 0.0 if job.timed_out else self.timeout
            parting.into_syscall(tid, r, want, timeout=left, shared=shared, started=True)
        elif kind == quickstops.STOPPED:
            first = raw.WaitResult(tid, job.status)
            parting.into_syscall(tid, r, want, timeout=self.timeout, shared=shared, started=True, first=first)

    def _back_in_get_signal(
        self,
        th: TracedThread,
        r: dict[str, int],
        first: raw.WaitResult | None = None,
        timeout: float | None = None,
    ) -> bool:
        """_parted's wait for the stop its kick brought: True once the thread is in a stop inside
        get_signal, for parting.into_syscall; False if there is nothing left to do (it died, or was
        let go: in a group-stop, or with a signal that came first). ``first``: a stop of it already
        waited for (quickstops.c's), the thread in it; ``timeout``: the time left for the first wait."""
        tid = th.tid
        while True:
            if first is not None:
                w: raw.WaitResult | None = first
                first = None
            else:
                w = self._wait(tid, self.timeout if timeout is None else timeout)
                timeout = None
            if w is None:
                raise FreezeError(f"thread {tid} did not stop at thaw")
            th.note(w)
            if w.exited:
                return False
            if w.is_event_stop and w.sig != signal.SIGTRAP:
                raw.detach(tid, 0)  # a group-stop (a SIGSTOP came): it stays in it, as job control wants
                return False
            if not w.is_signal_stop:
                return True
            # A signal came first: taken from inside the syscall, with its restart rules.
            raw.setregs(tid, regs.dict_to_regs(r))
            if not parting.ignored(tid, w.sig):
                raw.detach(tid, w.sig)
                return False
            raw.cont(tid, 0)

    def _start_parting(self, kicked: Mapping[int, tuple[dict[str, int], set[int]]]) -> None:
        """_parted's first steps for every thread _kick_parting kicked: its kick's stop waited for and
        the thread sent on towards its syscall's enter-stop (parting.start_into), all before the
        first enter-stop is waited for. A thaw parted one thread after another, each its stops'
        round trips, the others held meanwhile (~0.1 ms a thread of an 8-thread thaw here). What
        fails for a thread is raised by _parted, in _detach's turn, as it was before."""
        for tid, (r, want) in kicked.items():
            th = self._threads[tid]
            try:
                if tid in self._in_get_signal:  # (not kicked: _kick_parting)
                    parting.start_into(tid)
                    th.stopped = th.signal_stop = False
                    self._sent[tid] = (r, want)
                    continue
                done, first, left = self._sent_on(th)
                if done:  # (quickstops.c: its stop in get_signal and start_into at once)
                    self._sent[tid] = (r, want)
                elif self._back_in_get_signal(th, r, first, left):
                    parting.start_into(tid)
                    th.stopped = False
                    self._sent[tid] = (r, want)
                else:
                    self._sent[tid] = None
            except (OSError, CkptError) as e:
                self._sent[tid] = e

    def _sent_on(self, th: TracedThread) -> tuple[bool, raw.WaitResult | None, float | None]:
        """A kicked thread's stop inside get_signal and parting.start_into, in one call of
        quickstops.c: (True, ...) when done; else how _back_in_get_signal goes on: the stop the C
        code met (the thread in it), or the time left to wait for one (None: the freeze's)."""
        q = self._quick(th.tid)
        if q is None:
            return False, None, None
        so, job = q
        kind = so.ckpt_qs_part(ctypes.byref(job))
        if kind == quickstops.OK:
            th.stopped, th.signal_stop, th.own_stop = False, False, False
            return True, None, None
        if kind == quickstops.ERRNO:
            raise quickstops.error(job, f"letting thread {th.tid} go back into its syscall")
        if kind == quickstops.STOPPED:
            return False, raw.WaitResult(th.tid, job.status), None
        return False, None, 0.0 if job.timed_out else None

    def _kick(self, th: TracedThread) -> None:
        # Into a stop inside get_signal, whatever stop an injection left it in: the kernel's
        # restart runs after get_signal, and only on the way out from there.
        raw.interrupt(th.tid)
        raw.cont(th.tid, 0)
        th.stopped = False

    def _kick_parting(self) -> dict[int, tuple[dict[str, int], set[int]]]:
        """The first step of _parted for every thread the thaw will part, all at once: their stops
        inside get_signal then come while the thaw goes from thread to thread (one at a time, each
        thaw waited for a stop's round trip per thread before it asked the next). Only a thread
        nothing else of ours is on: stopped, nothing held to give back, no registers or injected
        mmap of an injection cut short. Returns those kicked: their registers and the syscalls
        they restart into, for _start_parting."""
        kicked: dict[int, tuple[dict[str, int], set[int]]] = {}
        self._unparted.clear()
        self._in_get_signal.clear()
        if not parting.tracer_exits() or self.was_stopped or self._stopping:
            return kicked
        for th in self._threads.values():
            tid = th.tid
            if th.dead or not th.stopped or th.held or tid in self._saved_regs or tid in self._lost_mmaps:
                continue
            try:
                known = raw.known_regs(tid)  # (read in the collect, or put back by the batch)
                r = regs.get_regs(tid) if known is None else regs.regs_to_dict(known)
                want = parting.kernel_restart_targets(r)
                if want and th.signal_stop and not th.own_stop:
                    # Inside get_signal already: the stop of a batch's end (its signal, or its
                    # code's fault, taken off by our wait; its registers its own again), from which
                    # a resume goes through the kernel's restart as a kick's stop does. No kick: one
                    # stop less (_start_parting sends it on from here).
                    kicked[tid] = (r, want)
                    self._in_get_signal.add(tid)
                elif want:
                    self._kick(th)
                    kicked[tid] = (r, want)
                else:
                    self._unparted.add(tid)  # (not in a syscall to go back into: _parted asks no more)
            except ProcessLookupError:
                th.dead = True  # (SIGKILL: the thaw reaps it)
                self._killed = True
            except OSError:
                pass  # (_detach's own path reports what fails)
        return kicked

    def _reap_dead(self) -> None:
        """Collect threads that died traced: they stay zombies, and keep the leader from being reaped,
        until their tracer waits for them. The leader itself is left to its parent if that is us."""
        dead = [th.tid for th in self._threads.values() if th.dead]
        if not dead:
            return
        for tid in sorted(dead, key=lambda t: t == self.pid):
            if tid == self.pid and self._our_child:
                continue  # reaping it would steal the exit status from our own wait (subprocess.Popen)
            with suppress(OSError):
                raw.wait(tid, 2.0, shared=self._shared_sigchld)

    def kill(self) -> None:
        """SIGKILL the target and let go of it; its traced threads are reaped."""
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if not self._frozen:
            return
        for th in self._threads.values():
            th.dead = True
        self._reap_dead()
        self._mem.close()
        self._threads.clear()
        self._saved_regs.clear()
        self._patches.clear()
        self._scratch_saved.clear()
        self.scratch_maps.clear()
        self._lost_mmaps.clear()
        self._lost_found.clear()
        self._code = None
        self._sigign = self._sigcgt = None
        self._frozen = False
        self._unblock_sigchld()

    # ----- registers -------------------------------------------------------------------------------
    def get_regs(self, tid: int) -> dict[str, int]:
        self._thread(tid)
        known = raw.known_regs(tid)  # (as the batch left them: raw.py)
        if known is not None:
            return regs.regs_to_dict(known)
        with self._guard():
            return regs.get_regs(tid)

    def set_regs(self, tid: int, values: dict[str, int]) -> None:
        """Names left out keep their current values."""
        self._thread(tid)
        with self._guard():
            regs.set_regs(tid, values)

    def get_xsave(self, tid: int) -> bytes:
        self._thread(tid)
        known = raw.known_xsave(tid)  # (read_threads')
        if known is not None:
            return known
        with self._guard():
            return regs.get_xsave(tid)

    def read_threads(self) -> None:
        """Every thread's XSAVE image and rseq registration read in one call of quickstops.c and
        kept by raw.py for get_xsave and props.rseq_config (a dump's collect: two requests from
        Python a thread cost ~25 us of the freeze each); one thread's are asked as before."""
        tids = [t for t in self.tids if t in self._threads and self._threads[t].stopped]
        if len(tids) < 2:
            return
        with self._guard():
            got = quickstops.read_threads(tids)
        for tid, (xsave, rseq) in got.items():
            raw.know_more(tid, xsave, rseq)

    def set_xsave(self, tid: int, data: bytes) -> None:
        self._thread(tid)
        with self._guard():
            regs.set_xsave(tid, data)

    def get_sigmask(self, tid: int) -> int:
        self._thread(tid)
        known = raw.known_mask(tid)
        if known is not None:
            return known
        with self._guard():
            return raw.getsigmask(tid)

    def set_sigmask(self, tid: int, mask: int) -> None:
        self._thread(tid)
        with self._guard():
            raw.setsigmask(tid, mask)

    # ----- memory ----------------------------------------------------------------------------------
    def read_mem(self, addr: int, size: int) -> bytes:
        return self._mem.read(addr, size)

    def write_mem(self, addr: int, data: bytes) -> None:
        self._mem.write(addr, data)

    def _scratch_addr(self, size: int) -> int:
        return self._stack_area(self._thread(None).tid, size)

    def scratch(self, size: int = 4096) -> int:
        """An address of ``size`` free bytes in the target, for syscall arguments.

        It lies on the leader's stack below its saved rsp and the 128-byte red zone, which by the ABI
        hold nothing live while the thread is stopped. The bytes there are saved on first use and put
        back at thaw (or by release_scratch()), so a dump taken while frozen may see what was written.
        Use scratch_region() to have them back at the end of a block instead.
        """
        addr = self._scratch_addr(size)
        if not any(a == addr and len(old) == size for a, old in self._scratch_saved):
            self._scratch_saved.append((addr, self._mem.read(addr, size)))
        return addr

    @contextmanager
    def scratch_region(self, size: int = 4096) -> Iterator[int]:
        """Like scratch(), but the old bytes are back when the block ends."""
        addr = self._scratch_addr(size)
        old = self._mem.read(addr, size)
        try:
            yield addr
        finally:
            if process_alive(self.pid):
                self._mem.write(addr, old)

    def release_scratch(self) -> None:
        """Put back every byte scratch() handed out, latest first (overlapping areas end up original),
        and unmap batch()'s code: the process as it was, but for the stops, which settle() makes
        safe to be left in should ckpt be killed now (a dump calls this once its injections end)."""
        self._put_back_scratch()
        self.settle()

    def _put_back_scratch(self) -> None:
        self.release_code()
        while self._scratch_saved:
            addr, old = self._scratch_saved[-1]
            self._mem.write(addr, old)
            self._scratch_saved.pop()

    def settle(self) -> None:
        """After the injections of a freeze: every thread in a stop that a death of ckpt (SIGKILL,
        the kernel's detach) leaves harmless, and the signals taken off threads back on the kernel's
        queues, so that such a death loses none (tests/test_freeze_sigkill.py).

        An injected single-step ends in a signal-delivery-stop for its forced SIGTRAP with the trap
        flag still set: the kernel's detach at ckpt's death leaves the flag set, and the next
        instruction traps (SIG_DFL: the target dies). Such a thread is resumed with the signal
        suppressed (the trap flag cleared), into the PTRACE_INTERRUPT sent just before it: the
        kernel takes a pending trap before any signal or instruction, so it stops again (an
        interrupt-stop, or its group-stop), where a detach of any kind lets it go unharmed. A
        batch's end needs none of it: once its stop was waited for it holds no signal (the wait
        takes the stop's code, wait_task_stopped), and a death of ckpt lets the thread go with
        nothing delivered (tests/test_quiet_ends.py); before that wait, its end signal is a quiet
        one where the process has one (batch.quiet_signals), delivered then to no effect.

        A signal a thread took during an injection was only in `held`. The first of such a thread
        goes back with its whole siginfo: resumed with that signal, blocked for the one resume
        (PTRACE_SETSIGINFO first), the thread has the kernel requeue it (ptrace_signal requeues a
        blocked one), and its mask is put back at the stop. The others go back as the thaw sends
        them (requeue_signal: a kill()'s sender becomes ckpt's pid). SIGCONT and the stop signals
        stay held: sent again, each acts again (a SIGCONT discards a stop signal sent after it), and
        the thaw's leave-stopped rules read them there. A thread still in the signal-delivery-stop
        of a signal it stopped for at the freeze keeps it there: any detach delivers it."""
        if not self._frozen:
            return
        self._thread(None)  # by the freezing thread
        keep = (signal.SIGCONT, *STOP_SIGNALS)
        moving: list[tuple[TracedThread, HeldSignal | None, int]] = []  # waited for here
        with deferred_signals(), self._guard():
            for th in self._threads.values():
                if th.dead or not th.stopped or th.tid in self._saved_regs:
                    continue  # (an injection cut short: the thaw's)
                if th.signal_stop and not th.own_stop:
                    continue  # in the stop of a signal it was taking: the kernel holds it
                back = [h for h in th.held if h.sig not in keep]
                first = back.pop(0) if th.own_stop and back else None
                for h in back:
                    raw.requeue_signal(self.pid, th.tid, h.sig, h.info)
                th.held = [h for h in th.held if h.sig in keep or h is first]
                if not th.own_stop:
                    continue
                mask = 0
                if first is not None:
                    raw.setsiginfo(th.tid, first.info)
                    mask = raw.getsigmask(th.tid)
                    raw.setsigmask(th.tid, mask | 1 << (first.sig - 1))
                raw.interrupt(th.tid)
                raw.cont(th.tid, first.sig if first is not None else 0)
                th.stopped = False
                if first is not None:  # (its mask is put back at once)
                    moving.append((th, first, mask))
                else:
                    self._settling.append(th)
            for th, first, mask in moving:
                w = self._wait(th.tid, self.timeout)
                if w is None:
                    raise FreezeError(
                        f"thread {th.tid} of process {self.pid} did not stop again within {self.timeout:g}s"
                    )
                th.note(w)
                if w.exited:
                    continue
                if w.is_signal_stop:  # (not expected: the trap comes first)
                    th.hold(w.sig)
                if first is not None:
                    raw.setsigmask(th.tid, mask)
                    th.held.remove(first)

    def _settled(self) -> None:
        """The threads settle() resumed into their interrupt-stop, stopped there: waited for only
        when something needs them stopped (the next call on a thread, a listing, the thaw), so that
        a dump's copy runs meanwhile instead of waiting for each thread to be scheduled. Until then
        such a thread runs only inside the kernel, between two stops: no instruction of the process,
        no change to its memory."""
        while self._settling:
            th = self._settling[-1]
            w = self._wait(th.tid, self.timeout)
            if w is None:
                raise FreezeError(
                    f"thread {th.tid} of process {self.pid} did not stop again within {self.timeout:g}s"
                )
            self._settling.pop()
            th.note(w)
            if w.stopped and w.is_signal_stop:  # (not expected: the trap comes first)
                th.hold(w.sig)

    def mmap_scratch(
        self, size: int = 4096, prot: int = inject.PROT_READ | inject.PROT_WRITE, at: int = 0
    ) -> int:
        """A private anonymous mapping (rw unless ``prot`` says otherwise) made in the target by an
        injected mmap, unmapped at thaw. For arguments too large for the stack, or code (batch()).
        ``at``: that address or, if taken, wherever the kernel likes.
        It shows in /proc/PID/maps while frozen: a dump must leave out the ranges in ``scratch_maps``."""
        flags = inject.MAP_PRIVATE | inject.MAP_ANONYMOUS
        fixed = flags | (inject.MAP_FIXED_NOREPLACE if at else 0)
        r = self.syscall(nr.MMAP, at, size, prot, fixed, -1, 0, quick=True)
        if at and r < 0:
            r = self.syscall(nr.MMAP, 0, size, prot, flags, -1, 0, quick=True)
        if r < 0:
            raise InjectionError(
                f"injected mmap of {size} bytes in process {self.pid} failed: {os.strerror(-r)}"
            )
        self.scratch_maps.append((r, size))
        return r

    def munmap_scratch(self, addr: int) -> None:
        for i, (a, size) in enumerate(self.scratch_maps):
            if a == addr:
                self._unmap(a, size)
                del self.scratch_maps[i]
                return
        raise KeyError(f"{addr:#x} is not a scratch mapping")

    def _unmap(self, addr: int, size: int) -> None:
        r = self.syscall(nr.MUNMAP, addr, size, quick=True)
        if r < 0:
            raise InjectionError(
                f"injected munmap({addr:#x}, {size}) in process {self.pid} failed: {os.strerror(-r)}"
            )

    # ----- syscall injection -----------------------------------------------------------------------
    def syscall(self, nr: int, *args: int, tid: int | None = None, quick: bool = False) -> int:
        """Run syscall ``nr`` in thread ``tid`` (default: the leader); rax signed (-errno on failure).
        ``quick``: a call that never blocks (mmap, munmap), run in one stop instead of two where the
        thread lets a single-step's SIGTRAP through untouched (inject.step_over_syscall)."""
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        th = self._thread(tid)
        tid = th.tid
        vals = [*args, 0, 0, 0, 0, 0, 0][:6]
        with deferred_signals(), self._guard():
            self._restore_regs(tid)  # first undo an earlier injection that was cut short, if any
            # Registers as ctypes structs, not dicts: an injection is on every dump's freeze path.
            # Those kept since the thread last ran (raw.known_regs: a batch read them) if any.
            saved = raw.known_regs(tid) or raw.getregs(tid)
            site = self._syscall_site(tid, saved)
            self._saved_regs[tid] = saved
            try:
                call = ptrace_registers_t.from_buffer_copy(saved)
                call.rip, call.rax, call.orig_rax = site, nr, regs.MASK64
                for name, v in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), vals, strict=True):
                    setattr(call, name, v & regs.MASK64)
                if quick and self._trap_passes(tid):
                    result = self._step(th, call, saved, site)
                else:
                    raw.setregs(tid, call)
                    result = inject.step_syscall(self.pid, th, site, self.timeout, self._wait)
            except InjectionError:
                self._lost_result(th, lostmap.pending(nr, site, vals))
                raise
            finally:
                # Undo now, even on failure; what cannot be undone now is retried at thaw.
                self._restore_regs(tid)
                if site in self._patches:
                    self._unpatch(site)
        return result

    def _quick(self, tid: int) -> tuple[ctypes.CDLL, quickstops.Job] | None:
        """quickstops.c and the thread's record for it, or None: the stops of this freeze go
        through Python (no library; or another thread of ours may take the SIGCHLD its wait
        needs)."""
        if self._shared_sigchld:
            return None
        so = quickstops.lib()
        if so is None:
            return None
        raw.forget(tid)  # (what quickstops.c does to it goes around raw.py)
        job = self._jobs.get(tid)
        if job is None:
            job = self._jobs[tid] = quickstops.Job()
        job.tid, job.pid = tid, self.pid  # (_first_stops' call moves tid from thread to thread)
        job.sfd = sigchld.thread_fd()
        job.timeout_ms = quickstops.timeout_ms(self.timeout)
        job.leader_check = int(tid == self.pid and len(self._threads) > 1)
        return so, job

    def _step(self, th: TracedThread, call: ptrace_registers_t, saved: ptrace_registers_t, site: int) -> int:
        """inject.step_over_syscall for a thread whose registers are ``saved`` (in _saved_regs);
        its ordinary course in one call of quickstops.c: the step, its SIGTRAP stop, the result and
        the registers put back. The thread stays in that stop (settle() deals with its trap, as
        after Python's step: after the collect, which reads the thread's state as a stop)."""
        tid = th.tid
        q = self._quick(tid)
        if q is None:
            raw.setregs(tid, call)
            return inject.step_over_syscall(self.pid, th, site, self.timeout, self._wait)
        so, job = q
        job.call, job.own = call, saved
        job.done_rip = site + len(inject.SYSCALL_INSN)
        kind = so.ckpt_qs_step(ctypes.byref(job))
        if kind == quickstops.OK:
            del self._saved_regs[tid]  # (put back there)
            th.stopped, th.signal_stop, th.own_stop = True, True, True  # (as step_over_syscall's end)
            return int(job.result)
        if kind == quickstops.ERRNO:
            raise quickstops.error(job, f"an injected syscall in thread {tid}")
        if kind == quickstops.RUNNING:
            th.stopped = False
            left = 0.0 if job.timed_out else None  # (an exit seen: its wait reports it)
            wait = self._wait
            return inject.step_over_syscall(self.pid, th, site, self.timeout, wait, started=True, left=left)
        first = raw.WaitResult(tid, job.status)
        return inject.step_over_syscall(self.pid, th, site, self.timeout, self._wait, first=first)

    def _lost_result(self, th: TracedThread, p: lostmap.PendingMmap | None) -> None:
        """An injected mmap that failed may have mapped (lostmap.py): a stopped thread says so now,
        and the mapping goes with the scratch mappings (unmapped by the thaw, left out by a dump);
        one left running is asked at the thaw, once it stops."""
        if p is None or th.dead:
            return
        if not th.stopped:
            self._lost_mmaps[th.tid] = p
            return
        with suppress(OSError):
            made = lostmap.mapped(th.tid, p)
            if made is not None:
                self.scratch_maps.append(made)
                self._lost_found.append(made[0])  # (gone with the code too: release_code)

    def _unmap_lost(self, th: TracedThread, errors: list[str]) -> None:
        """At the thaw, a thread left running by a failed injected mmap, stopped again: the mapping
        it made meanwhile, if any, unmapped in it before it is let go."""
        p = self._lost_mmaps.pop(th.tid, None)
        if p is None:
            return
        try:
            made = lostmap.mapped(th.tid, p)
            if made is not None:
                r = self.syscall(nr.MUNMAP, *made, tid=th.tid, quick=True)
                if r < 0:
                    errors.append(f"munmap {made[0]:#x} (an injected mmap cut short): {os.strerror(-r)}")
        except (OSError, CkptError) as e:
            errors.append(f"an injected mmap cut short in thread {th.tid} may be left mapped: {e}")

    def note_sigign(self, sigign: str | int | None, sigcgt: str | int | None = None) -> None:
        """The process's SigIgn (and SigCgt) as a status read in this freeze gave them (hex text),
        so that the first quick syscall need not read status again, and batch() may end its runs
        with a quiet signal."""
        if sigign is not None and self._sigign is None:
            with suppress(ValueError):
                self._sigign = sigign if isinstance(sigign, int) else int(sigign, 16)
        if sigcgt is not None and self._sigcgt is None:
            with suppress(ValueError):
                self._sigcgt = sigcgt if isinstance(sigcgt, int) else int(sigcgt, 16)

    def _quiet_signals(self) -> int:
        """The quiet end signals (batch.quiet_signals) batch() may end its runs with: none unless
        this freeze noted the dispositions, and none in a process that was stopped (its runs end
        with a real-time signal, as they always have)."""
        if self._sigign is None or self._sigcgt is None or self.was_stopped:
            return 0
        return bt.quiet_signals(self._sigign, self._sigcgt)

    def _segv_passes(self, mask: int) -> bool:
        """A forced SIGSEGV (a blob's fault on its own unmapped code) changes nothing in a thread of
        this ``mask``: neither blocked there nor ignored by the process (a forced signal that is
        would be unblocked and reset to SIG_DFL), and the process not stopped (as _quiet_signals)."""
        bit = 1 << (signal.SIGSEGV - 1)
        return self._sigign is not None and not self._sigign & bit and not mask & bit and not self.was_stopped

    def _code_gone(self) -> None:
        """A blob unmapped the code mapping itself (batch()'s ``release``)."""
        if self._code is not None:
            with suppress(ValueError):
                self.scratch_maps.remove(self._code)
            self._code = None

    def _trap_passes(self, tid: int) -> bool:
        """SIGTRAP neither blocked in the thread nor ignored by the process: a forced one changes
        nothing there (a forced signal that is blocked or ignored is unblocked and reset to SIG_DFL)."""
        if self._sigign is None:
            self.note_sigign(_status_field(self.pid, "SigIgn") or None)
        if self._sigign is None or self._sigign & inject.SIGTRAP_BIT:
            return False
        return not self.get_sigmask(tid) & inject.SIGTRAP_BIT

    def _restore_regs(self, tid: int) -> None:
        saved = self._saved_regs.get(tid)
        if saved is None:
            return
        th = self._threads[tid]
        if not th.stopped:
            return  # running (an injection that could not be stopped): thaw stops it, then retries
        try:
            raw.setregs(tid, saved)
        except ProcessLookupError:
            th.dead = True  # a stopped tracee only leaves its stop through SIGKILL
            self._killed = True
        del self._saved_regs[tid]

    def _syscall_site(self, tid: int, saved: ptrace_registers_t) -> int:
        """Where to find a ``syscall`` instruction, in order of preference: the vdso (no change to the
        target); the one the thread is stopped just after (it was inside a syscall); else 2 bytes
        patched over rip, recorded in _patches and restored right after the call."""
        if self.use_vdso:
            site = self._vdso(None)
            if site is not None:
                return site
        rip = saved.rip
        if regs.signed64(saved.orig_rax) >= 0:
            try:
                if self._mem.read(rip - 2, 2) == inject.SYSCALL_INSN:
                    return rip - 2
            except TargetError:
                pass
        if rip not in self._patches:  # (else still patched from a call cut short: keep the original bytes)
            self._patches[rip] = self._mem.read(rip, 2)
        self._mem.write(rip, inject.SYSCALL_INSN)
        return rip

    def _vdso(self, maps: Sequence[Vma] | None) -> int | None:
        """The vdso's syscall site, searched for once (``maps``: the caller's mappings, read
        frozen; else read there)."""
        if not self._vdso_searched:
            self._vdso_site = inject.find_vdso_syscall(self.pid, self._mem, maps)
            self._vdso_searched = True
        return self._vdso_site

    def _unpatch(self, addr: int) -> None:
        if process_alive(self.pid):
            self._mem.write(addr, self._patches[addr])
        del self._patches[addr]

    # ----- many syscalls at once (batch.py) ----------------------------------------------------------
    def batch(
        self,
        work: Mapping[int, Sequence[bt.Call]],
        vmas: Sequence[Vma] | None = None,
        sigq: str | None = None,
        meanwhile: Callable[[], None] | None = None,
        release: bool = False,
        ended: Callable[[], None] | None = None,
    ) -> dict[int, list[bt.Result]]:
        """Run each thread's calls (tid -> calls, in order) and return their results.

        Threads that can run a blob (batch.py) all run at once, one run per MAX_CALLS calls; the others
        take their calls one injected syscall at a time. ``vmas``: the process's mappings, if the
        caller has them (to check the stack areas are writable). ``sigq``: the SigQ field of a status
        the caller read in this freeze (else read here): only a hint, as a full queue is handled.
        ``meanwhile``: called once, in this thread, while the threads run their first blobs (or
        after the calls, where none runs a blob): the caller's own reads, which would otherwise
        wait for their stops. It must not touch the threads (they run), and what it reads must be
        something the calls cannot change. ``release``: the caller releases the code after this
        batch (release_code): where each thread's calls fit one run, the leader's run unmaps the
        code itself as its last call (batch.assemble_sp's ``unmap``), started once every other
        thread's run has ended; this saves the munmap's own stop, the settle of its single-step and
        the leader's kick at thaw (~0.2 ms of a one-thread freeze). ``ended``: called once, in this
        thread, as soon as the last run has ended, before the results are read and the stack areas
        put back (where no thread ran a blob: not at all): a dump starts its page-table walks
        there, which the code's munmap would have waited for (holds_code says whether it is gone)."""
        work = {tid: list(c) for tid, c in work.items() if c}
        for tid in work:
            self._thread(tid)
        self._read_own(list(work))
        out: dict[int, list[bt.Result]] = {tid: [] for tid in work}
        fast: dict[int, tuple[int, list[list[bt.Call]]]] = {}
        # Each thread's own registers, read once here: its blob's start saves these (no thread runs
        # between here and its blob's start, and each run puts them back before the next).
        own: dict[int, ptrace_registers_t] = {}
        rsp: dict[int, int] = {}
        masks: dict[int, int] = {}
        if work:
            maps = list(vmas) if vmas is not None else read_maps(self.pid)
            room = bt.queue_has_room(sigq or _status_field(self.pid, "SigQ"), len(work))
            self._quiet = quiet = self._quiet_signals()
            for tid, calls in work.items():
                mask = masks[tid] = self.get_sigmask(tid)
                sig = bt.pick_signal(mask, quiet, room)
                if sig is None:
                    continue
                own[tid] = self._own_regs(tid)
                rsp[tid] = int(own[tid].rsp)
                if self._stack_area_ok(tid, maps, rsp[tid]):
                    fast[tid] = (sig, bt.chunks(calls))
        if fast and vmas is not None and self.use_vdso:
            # The injected mmap's syscall site, from the caller's mappings (read frozen, as the stack
            # check above trusts them to be): no second read of /proc/PID/maps (~0.2 ms).
            self._vdso(maps)
        if fast:
            sizes = [bt.code_size_sp(len(ch)) for _, chs in fast.values() for ch in chs]
            try:
                code = self._code_map(code_map_size(sum(sizes)), maps)
            except InjectionError:
                fast = {}  # no mapping to be had (RLIMIT_AS, a filter we cannot suspend): one by one
        self.blob_tids = set(fast)
        for tid, calls in work.items():
            if tid not in fast:
                out[tid] = self._one_by_one(tid, calls)
        if not fast:
            if meanwhile is not None:
                meanwhile()
            return out
        try:
            rounds = max(len(chs) for _, chs in fast.values())
            # The thread whose run unmaps the code (release): alone in a round after every other
            # thread's run has ended (no run may still be in the code), its blob first in the
            # mapping (its munmap starts at its own start).
            last = None
            if release and rounds == 1 and self._code is not None:
                lead = self.pid if self.pid in fast else min(fast)
                last = lead if self._segv_passes(masks[lead]) else None
            at = code
            blobs: list[dict[int, tuple[bt.Blob, int, list[bt.Call]]]] = []
            image = bytearray()
            for k in range(rounds):
                this: dict[int, tuple[bt.Blob, int, list[bt.Call]]] = {}
                placed: list[tuple[list[bt.Call], int, bt.Blob]] = []  # one copy per calls and signal
                order = sorted(fast.items(), key=lambda item: item[0] != last)  # (`last` first)
                for tid, (sig, chs) in order:
                    if k < len(chs):
                        calls = chs[k]
                        # (where the code, run by this thread, puts its results: assemble_sp)
                        data_at = self._stack_area(tid, bt.data_size(calls), rsp[tid])
                        got = (
                            None
                            if tid == last
                            else next((b for c, s, b in placed if s == sig and c == calls), None)
                        )
                        if got is None:
                            unmap = 0
                            if tid == last:
                                assert self._code is not None and at == self._code[0]
                                unmap = self._code[1]
                            got = bt.assemble_sp(calls, at, sig, unmap)
                            image += got.code
                            at += len(got.code)
                            if not unmap:
                                placed.append((calls, sig, got))
                        this[tid] = (got, data_at, calls)
                blobs.append(this)
            # (the others first, then `last` alone: started as the last of them ends, _run_blobs)
            after = last if last is not None and len(blobs[0]) > 1 else None
            self._mem.write(code, bytes(image))
            for k, this in enumerate(blobs):
                sigs = {t: fast[t][0] for t in this}
                first = k == 0
                last_round = ended if k == len(blobs) - 1 else None
                ran = self._run_blobs(
                    this, sigs, own, meanwhile if first else None, after if first else None, last_round
                )
                for tid, res in ran.items():
                    out[tid].extend(res)
                    if not any(c.masks for c in this[tid][2]):
                        raw.know_mask(tid, masks[tid])  # (its run's signal a stop took: not handled)
        except BaseException:
            if process_alive(self.pid):
                self.release_code()
            raise
        return out

    def _code_map(self, size: int, maps: Sequence[Vma]) -> int:
        """The mapping batch() writes its code into: kept for the next batch of the same freeze (a
        dump asks twice: arming the tracker, collecting), until release_code(), release_scratch() or
        thaw. Made anew when too small."""
        if self._code is not None and self._code[1] >= size:
            return self._code[0]
        self.release_code()
        size = code_map_size(size)
        addr = self.mmap_scratch(size, inject.PROT_READ | inject.PROT_EXEC, _lonely_spot(maps, size))
        self._code = (addr, size)
        return addr

    def holds_code(self) -> bool:
        """Whether a mapping of batch()'s (its code, or one a failed injected mmap made) is still
        in the process: release_code() would then inject an munmap, which waits for the mm's lock
        that a page-table walk holds."""
        return self._code is not None or bool(self._lost_found)

    def release_code(self) -> None:
        """Unmap batch()'s code mapping now (else at thaw), and any mapping a failed injected mmap
        was found to have made (lostmap.py): a dump calls this before its page-table walks, which
        should meet no mapping of ckpt's."""
        if self._code is not None:
            addr, self._code = self._code[0], None
            self.munmap_scratch(addr)
        while self._lost_found:
            self.munmap_scratch(self._lost_found.pop())

    def _stack_area(self, tid: int, size: int, rsp: int | None = None) -> int:
        """``size`` bytes below the thread's red zone. ``rsp``: its stack pointer as _own_regs read
        it in this stop (batch() asks for several areas of each thread: one ptrace call, not three)."""
        if rsp is None:
            rsp = int(self._own_regs(tid).rsp)
        return (rsp - RED_ZONE - size) & ~(SCRATCH_ALIGN - 1)

    def _own_regs(self, tid: int) -> ptrace_registers_t:
        """The thread's own registers: those an injection cut short saved, else its current ones."""
        saved = self._saved_regs.get(tid)
        if saved is not None:
            return saved
        self._thread(tid)
        known = raw.known_regs(tid)
        if known is not None:
            return known
        with self._guard():
            return raw.getregs(tid)

    def _read_own(self, tids: list[int]) -> None:
        """The registers and masks of a batch's threads, where raw.py does not keep them already,
        read in one call of quickstops.c and kept there (_own_regs and get_sigmask then make no
        request): two ptrace requests from Python a thread cost ~30 us of the freeze; one thread's
        cost the C call's price."""
        want = [t for t in tids if t not in self._saved_regs and not raw.is_known(t)]
        if len(want) < 2:
            return
        with self._guard():
            got = quickstops.read_own(want)
        for tid, (r, mask) in got.items():
            raw.know_regs(tid, r)
            raw.know_mask(tid, mask)

    def _stack_area_ok(self, tid: int, maps: Sequence[Vma], rsp: int | None = None) -> bool:
        """The thread itself may write MAX_DATA bytes below its red zone: one writable mapping holds
        them (a fault there would be a forced SIGSEGV)."""
        lo = self._stack_area(tid, bt.MAX_DATA, rsp)
        hi = lo + bt.MAX_DATA + RED_ZONE
        # (maps ascend, as read_maps gives them: the one that may hold lo found by bisection; maps
        # in another order at worst answer False, and the thread's calls go one by one)
        i = bisect.bisect_right(maps, lo, key=_start) - 1
        return i >= 0 and maps[i].start <= lo and hi <= maps[i].end and maps[i].writable

    def _run_blobs(
        self,
        blobs: Mapping[int, tuple[bt.Blob, int, list[bt.Call]]],
        sigs: Mapping[int, int],
        own: Mapping[int, ptrace_registers_t],
        meanwhile: Callable[[], None] | None = None,
        after: int | None = None,
        ended: Callable[[], None] | None = None,
    ) -> dict[int, list[bt.Result]]:
        """Start every blob, call ``meanwhile`` (batch()), then wait for each to stop at its end
        (then ``ended``, batch()'s).
        ``own``: the threads' own registers as batch() read them in this stop. ``after``: the
        thread (one of ``blobs``) whose run starts only once every other one's has ended (the
        leader's, which unmaps the code: batch()); the others' results are read while it runs (a
        round of its own cost a multi-threaded freeze ~0.15 ms more)."""
        out: dict[int, list[bt.Result]] = {}
        with deferred_signals(), self._guard():
            # Every thread's stack area saved, and the calls' inputs put there. (One process_vm_readv
            # for all of them measured slower than a pread each up to ~4 threads, and cold in a new
            # process: ctypes' array types. Kept to pread.)
            areas = {tid: (data_at, bt.data_size(calls)) for tid, (_, data_at, calls) in blobs.items()}
            for data_at, size in areas.values():
                self._scratch_saved.append((data_at, self._mem.read(data_at, size)))
            for _, at, calls in blobs.values():
                for addr, data in bt.inputs(calls, at):
                    self._mem.write(addr, data)
            jobs: dict[int, tuple[ctypes.CDLL, quickstops.Job]] = {}

            def start(tid: int) -> None:
                b = blobs[tid][0]
                th = self._thread(tid)
                self._restore_regs(tid)
                saved = self._saved_regs[tid] = own[tid]  # (never written to: `call` is a copy)
                call = ptrace_registers_t.from_buffer_copy(saved)
                call.rip, call.orig_rax = b.at, regs.MASK64
                q = self._quick(tid)
                if q is None:
                    raw.setregs(tid, call)
                    raw.cont(tid)
                else:
                    so, job = jobs[tid] = q
                    job.call, job.own, job.done_rip, job.sig = call, saved, b.done_rip, sigs[tid]
                    job.fault_rip = b.fault_rip
                    job.tgid = self._own_tids([self.pid])[self.pid]
                    if so.ckpt_qs_start(ctypes.byref(job)) != quickstops.OK:
                        raise quickstops.error(job, f"starting injected code in thread {tid}")
                th.stopped = False

            def end(tid: int) -> None:
                self._end_blob(self._threads[tid], blobs[tid][0], sigs[tid], jobs.get(tid))
                self._restore_regs(tid)

            def results(tids: list[int]) -> None:
                # Each thread stopped at its end: its results read, and its stack area put back
                # (the newest saved first: an area may overlap an older scratch()'s).
                for tid in tids:
                    data_at, size = areas[tid]
                    out[tid] = bt.parse(blobs[tid][2], self._mem.read(data_at, size))
                for tid in reversed(tids):
                    data_at = areas[tid][0]
                    i = max(j for j, x in enumerate(self._scratch_saved) if x[0] == data_at)
                    addr, old = self._scratch_saved.pop(i)
                    self._mem.write(addr, old)

            first = [tid for tid in blobs if tid != after]
            try:
                for tid in first:
                    start(tid)
                if meanwhile is not None:
                    meanwhile()
                for tid in first:
                    end(tid)
                if after is not None:
                    start(after)
                    results(first)
                    end(after)
                    if ended is not None:
                        ended()
                    results([after])
                else:
                    if ended is not None:
                        ended()
                    results(first)
            except BaseException:
                # The other threads may still be running theirs: stopped here, not at thaw, so that
                # the code mapping can go before anything of the process runs again.
                for tid, (b, _, _) in blobs.items():
                    th = self._threads[tid]
                    if not th.dead and not th.stopped:
                        with suppress(CkptError, OSError):
                            self._halt_blob(th, b, sigs[tid])
                    with suppress(CkptError, OSError):
                        self._restore_regs(tid)
                raise
        return out

    def _own_tids(self, tids: list[int]) -> dict[int, int]:
        """The tids the process's own pid namespace gives (a container's): its blob's tgkill names
        itself by those (proc/pidns.py); cached, as they never change."""
        cache = self._own_ids
        missing = [t for t in tids if t not in cache]
        if missing and self._flat_ns:
            cache.update((t, t) for t in missing)
        elif missing:
            try:
                cache.update(own_tids(self.pid, missing))
            except OSError:
                raise self._exited() from None
        return cache

    def _blob_stop(self, th: TracedThread, w: raw.WaitResult, b: bt.Blob, sig: int) -> bool:
        """Note a stop of a thread running a blob: True if it is the blob's end (its own signal,
        suppressed: the stop took it off the queue, and detach passes 0); another signal is held for
        thaw."""
        th.note(w)
        if w.exited:
            raise self._exited()
        if not w.is_signal_stop:
            return False
        info = raw.getsiginfo(th.tid)
        rip = raw.getregs(th.tid).rip
        if b.fault_rip and rip == b.fault_rip and w.sig == signal.SIGSEGV and bt.is_own_fault(info, rip):
            # Its munmap of its own code done: the fault, taken off by this stop and the wait for it
            # as an end signal is (settle), is its end.
            self._code_gone()
            th.own_stop = bool(th.held)
            return True
        if rip == b.done_rip and w.sig == sig:
            ours = bt.is_ours(info, sig, self._own_tids([self.pid])[self.pid])
            if ours or bt.merged_end(sig, self._quiet):
                if not ours:
                    th.held.append(HeldSignal(w.sig, info))  # (someone's, which the blob's joined)
                # Its end signal, taken off by this stop and by the wait for it: nothing for a
                # death of ckpt to deliver (settle), unless signals taken meanwhile are to go back.
                th.own_stop = bool(th.held)
                return True
        if rip == b.stop_rip and w.sig == signal.SIGSTOP:
            th.own_stop = True  # (the fallback's SIGSTOP: settle)
            return True
        th.held.append(HeldSignal(w.sig, info))  # someone's signal: given back at thaw
        return False

    def _halt_blob(self, th: TracedThread, b: bt.Blob, sig: int) -> None:
        """Bring a thread still running its blob back to a stop (a timeout, or an error elsewhere).
        Should it stop at the blob's end first, that signal is suppressed like any end's."""
        with suppress(ProcessLookupError):
            raw.interrupt(th.tid)
        w = self._wait(th.tid, self.timeout)
        if w is None:
            raise InjectionError(f"thread {th.tid} of process {self.pid} is stuck in injected code")
        self._blob_stop(th, w, b, sig)

    def _end_blob(
        self, th: TracedThread, b: bt.Blob, sig: int, q: tuple[ctypes.CDLL, quickstops.Job] | None
    ) -> None:
        """_wait_blob, its ordinary course (the end's own stop, the registers put back) in one call
        of quickstops.c where ``q`` started the blob; whatever else it meets, from there in Python."""
        if q is None:
            return self._wait_blob(th, b, sig)
        so, job = q
        kind = so.ckpt_qs_end(ctypes.byref(job))
        if kind == quickstops.OK:
            raw.know_regs(th.tid, self._saved_regs.pop(th.tid))  # (put back there)
            th.stopped, th.signal_stop, th.own_stop = True, True, bool(th.held)  # as _blob_stop
            if job.unmapped:
                self._code_gone()
        elif kind == quickstops.ERRNO:
            raise quickstops.error(job, f"waiting for injected code in thread {th.tid}")
        elif kind == quickstops.RUNNING:
            self._wait_blob(th, b, sig, timeout=0.0 if job.timed_out else None)
        else:
            self._wait_blob(th, b, sig, first=raw.WaitResult(th.tid, job.status))
        return None

    def _wait_blob(
        self,
        th: TracedThread,
        b: bt.Blob,
        sig: int,
        first: raw.WaitResult | None = None,
        timeout: float | None = None,
    ) -> None:
        """Until the thread stops for the signal its blob sends itself; others are held for thaw.
        ``first``: a stop already waited for (quickstops.c's), the thread in it; ``timeout``: the
        time left (else the freeze's)."""
        tid = th.tid
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        w: raw.WaitResult | None
        while True:
            if first is not None:
                w, first = first, None
            else:
                w = self._wait(tid, max(deadline - time.monotonic(), 0.0))
            if w is None:
                self._halt_blob(th, b, sig)
                raise inject.InjectionTimeout(
                    f"injected code in thread {tid} of process {self.pid} did not finish "
                    f"within {self.timeout:g}s"
                )
            if self._blob_stop(th, w, b, sig):
                return
            raw.cont(tid)  # from an interrupt- or group-stop too: run on to the end
            th.stopped = False

    def _one_by_one(self, tid: int, calls: Sequence[bt.Call]) -> list[bt.Result]:
        out: list[bt.Result] = []
        for c in calls:
            args = [out[a.index].ret if isinstance(a, bt.Ref) else a for a in [*c.args, 0, 0, 0, 0, 0, 0][:6]]
            if not c.buf:
                out.append(bt.Result(self.syscall(c.nr, *args, tid=tid)))
                continue
            with self.scratch_region(-(-c.buf // SCRATCH_ALIGN) * SCRATCH_ALIGN) as buf:
                if c.inp:
                    self._mem.write(buf, c.inp)
                args[c.out_arg] = buf
                r = self.syscall(c.nr, *args, tid=tid)
                out.append(bt.Result(r, self.read_mem(buf, c.out)))
        return out

    # ----- signal actions --------------------------------------------------------------------------
    def sigactions(self, signals: Iterable[int] | None = None) -> list[SigAction]:
        """The action of every signal (but SIGKILL/SIGSTOP), by injected rt_sigaction(sig, NULL, &old, 8),
        all in one batch(). 32 and 33 (glibc's internal signals) are left out only if the kernel refuses them.

        `signals` narrows the query; the others are reported as SIG_DFL with no flags, which is what a
        signal neither caught nor ignored has unless a program set flags on a default action (SIGCHLD's
        SA_NOCLDSTOP: ask for it explicitly)."""
        plan = bt.Plan()
        wanted = inject.ask_sigactions(plan, signals)
        return inject.sigactions_from(self.pid, wanted, plan.run(self))


def thaw_all(
    frozen: Mapping[int, Frozen],
    leave_stopped: bool = False,
    before_stop: Callable[[list[int]], None] | None = None,
) -> None:
    """Thaw every process of `frozen` (one, or a tree's). `before_stop`, with `leave_stopped`: told,
    before any SIGSTOP of the thaw, the pids the thaw stops with ckpt's own SIGSTOP: each that was
    running when frozen, and one stopped then only if a SIGCONT ended that stop meanwhile
    (Frozen.sigcont_came); never one left in a stop of someone else's (a shell's job control, a
    debugger), which the detach only puts back into it. The one rule by which a migration (one
    process or a tree, and its guard) later continues only the stops that are ckpt's."""
    if leave_stopped and before_stop is not None:
        ours = [p for p, fz in frozen.items() if fz.frozen and (not fz.was_stopped or fz.sigcont_came())]
        if ours:
            before_stop(ours)
    for p, fz in frozen.items():
        late = None if before_stop is None else functools.partial(before_stop, [p])
        fz.thaw(leave_stopped=leave_stopped, before_stop=late)


def _step_trap(tid: int, sig: int) -> bool:
    """The SIGTRAP the kernel forced at the end of an injected single-step (inject.step_over_syscall):
    ours, never given to the target, whose default action would kill it."""
    try:
        return inject.is_step_trap(tid, sig)
    except OSError:
        return False
