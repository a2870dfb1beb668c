"""Batched injection (ckpt/ptrace/batch.py): one injected run of code per thread answers what took one
injected syscall per question, the same answers, and the target notices nothing: no signal of ours
reaches it (whatever its disposition), no call of its returns early, its stack, mappings and signal
state are as before, and signals others send meanwhile still arrive. Threads that block every
real-time signal, and a full signal queue, take the one-by-one path."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from collections.abc import Callable

import pytest

from ckpt.ptrace import Frozen
from ckpt.ptrace import batch as bt
from ckpt.ptrace.inject import InjectionTimeout
from tests.test_invisible import cpu_hog
from tests.util import Target

Spawn = Callable[..., Target]
GETTID, GETPID, CLOSE, RT_SIGACTION, RT_SIGPROCMASK, SIGALTSTACK, GETITIMER, PRCTL = (
    186, 39, 3, 13, 14, 131, 36, 157,
)  # fmt: skip
PR_GET_TID_ADDRESS, PR_GET_PDEATHSIG = 40, 2
GETPRIORITY = 140
RT = range(bt.SIGRTMIN, bt.SIGRTMAX + 1)
ROUNDS = 300


def _calls() -> list[bt.Call]:
    return [
        bt.Call(GETTID),
        bt.Call(GETPID),
        bt.Call(RT_SIGACTION, (signal.SIGUSR1, 0, 0, 8), out=32, out_arg=2),
        bt.Call(RT_SIGACTION, (bt.SIGRTMAX, 0, 0, 8), out=32, out_arg=2),
        bt.Call(RT_SIGPROCMASK, (0, 0, 0, 8), out=8, out_arg=2),
        bt.Call(PRCTL, (PR_GET_TID_ADDRESS, 0), out=8, out_arg=1),
        bt.Call(PRCTL, (PR_GET_PDEATHSIG, 0), out=4, out_arg=1),
        bt.Call(SIGALTSTACK, (0, 0), out=24, out_arg=1),
        bt.Call(GETITIMER, (2, 0), out=32, out_arg=1),
        bt.Call(CLOSE, (-1,)),  # fails: -EBADF comes back as such
    ]


def _status(pid: int, tid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return {k: v.strip() for k, _, v in (ln.partition(":") for ln in f)}


def _signal_state(pid: int, tids: list[int]) -> dict[int, tuple[str, ...]]:
    return {t: tuple(_status(pid, t)[k] for k in ("SigBlk", "SigIgn", "SigCgt")) for t in tids}


def _no_rt_pending(pid: int, tids: list[int]) -> bool:
    rt = sum(1 << (s - 1) for s in RT)
    return all(
        not int(_status(pid, t)["SigPnd"], 16) & rt and not int(_status(pid, t)["ShdPnd"], 16) & rt
        for t in tids
    )


def _wait_blocked(pid: int, tids: list[int]) -> None:
    """Until every thread of rtsignals is inside its blocking call: read (0), ppoll (271),
    clock_nanosleep (230, or restart_syscall 219 once a freeze interrupted it). It prints "ready"
    once each has started, a moment before; after a thaw, each thread goes back into its call only
    once the scheduler runs it."""
    want = [0, 0, 230, 230, 271]  # main and allblocked in read; two sleepers; ppoll
    for _ in range(1_000_000):
        calls = []
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                w = f.read().split()[0]
            n = int(w) if w.lstrip("-").isdigit() else -2
            calls.append(230 if n == 219 else n)
        if sorted(calls) == want:
            return
        os.sched_yield()
    raise AssertionError(f"threads of {pid} not all blocked: {calls}")


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_batch_answers_as_one_call_at_a_time(spawn: Spawn) -> None:
    t = spawn("rtsignals")
    with Frozen(t.pid) as f:
        tids = f.tids
        assert len(tids) == 5
        work = {tid: _calls() for tid in tids}
        fast = f.batch(work)
        # The thread that blocks every real-time signal takes the calls one at a time. ppoll's
        # temporary mask blocks them too, but the kernel puts the thread's own mask back before it
        # runs anything of ours (PTRACE_GETSIGMASK reports that one), and ppoll restarts afterwards.
        assert len(f.blob_tids) == 4 and t.pid in f.blob_tids
        slow = {tid: f._one_by_one(tid, calls) for tid, calls in work.items()}
        assert fast == slow
        for tid in tids:
            r = fast[tid]
            assert (r[0].ret, r[1].ret) == (tid, t.pid)
            assert int.from_bytes(r[4].data, "little") == f.get_sigmask(tid)
            assert r[9].ret == -9  # EBADF
            assert all(x.ret == 0 for x in r[2:9])


def test_a_call_takes_an_earlier_result(spawn: Spawn) -> None:
    """Ref(i): an argument that is call i's result (uffd-wp's new fd, copied above the floor)."""
    t = spawn("rtsignals")
    with Frozen(t.pid) as f:
        calls = [bt.Call(GETTID), bt.Call(GETPRIORITY, (0, bt.Ref(0))), bt.Call(GETPRIORITY, (0, 1 << 30))]
        fast = f.batch({tid: calls for tid in f.tids})
        assert fast == {tid: f._one_by_one(tid, calls) for tid in f.tids}
        assert all(r[1].ret == 20 and r[2].ret == -3 for r in fast.values())  # nice 0; ESRCH


def test_long_batches_run_in_rounds(spawn: Spawn) -> None:
    """More calls than one run takes (batch.MAX_CALLS, MAX_DATA): several runs, results in order."""
    t = spawn("rtsignals")
    n = bt.MAX_CALLS * 2 + 5
    with Frozen(t.pid) as f:
        calls = [bt.Call(GETTID) if i % 2 else bt.Call(PRCTL, (PR_GET_TID_ADDRESS, 0), out=8, out_arg=1)
                 for i in range(n)]  # fmt: skip
        got = f.batch({tid: calls for tid in f.tids})
        assert len(bt.chunks(calls)) >= 3
        for tid in f.tids:
            assert [r.ret for r in got[tid][1::2]] == [tid] * (n // 2)
            assert len({r.data for r in got[tid][0::2]}) == 1


@pytest.mark.parametrize("ends", ["real-time", "quiet"])
@pytest.mark.parametrize("load", ["idle", "busy"])
def test_batches_are_invisible(spawn: Spawn, load: str, ends: str) -> None:
    """``ends`` quiet: the runs end with a signal the process ignores (SIGRTMAX-1 here, where the
    thread does not block it: batch.quiet_signals), as a dump's runs do once it has read the
    process's dispositions; their threads are then left in that signal's stop until the thaw."""
    t = spawn("rtsignals")
    tids = sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
    _wait_blocked(t.pid, tids)  # ppoll's temporary mask shows in SigBlk only once it is inside
    before = _signal_state(t.pid, tids)
    maps = _maps(t.pid)
    sent = 0
    with cpu_hog() if load == "busy" else _nothing():
        for i in range(ROUNDS):
            with Frozen(t.pid) as f:
                if i % 10 == 0:
                    # Sent while frozen: the main thread meets it during its run, holds it, and takes
                    # it at thaw, in its handler (counted), exactly once.
                    _tgkill(t.pid, t.pid, signal.SIGUSR1)
                    sent += 1
                if ends == "quiet":
                    st = _status(t.pid, t.pid)
                    f.note_sigign(st["SigIgn"], st["SigCgt"])
                low = {tid: f.get_regs(tid)["rsp"] - 4096 for tid in f.tids}
                stack = {tid: f.read_mem(a, 4096) for tid, a in low.items()}
                got = f.batch({tid: _calls() for tid in f.tids})
                assert all(got[tid][0].ret == tid for tid in f.tids)
                assert {tid: f.read_mem(a, 4096) for tid, a in low.items()} == stack
                f.release_code()  # (else kept for the next batch, until thaw)
                assert _maps(t.pid) == maps
                assert _no_rt_pending(t.pid, f.tids)
    assert t.cmd("count") == f"rtmax 0 usr1 {sent} early 0 last none"
    # The ppoll thread's SigBlk shows ppoll's temporary mask only while it is inside ppoll: the
    # last thaw let it go back in, but it does so only once it is scheduled, which under load can
    # be after the main thread has answered: its own mask (0) read here instead. Shown by pinning
    # that thread alone to a CPU kept busy: 35 of 100 thaws read 0 right after the answer.
    _wait_blocked(t.pid, tids)
    assert _signal_state(t.pid, tids) == before
    assert _maps(t.pid) == maps


def test_full_signal_queue_goes_one_by_one(spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """No room in the signal queue: one call at a time. And should the queue fill between the check
    and the run, the blob's tgkill fails and it stops itself with SIGSTOP instead."""
    t = spawn("rtsignals")
    resource.prlimit(t.pid, resource.RLIMIT_SIGPENDING, (0, 0))
    with Frozen(t.pid) as f:
        ref = {tid: f._one_by_one(tid, _calls()) for tid in f.tids}
        assert f.batch({tid: _calls() for tid in f.tids}) == ref
        assert f.blob_tids == set()
        monkeypatch.setattr(bt, "queue_has_room", lambda status, need: True)
        assert f.batch({tid: _calls() for tid in f.tids}) == ref
        assert len(f.blob_tids) == 4
        assert f.held_signals == {}
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"
    assert t.state() in ("S", "R")


