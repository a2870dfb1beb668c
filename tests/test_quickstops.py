"""The injected stops in C (ckpt/ptrace/quickstops.c) and their hand-over to Python: whatever the C
code meets that is not the stop it expects (someone's signal before the step or the run, a call that
does not return), the Python loop takes the thread over from that very stop, and the answers, the
signals the target sees and its registers are those of the all-Python path (CKPT_QUICKSTOPS=0)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt import sysno as nr
from ckpt.dump import dump
from ckpt.image import open_layer
from ckpt.proc import read_status
from ckpt.ptrace import Frozen, quickstops, raw
from ckpt.ptrace import batch as bt
from ckpt.ptrace.freeze import _tracer_of
from tests.util import ROOT, Target

Spawn = Callable[..., Target]
GETTID, GETPID, PRCTL = 186, 39, 157
PR_GET_TID_ADDRESS = 40
ERESTARTSYS = 512


@pytest.fixture(params=["c", "python"])
def stops(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test once with the C stops and once without."""
    quickstops.reset(request.param == "c")
    if request.param == "c" and quickstops.lib() is None:
        quickstops.reset(True)
        pytest.fail("ckpt/ptrace/_quickstops.so is not built (scripts/setup.sh builds it)")
    yield request.param
    quickstops.reset(True)


def _calls() -> list[bt.Call]:
    return [bt.Call(GETTID), bt.Call(GETPID), bt.Call(PRCTL, (PR_GET_TID_ADDRESS, 0), out=8, out_arg=1)]


def _used_c(f: Frozen) -> bool:
    return bool(f._jobs)


def test_the_library_loads_and_can_be_turned_off() -> None:
    quickstops.reset(True)
    assert quickstops.lib() is not None
    quickstops.reset(False)
    try:
        assert quickstops.lib() is None
    finally:
        quickstops.reset(True)
    assert quickstops.lib() is not None


def test_quick_syscalls_answer_and_leave_registers(spawn: Spawn, stops: str) -> None:
    """mmap and munmap single-stepped, 50 pairs: each answers as the kernel does, the thread's
    registers are its own after each, and it is left in the step's own stop, for settle()."""
    t = spawn("rtsignals")
    with Frozen(t.pid) as f:
        regs = f.get_regs(t.pid)
        for _ in range(50):
            addr = f.syscall(nr.MMAP, 0, 4096, 3, 0x22, -1, 0, quick=True)
            assert addr > 0 and addr % 4096 == 0
            assert f.read_mem(addr, 8) == b"\0" * 8
            assert f.syscall(nr.MUNMAP, addr, 4096, quick=True) == 0
            assert f.get_regs(t.pid) == regs
        th = f._threads[t.pid]
        assert th.stopped and th.signal_stop and th.own_stop and not th.held
        assert _used_c(f) == (stops == "c")
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"


def test_a_signal_before_the_step_is_held_and_given_back(spawn: Spawn, stops: str) -> None:
    """A SIGUSR1 sent to the frozen main thread: the step meets it first (a signal-delivery-stop at
    the syscall, not the step's trap). Held, the step taken again, the answer right; at thaw the
    handler runs once."""
    t = spawn("rtsignals")
    with Frozen(t.pid) as f:
        regs = f.get_regs(t.pid)
        raw.tgkill(t.pid, t.pid, signal.SIGUSR1)
        assert f.syscall(GETPID, quick=True) == t.pid
        assert f.held_signals == {t.pid: [signal.SIGUSR1]}
        assert f.get_regs(t.pid) == regs
    assert t.cmd("count") == "rtmax 0 usr1 1 early 0 last none"