def test_no_room_for_code_goes_one_by_one(spawn: Spawn) -> None:
    """The target cannot map another page (RLIMIT_AS reached): the calls go one by one, as answered."""
    t = spawn("rtsignals")
    with open(f"/proc/{t.pid}/status") as fh:
        vmsize = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmSize:")) * 1024
    resource.prlimit(t.pid, resource.RLIMIT_AS, (vmsize, vmsize))
    with Frozen(t.pid) as f:
        ref = {tid: f._one_by_one(tid, _calls()) for tid in f.tids}
        assert f.batch({tid: _calls() for tid in f.tids}) == ref
        assert f.blob_tids == set()
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"


def test_a_run_that_blocks_is_stopped_and_undone(spawn: Spawn) -> None:
    """A call that blocks (read of the pipe nobody writes, fd 3) runs out the timeout: the thread is
    stopped and put back, the other threads' runs end, the code mapping goes, the target runs on."""
    t = spawn("rtsignals")
    maps = _maps(t.pid)
    with Frozen(t.pid, timeout=0.5) as f:
        work = {tid: [bt.Call(GETTID)] for tid in f.tids}
        work[t.pid] = [bt.Call(GETTID), bt.Call(0, (3, 0, 1), out=8, out_arg=1)]
        with pytest.raises(InjectionTimeout):
            f.batch(work)
        assert _maps(t.pid) == maps
        assert f.batch({tid: [bt.Call(GETTID)] for tid in f.tids}) == {
            tid: [bt.Result(tid)] for tid in f.tids
        }
        f.release_code()
        assert _no_rt_pending(t.pid, f.tids) and f.held_signals == {}
    assert t.cmd("count") == "rtmax 0 usr1 0 early 0 last none"
    assert _maps(t.pid) == maps