def test_a_signal_before_the_run_is_held_and_given_back(spawn: Spawn, stops: str) -> None:
    """The same for a batch's run: the thread resumed into its code meets the queued SIGUSR1 first;
    Python holds it and runs the blob on to its end. Every thread's answers as one by one."""
    t = spawn("rtsignals")
    with Frozen(t.pid) as f:
        ref = {tid: f._one_by_one(tid, _calls()) for tid in f.tids}
        raw.tgkill(t.pid, t.pid, signal.SIGUSR1)
        assert f.batch({tid: _calls() for tid in f.tids}) == ref
        assert t.pid in f.blob_tids
        assert f.held_signals == {t.pid: [signal.SIGUSR1]}
        f.release_code()
    assert t.cmd("count") == "rtmax 0 usr1 1 early 0 last none"


def test_a_step_that_blocks_is_stopped_and_undone(spawn: Spawn, stops: str) -> None:
    """A quick step of a call that blocks (read of the pipe nobody writes, fd 3): the C wait runs out
    its time and hands the running thread to Python, which interrupts it: the read's own result
    (cut short) is the answer, the registers are put back and the target runs on, its own read
    not ended early."""
    t = spawn("rtsignals")
    with Frozen(t.pid, timeout=0.3) as f:
        regs = f.get_regs(t.pid)
        buf = f.scratch(64)
        assert f.syscall(nr.READ, 3, buf, 1, quick=True) in (-errno.EINTR, -ERESTARTSYS)
        assert f.get_regs(t.pid) == regs
        assert f.syscall(GETPID, quick=True) == t.pid
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"
    assert t.state() in ("S", "R")


_CHILD = """
import os, signal, sys
from ckpt import sysno as nr
from ckpt.ptrace import Frozen, quickstops, sigchld
with sigchld.blocked():
    f = Frozen(int(sys.argv[1]))
    f.freeze()
    addr = f.syscall(nr.MMAP, 0, 4096, 3, 0x22, -1, 0, quick=True)
    f.syscall(nr.MUNMAP, addr, 4096, quick=True)
    f.settle()  # (as a dump's release_scratch does once its injections are over)
    os.write(1, b"c" if f._jobs else b"p")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_ckpt_killed_after_a_settled_step_leaves_the_target_unharmed(spawn: Spawn, stops: str) -> None:
    """A process that froze the target, stepped an mmap and a munmap, settled and then died of
    SIGKILL: the step's stop as the C code leaves it is one settle() takes, and the kernel's detach
    lets the target go with no trap flag or SIGTRAP left behind (it would die)."""
    t = spawn("rtsignals")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if stops == "python":
        env["CKPT_QUICKSTOPS"] = "0"
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, str(t.pid)], env=env, capture_output=True, timeout=60, check=False
    )
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    assert p.stdout == (b"c" if stops == "c" else b"p")
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"
    assert t.state() in ("S", "R")


def test_signals_during_a_thaw_end_the_calls_either_way(
    spawn: Spawn, stops: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thaw's parting (ckpt/ptrace/parting.py) through quickstops.c: a thread back in a stop
    inside get_signal, then at its syscall's enter-stop, each one call; a SIGUSR1 that comes during
    the thaw meets the C code at either stop or before, and Python takes the thread over there.
    As tests/test_thaw_in_syscall.py: every signalled call ends with EINTR after one run of its
    handler, none returns by itself. Both paths, 150 rounds each, the seed printed."""
    from tests.test_thaw_in_syscall import signalled_thaws

    entered = [0]
    so = quickstops.lib()
    if so is not None:
        real = so.ckpt_qs_enter

        def counted(job: object) -> int:
            entered[0] += 1
            return int(real(job))

        monkeypatch.setattr(so, "ckpt_qs_enter", counted)
    signalled_thaws(spawn("wakeups"), 150, sigchld_blocked=True)
    assert (entered[0] > 0) == (stops == "c")


def test_the_seizes_first_stops_either_way(spawn: Spawn, stops: str) -> None:
    """Each seized thread's first stop, waited for in one C call: an interrupt-stop in a running
    process; the group-stop of a stopped one (recorded as the stop it was in, jobstop.py); the
    threads as Python's waits leave them."""
    t = spawn("rtsignals")
    with Frozen(t.pid) as f:
        assert len(f.tids) == 5 and not f.was_stopped and f.group_stops == {}
        assert all(th.stopped and not th.signal_stop and not th.held for th in f._threads.values())
        assert _used_c(f) == (stops == "c")
    os.kill(t.pid, signal.SIGSTOP)
    assert t.stopped_state() == "T"
    with Frozen(t.pid) as f:
        assert f.was_stopped
        assert f.group_stops == {tid: signal.SIGSTOP for tid in f.tids}
    os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"


def test_a_dump_records_its_threads_as_stopped(spawn: Spawn, stops: str, tmp_path: Path) -> None:
    """A full and an incremental dump: every thread recorded in the state a frozen thread has ("t"),
    as the collect reads it; none caught on its way between two stops (a settle begun before the
    collect showed the main thread as running, "R": the regression tests/test_service.py found)."""
    t = spawn("rtsignals")
    for i in range(3):
        r = dump(t.pid, tmp_path, incremental=i > 0)
        threads = open_layer(r.layer).layers[0].meta.threads
        assert [th.state for th in threads] == ["t"] * 5, [th.state for th in threads]
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.parametrize("mode", ["dfl", "handler", "ignore", "block"])
def test_a_run_that_unmaps_its_own_code(spawn: Spawn, stops: str, mode: str) -> None:
    """A one-thread batch whose code goes right after (release): its run unmaps the code itself and
    ends in the stop of the fault on its return (batch.assemble_sp's unmap). Answers as one by one,
    the mapping gone while still frozen, nothing of it seen by the target: SIGSEGV's action and
    mask as they were, no handler run. Where SIGSEGV is blocked or ignored (a forced one would
    change both) the run ends with its end signal and the code goes in a stop of its own."""
    t = spawn("segv", mode)
    before = t.cmd("state")
    maps = _maps(t.pid)
    with Frozen(t.pid) as f:
        regs = f.get_regs(t.pid)
        f.note_sigign(read_status(t.pid)["SigIgn"])  # (as a dump's _ask notes it)
        ref = {t.pid: f._one_by_one(t.pid, _calls())}
        assert f.batch({t.pid: _calls()}, release=True) == ref
        assert _used_c(f) == (stops == "c")
        own = mode in ("dfl", "handler")
        assert (f._code is None) == own
        if own:
            th = f._threads[t.pid]
            assert th.stopped and th.signal_stop and not th.own_stop and not th.held
            assert not f.scratch_maps
        f.release_code()
        assert _maps(t.pid) == maps
        assert f.get_regs(t.pid) == regs
    assert t.cmd("state") == before
    action = {"ignore": "ign", "handler": "handler"}.get(mode, "dfl")
    assert before == f"segv 0 action {action} blocked {int(mode == 'block')} early 0"