def _tgkill(tgid: int, tid: int, sig: int) -> None:
    from ckpt.ptrace import raw

    raw.tgkill(tgid, tid, sig)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _fresh(tid: int) -> tuple[dict[str, int], int]:
    """The thread's registers and mask as the kernel has them now, around raw.py's memory."""
    from ckpt.ptrace import raw, regs

    r = raw.ptrace_registers_t()
    raw._ptrace(raw.PTRACE_GETREGS, tid, 0, ctypes.addressof(r))
    m = ctypes.c_uint64()
    raw._ptrace(raw.PTRACE_GETSIGMASK, tid, raw.SIGSET_SIZE, ctypes.addressof(m))
    return regs.regs_to_dict(r), m.value


def test_registers_and_masks_known_after_a_batch_are_the_kernels(spawn: Spawn) -> None:
    """raw.py keeps what it last read or set of a stopped thread (a freeze asks each thread's
    registers and mask at its batch, its collect and its thaw): after a batch and after an injected
    syscall, what Frozen.get_regs and get_sigmask answer from there is what the kernel has; a run
    that changes a thread's mask (rt_sigprocmask) leaves none of it kept; the thaw forgets all."""
    from ckpt.ptrace import raw

    t = spawn("rtsignals")
    usr2 = (1 << (signal.SIGUSR2 - 1)).to_bytes(8, "little")
    with Frozen(t.pid) as f:
        tids = f.tids
        f.batch({tid: _calls() for tid in tids})
        for tid in f.blob_tids:
            assert raw.known_regs(tid) is not None and raw.known_mask(tid) is not None
        for tid in tids:
            assert (f.get_regs(tid), f.get_sigmask(tid)) == _fresh(tid)
        lead = t.pid
        assert f.syscall(GETPID, tid=lead) == t.pid
        assert raw.known_regs(lead) is not None
        assert (f.get_regs(lead), f.get_sigmask(lead)) == _fresh(lead)
        before = f.get_sigmask(lead)
        # SIG_BLOCK SIGUSR2 in the main thread, then SIG_SETMASK back to what it was.
        block = bt.Call(RT_SIGPROCMASK, (0, 0, 0, 8), inp=usr2, out=8, out_arg=1)
        f.batch({lead: [block]})
        assert raw.known_mask(lead) is None
        assert f.get_sigmask(lead) == _fresh(lead)[1] == before | 1 << (signal.SIGUSR2 - 1)
        back = bt.Call(RT_SIGPROCMASK, (2, 0, 0, 8), inp=before.to_bytes(8, "little"), out=8, out_arg=1)
        f.batch({lead: [back]})
        assert f.get_sigmask(lead) == _fresh(lead)[1] == before
        assert f.get_regs(lead) == _fresh(lead)[0]
    assert all(raw.known_regs(tid) is None and raw.known_mask(tid) is None for tid in tids)