def test_a_threaded_run_that_unmaps_its_code_starts_as_the_others_end(
    spawn: Spawn, stops: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several threads' batch whose code goes right after (release): the leader's run, which
    unmaps the code, starts only once every other thread's has ended (in the same _run_blobs: the
    others' results are read while it runs). Answers as one by one; the mapping, registers and
    signal state as before; nothing seen by the target."""
    t = spawn("rtsignals")
    maps = _maps(t.pid)
    events: list[tuple[str, int]] = []
    quick, end = Frozen._quick, Frozen._end_blob

    def started(self: Frozen, tid: int) -> object:
        events.append(("start", tid))
        return quick(self, tid)

    def ended(self: Frozen, th: object, *a: object) -> None:
        events.append(("end", th.tid))  # type: ignore[attr-defined]
        end(self, th, *a)  # type: ignore[arg-type]

    with Frozen(t.pid) as f:
        regs = {tid: f.get_regs(tid) for tid in f.tids}
        masks = {tid: f.get_sigmask(tid) for tid in f.tids}
        f.note_sigign(read_status(t.pid)["SigIgn"])
        work = {tid: _calls() for tid in f.tids}
        ref = {tid: f._one_by_one(tid, c) for tid, c in work.items()}
        monkeypatch.setattr(Frozen, "_quick", started)
        monkeypatch.setattr(Frozen, "_end_blob", ended)
        assert f.batch(work, release=True) == ref
        monkeypatch.undo()
        assert len(f.blob_tids) == 4 and t.pid in f.blob_tids
        assert f._code is None  # (the leader's run unmapped it)
        runs = [e for e in events if e[1] in f.blob_tids]
        assert runs[-2:] == [("start", t.pid), ("end", t.pid)], runs
        # (before the runs: the injected mmap of the code, in the leader)
        others = [e for e in runs[:-2] if e[1] != t.pid]
        assert len(others) == 6 and {e for e in others} == {
            (k, x) for x in f.blob_tids - {t.pid} for k in ("start", "end")
        }
        f.release_code()
        assert _maps(t.pid) == maps
        assert {tid: f.get_regs(tid) for tid in f.tids} == regs
        assert {tid: f.get_sigmask(tid) for tid in f.tids} == masks
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"


def test_the_threads_registers_and_masks_read_in_one_call_are_the_kernels(spawn: Spawn) -> None:
    """quickstops.read_own (a batch's first look at its threads, Frozen._read_own): each stopped
    thread's registers and mask as PTRACE_GETREGS and PTRACE_GETSIGMASK answer them from Python; a
    thread that is not a stopped tracee of this thread is left out, not answered."""
    quickstops.reset(True)
    t = spawn("rtsignals")
    with Frozen(t.pid) as f:
        got = quickstops.read_own([*f.tids, os.getpid()])
        assert set(got) == set(f.tids)
        for tid, (r, mask) in got.items():
            assert bytes(r) == bytes(raw.getregs(tid)) and mask == raw.getsigmask(tid)
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"


def test_the_threads_xsave_and_rseq_read_in_one_call_are_the_kernels(spawn: Spawn) -> None:
    """quickstops.read_threads (a dump's collect, Frozen.read_threads): each stopped thread's XSAVE
    image and rseq registration as Python's own requests answer them; get_xsave and rseq_config
    answer from there, and forget them once the thread may run."""
    from ckpt.proc.props import rseq_config
    from ckpt.ptrace import regs

    quickstops.reset(True)
    t = spawn("rtsignals")
    with Frozen(t.pid) as f:
        got = quickstops.read_threads(f.tids)
        assert set(got) == set(f.tids)
        python = {tid: (regs.get_xsave(tid), rseq_config(tid)) for tid in f.tids}
        for tid, (xsave, rseq) in got.items():
            assert xsave == python[tid][0]
            assert isinstance(rseq, bytes) or rseq in (errno.EIO, errno.EINVAL)
        f.read_threads()
        for tid in f.tids:
            assert raw.known_xsave(tid) == python[tid][0]
            assert (f.get_xsave(tid), rseq_config(tid)) == python[tid]
        assert f.syscall(GETPID, tid=t.pid) == t.pid  # (the main thread ran: nothing kept of it)
        assert raw.known_xsave(t.pid) is None and raw.known_rseq(t.pid) is None
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"


def _dumps_counting_unmaps(pid: int, d: Path) -> tuple[list[int], Path]:
    """A full dump and an incremental of ``pid``: which freezes had a run unmap the batch's code."""
    gone = []
    real = Frozen._code_gone

    def counted(self: Frozen) -> None:
        gone.append(self.pid)
        real(self)

    Frozen._code_gone = counted  # type: ignore[method-assign]
    try:
        dump(pid, d)
        r = dump(pid, d, incremental=True)
    finally:
        Frozen._code_gone = real  # type: ignore[method-assign]
    return gone, r.layer


def test_a_dump_of_one_thread_unmaps_its_code_in_the_run(spawn: Spawn, stops: str, tmp_path: Path) -> None:
    """A dump and an incremental of a one-thread process: the batch's run unmaps its own code (one
    stop less), the layers record the thread stopped ("t"), and the target runs on as it was."""
    t = spawn("segv", "dfl")
    gone, layer = _dumps_counting_unmaps(t.pid, tmp_path / "d")
    assert gone == [t.pid, t.pid]
    meta = open_layer(layer).layers[0].meta
    assert [th.state for th in meta.threads] == ["t"]
    assert t.cmd("state") == "segv 0 action dfl blocked 0 early 0"


def test_a_dump_of_threads_unmaps_its_code_in_the_leaders_run(
    spawn: Spawn, stops: str, tmp_path: Path
) -> None:
    """Six threads: the leader's run, alone after the other five have ended theirs, unmaps the
    code; every thread recorded stopped, each worker's own check of its state (mask, name, TLS,
    affinity...) still right, none of their blocking calls returned early."""
    t = spawn("threads", "5")
    gone, layer = _dumps_counting_unmaps(t.pid, tmp_path / "d")
    assert gone == [t.pid, t.pid]
    meta = open_layer(layer).layers[0].meta
    assert len(meta.threads) == 6 and {th.state for th in meta.threads} == {"t"}
    assert t.cmd("check") == "ok"


def test_own_fault_is_told_from_a_sent_sigsegv() -> None:
    import struct

    def info(signo: int, code: int, addr: int) -> bytes:
        return struct.pack("<iiiiQ", signo, 0, code, 0, addr) + bytes(104)

    assert bt.is_own_fault(info(signal.SIGSEGV, bt.SEGV_MAPERR, 0x1000), 0x1000)
    assert not bt.is_own_fault(info(signal.SIGSEGV, bt.SEGV_MAPERR, 0x1000), 0x2000)  # elsewhere
    assert not bt.is_own_fault(info(signal.SIGSEGV, -6, 0x1000), 0x1000)  # tgkill's
    assert not bt.is_own_fault(info(signal.SIGSEGV, 0, 0x1000), 0x1000)  # kill's
    assert not bt.is_own_fault(info(signal.SIGSEGV, 2, 0x1000), 0x1000)  # SEGV_ACCERR
    assert not bt.is_own_fault(info(signal.SIGBUS, bt.SEGV_MAPERR, 0x1000), 0x1000)


def test_the_threads_seized_in_one_call(spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """quickstops.seize (Frozen._seize_all): every thread seized and interrupted in one call, each in
    its interrupt-stop as Python's seize leaves it; a thread the call could not seize (here our own
    pid: EPERM) is reported, not seized. And a freeze whose one call left a thread out seizes that
    one from Python (Frozen._seize), the freeze the same."""
    quickstops.reset(True)
    t = spawn("rtsignals")
    tids = sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
    got = quickstops.seize([*tids, os.getpid()], raw.PTRACE_O_TRACESYSGOOD)
    assert got is not None and got[os.getpid()][0] == errno.EPERM
    try:
        for tid in tids:
            assert got[tid] == (0, 0)
            w = raw.wait(tid, 10.0)
            assert w is not None and w.is_event_stop and w.sig == signal.SIGTRAP  # (its interrupt-stop)
            assert _tracer_of(t.pid, tid) == os.getpid()
    finally:
        for tid in tids:
            raw.detach(tid)
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"

    calls: list[list[int]] = []
    real = quickstops.seize

    def one_left_out(ids: list[int], options: int) -> dict[int, tuple[int, int]] | None:
        calls.append(list(ids))
        out = real(ids[:-1], options)  # (the last as a seize that failed with ESRCH would leave it)
        return None if out is None else {**out, ids[-1]: (errno.ESRCH, 0)}

    monkeypatch.setattr(quickstops, "seize", one_left_out)
    with Frozen(t.pid) as f:
        assert sorted(f.tids) == tids and len(calls) == 1 and sorted(calls[0]) == tids
        assert all(th.stopped and not th.held for th in f._threads.values())
        assert all(_tracer_of(t.pid, tid) == os.getpid() for tid in tids)
        assert f.syscall(GETPID, tid=calls[0][-1]) == t.pid  # (the one Python seized answers too)
    assert all(_tracer_of(t.pid, tid) == 0 for tid in tids)
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"
