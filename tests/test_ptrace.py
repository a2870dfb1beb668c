"""ckpt.ptrace against real processes: freezing, registers, injected syscalls, signals, thaw."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ckpt import sysno as nr
from ckpt.errors import FreezeError, InjectionError, TargetExited
from ckpt.proc import read_maps
from ckpt.ptrace import Frozen, deferred_signals, release_orphans, sigchld
from ckpt.ptrace.tracee import orphans
from tests.util import Target

Spawn = Callable[..., Target]

NR_GETPID, NR_MMAP, NR_MUNMAP = nr.GETPID, nr.MMAP, nr.MUNMAP
NR_PAUSE = 34
SI_USER = 0
SI_QUEUE = -1
SA_SIGINFO = 4
SIGRTMIN = signal.SIGRTMIN

_libc = ctypes.CDLL(None, use_errno=True)


def sigqueue(pid: int, sig: int, value: int) -> None:
    # union sigval is passed like a long on x86_64
    if _libc.sigqueue(pid, sig, ctypes.c_long(value)) != 0:
        raise OSError(ctypes.get_errno(), "sigqueue")


def task_field(pid: int, tid: int, name: str) -> str:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for ln in f:
            if ln.startswith(name + ":"):
                return ln.split(":", 1)[1].strip()
    raise KeyError(name)


def task_state(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def task_syscall(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
        return f.read().split()[0]


def tasks(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


def traced_by_us() -> list[int]:
    me = str(os.getpid())
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status") as f:
                    if any(ln.startswith("TracerPid:") and ln.split()[1] == me for ln in f):
                        out.append(int(d))
            except OSError:
                pass
    return out


def code_bytes(pid: int) -> dict[tuple[int, int], bytes]:
    """Every executable file mapping's bytes (the text the injection must not change)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        text = [v for v in read_maps(pid) if v.executable and v.is_file]
        return {(v.start, v.end): os.pread(fd, v.size, v.start) for v in text}
    finally:
        os.close(fd)


def blocked_tids(pid: int) -> list[int]:
    """Threads of memtarget / sigtarget sitting in read()."""
    return [t for t in tasks(pid) if task_syscall(pid, t) == "0"]


def settle(t: Target, n: int = 2) -> None:
    """Wait until the target's main thread is back in read(0) (it answers before it gets there)."""
    assert wait_for(lambda: t.pid in blocked_tids(t.pid) and len(blocked_tids(t.pid)) >= n)


@pytest.fixture(autouse=True)
def _nothing_left_traced() -> Iterator[None]:
    yield
    assert traced_by_us() == [], "a test left processes traced"


# ----- freeze / thaw --------------------------------------------------------------------------------


def test_freeze_stops_every_thread_and_thaw_restores(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    before = t.sum()
    with Frozen(t.pid) as f:
        assert f.tids == tasks(t.pid)
        assert len(f.tids) == 3
        assert all(task_state(t.pid, tid) == "t" for tid in f.tids)
        assert all(int(task_field(t.pid, tid, "TracerPid")) == os.getpid() for tid in f.tids)
        assert not f.was_stopped
    assert not f.frozen
    for tid in tasks(t.pid):
        assert task_field(t.pid, tid, "TracerPid") == "0"
        assert task_state(t.pid, tid) in "SR"
    assert t.sum() == before


def test_thaw_is_idempotent_and_exceptions_thaw(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    f = Frozen(t.pid)
    f.freeze()
    f.freeze()  # no-op
    f.thaw()
    f.thaw()
    with pytest.raises(KeyboardInterrupt), Frozen(t.pid):
        raise KeyboardInterrupt
    assert t.tracer() == 0
    assert t.sum()


def test_threads_created_during_attach_are_caught(spawn: Spawn) -> None:
    t = spawn("threadspawner")

    def created() -> int:
        return int(t.cmd("count").split()[1])

    most = 0
    for _ in range(15):
        before = created()
        with Frozen(t.pid) as f:
            listed = tasks(t.pid)
            exited = {tid for tid in listed if task_state(t.pid, tid) in "ZX"}
            assert set(listed) - exited == set(f.tids)
            assert all(task_state(t.pid, tid) == "t" for tid in f.tids)
            time.sleep(0.005)  # were any thread still running, it would have made a new one by now
            assert tasks(t.pid) == listed
            most = max(most, len(f.tids))
        assert wait_for(lambda b=before: created() > b + 10)  # type: ignore[misc]
    assert most > 3  # main, spawner and workers were caught mid-flight


def test_already_traced_is_refused(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    with Frozen(t.pid):
        msg = rf"process {t.pid} is already being traced by pid {os.getpid()}"
        with pytest.raises(FreezeError, match=msg):
            Frozen(t.pid).freeze()
        assert t.tracer() == os.getpid()
    assert t.tracer() == 0


def test_thread_that_cannot_stop_fails_and_is_let_go_later(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = spawn("vforker")
    assert wait_for(lambda: t.state() == "D")  # in vfork(), waiting for its child
    # A vfork parent is refused up front (test_freeze_safety.py); let it through to get a thread
    # that cannot stop, as one in uninterruptible sleep would be.
    monkeypatch.setattr("ckpt.ptrace.freeze._refuse_unsafe", lambda pid: (False, 0))
    with pytest.raises(
        FreezeError, match=rf"thread {t.pid} of process {t.pid} did not stop within 0.3s \(state D"
    ):
        Frozen(t.pid, timeout=0.3).freeze()
    assert orphans() == [t.pid]
    assert t.proc.stdin is not None
    t.proc.stdin.write(b"go\n")  # the child exits; the parent then reaches our pending interrupt-stop
    # (reported to us, its tracer: the report woken by that stop, left for release_orphans)
    assert os.waitid(os.P_PID, t.pid, os.WSTOPPED | os.WNOWAIT) is not None
    assert t.state() == "t"
    assert release_orphans() == [t.pid]
    assert orphans() == []
    assert t.readline() == "done"
    assert t.cmd("ping") == "pong"
    assert t.tracer() == 0


def test_leave_stopped(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    f = Frozen(t.pid)
    f.freeze()
    f.thaw(leave_stopped=True)
    assert t.stopped_state() == "T"  # (reported once every thread is in the group-stop)
    assert all(task_state(t.pid, tid) == "T" for tid in tasks(t.pid))
    assert all(task_field(t.pid, tid, "TracerPid") == "0" for tid in tasks(t.pid))
    os.kill(t.pid, signal.SIGCONT)
    assert t.sum()


def test_stopped_target_stays_stopped(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    os.kill(t.pid, signal.SIGSTOP)
    assert t.stopped_state() == "T"  # (its report kept: WNOWAIT)
    with Frozen(t.pid) as f:
        assert f.was_stopped
        assert f.syscall(NR_GETPID) == t.pid  # resumes a group-stopped thread for one instruction
        assert f.syscall(NR_GETPID, tid=f.tids[-1]) == t.pid
    # Still in the group-stop its parent was told of, never continued, no thread traced: each thread
    # let go goes back into that stop as it runs (the detach re-arms it; nothing more is reported).
    r = os.waitid(os.P_PID, t.pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    assert r is not None and r.si_status == signal.SIGSTOP
    assert os.waitid(os.P_PID, t.pid, os.WCONTINUED | os.WNOHANG | os.WNOWAIT) is None
    assert all(task_field(t.pid, tid, "TracerPid") == "0" for tid in tasks(t.pid))
    os.kill(t.pid, signal.SIGCONT)
    assert t.sum()


def test_zombie_or_missing_target_exits(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    os.kill(t.pid, signal.SIGKILL)
    os.waitid(os.P_PID, t.pid, os.WEXITED | os.WNOWAIT)  # not reaped: /proc/PID still there
    assert t.state() == "Z"
    with pytest.raises(TargetExited, match=f"process {t.pid} exited during the dump"):
        Frozen(t.pid).freeze()
    t.proc.wait()
    with pytest.raises(TargetExited):
        Frozen(t.pid).freeze()


def test_killed_while_frozen(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    f = Frozen(t.pid)
    f.freeze()
    tid = f.tids[1]
    regs_before = f.get_regs(tid)
    os.kill(t.pid, signal.SIGKILL)
    with pytest.raises(TargetExited, match=f"process {t.pid} exited during the dump"):
        f.syscall(NR_GETPID)
    # (its registers as its first stop read them are kept, raw.known_regs: a request is not)
    assert f.get_regs(tid) == regs_before
    with pytest.raises(TargetExited):
        f.get_xsave(tid)
    f.thaw()  # clean, no exception
    f.thaw()
    assert t.proc.wait(timeout=10) == -signal.SIGKILL  # our own wait still gets the status
    assert not os.path.exists(f"/proc/{t.pid}")


@pytest.mark.parametrize("name", ["memtarget", "threadspawner", "sigtarget"])
def test_killed_at_random_moments(spawn: Spawn, name: str) -> None:
    """SIGKILL from outside at any point of freeze, injection or thaw: TargetExited or nothing, never
    another error, nothing left traced, and the parent still gets the real exit status."""
    rnd = random.Random(name)
    for _ in range(8):
        t = spawn(name, *(["64"] if name == "memtarget" else []))
        killer = threading.Timer(rnd.uniform(0, 0.03), os.kill, (t.pid, signal.SIGKILL))
        with sigchld.blocked():  # a thread of ours must not take the SIGCHLDs the freeze waits for
            killer.start()
        try:
            for _ in range(200):
                with Frozen(t.pid) as f:
                    for tid in f.tids[:3]:
                        f.syscall(NR_GETPID, tid=tid)
        except TargetExited:
            pass
        killer.join()
        assert t.proc.wait(timeout=10) == -signal.SIGKILL
        assert traced_by_us() == []


def test_kill_method(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    f = Frozen(t.pid)
    f.freeze()
    f.kill()
    f.thaw()
    assert t.proc.wait(timeout=10) == -signal.SIGKILL


# ----- registers --------------------------------------------------------------------------------------


def test_regs_round_trip(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    settle(t)
    with Frozen(t.pid) as f:
        tid = f.tids[0]
        r = f.get_regs(tid)
        for name in ("r15", "rip", "rsp", "orig_rax", "eflags", "fs_base", "gs_base", "cs", "ss", "gs"):
            assert name in r
        assert all(0 <= v < 2**64 for v in r.values())
        assert r["orig_rax"] == 0  # blocked in read()
        assert r["fs_base"] != 0  # TLS
        f.set_regs(tid, dict(r, r12=0x1122334455667788, r13=-1))
        r2 = f.get_regs(tid)
        assert r2["r12"] == 0x1122334455667788 and r2["r13"] == 2**64 - 1
        f.set_regs(tid, {"r12": r["r12"], "r13": r["r13"]})  # a partial dict keeps the rest
        assert f.get_regs(tid) == r
    assert t.sum()


def test_xsave_round_trip(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    with Frozen(t.pid) as f:
        tid = f.tids[0]
        x = f.get_xsave(tid)
        assert len(x) >= 512
        xmm15 = 160 + 15 * 16  # FXSAVE layout: xmm0 at 160, 16 bytes each
        f.set_xsave(tid, x[:xmm15] + b"\xa5" * 16 + x[xmm15 + 16 :])
        assert f.get_xsave(tid)[xmm15 : xmm15 + 16] == b"\xa5" * 16
        f.set_xsave(tid, x)
        assert f.get_xsave(tid) == x
    assert t.sum()


def test_sigmask_matches_proc_and_round_trips(spawn: Spawn) -> None:
    t = spawn("sigtarget")
    settle(t)
    with Frozen(t.pid) as f:
        masks = {tid: f.get_sigmask(tid) for tid in f.tids}
        for tid, m in masks.items():
            assert m == int(task_field(t.pid, tid, "SigBlk"), 16)
        assert masks[t.pid] == (1 << (signal.SIGWINCH - 1)) | (1 << (signal.SIGURG - 1))
        other = next(tid for tid in f.tids if tid != t.pid)
        assert masks[other] == 1 << (signal.SIGPROF - 1)
        f.set_sigmask(t.pid, masks[t.pid] | 1 << (signal.SIGHUP - 1))
        assert int(task_field(t.pid, t.pid, "SigBlk"), 16) == masks[t.pid] | 1 << (signal.SIGHUP - 1)
        f.set_sigmask(t.pid, masks[t.pid])
    assert int(task_field(t.pid, t.pid, "SigBlk"), 16) == masks[t.pid]


# ----- injected syscalls ------------------------------------------------------------------------------


def test_syscall_getpid_in_every_thread(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    with Frozen(t.pid) as f:
        assert f.syscall(NR_GETPID) == t.pid
        for tid in f.tids:
            assert f.syscall(NR_GETPID, tid=tid) == t.pid
        assert f.syscall(NR_MUNMAP, 1, 4096) == -22  # -EINVAL, signed
    assert t.sum()


def test_syscall_mmap_munmap(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    with Frozen(t.pid) as f:
        addr = f.syscall(NR_MMAP, 0, 8192, 3, 0x22, -1, 0)
        assert addr > 0 and addr % 4096 == 0
        # (it may merge with a neighbouring anonymous mapping)
        assert any(v.start <= addr and addr + 8192 <= v.end and v.perms == "rw-p" for v in read_maps(t.pid))
        f.write_mem(addr + 100, b"hello")
        assert f.read_mem(addr + 98, 9) == b"\0\0hello\0\0"
        assert f.syscall(NR_MUNMAP, addr, 8192) == 0
        assert not any(v.start <= addr < v.end for v in read_maps(t.pid))
        # The helper: unmapped again at thaw.
        s = f.mmap_scratch(3 * 4096)
        assert f.scratch_maps == [(s, 3 * 4096)]
        f.write_mem(s, b"x" * 100)
    assert not any(v.start <= s < v.end for v in read_maps(t.pid))
    assert t.sum()


def test_injection_leaves_blocked_threads_blocked_and_code_unchanged(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    before = t.sum()
    code = code_bytes(t.pid)
    settle(t)
    blocked = blocked_tids(t.pid)
    assert len(blocked) == 2  # main in read(0), one in read(pipe)
    with Frozen(t.pid) as f:
        regs_before = {tid: f.get_regs(tid) for tid in blocked}
        xsave_before = {tid: f.get_xsave(tid) for tid in blocked}
        for tid in f.tids:
            for _ in range(3):
                assert f.syscall(NR_GETPID, tid=tid) == t.pid
        assert {tid: f.get_regs(tid) for tid in blocked} == regs_before
        assert {tid: f.get_xsave(tid) for tid in blocked} == xsave_before
    assert code_bytes(t.pid) == code
    assert wait_for(lambda: blocked_tids(t.pid) == blocked)  # both back in read()
    with Frozen(t.pid) as f:  # and exactly as they were: the same read restarted
        assert {tid: f.get_regs(tid) for tid in blocked} == regs_before
    assert t.sum() == before  # the main thread's read(0) still reads commands
    pipe_tid = next(tid for tid in blocked if tid != t.pid)
    # after the second thaw the restarted read() needs a moment to block again: wait for it
    assert wait_for(lambda: task_syscall(t.pid, pipe_tid) == "0" and task_state(t.pid, pipe_tid) == "S")


def test_injection_by_code_patch(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    spin = t.info()["spin"]
    code = code_bytes(t.pid)
    settle(t, 1)
    with Frozen(t.pid, use_vdso=False) as f:
        spinner = next(tid for tid in f.tids if f.get_regs(tid)["orig_rax"] == 2**64 - 1)
        r = f.get_regs(spinner)
        assert f.syscall(NR_GETPID, tid=spinner) == t.pid  # patched at rip, and put back
        assert f.get_regs(spinner) == r
        assert f.syscall(NR_GETPID) == t.pid  # main thread: the syscall it sits after, no patch
        assert code_bytes(t.pid) == code
        counter = int.from_bytes(f.read_mem(spin, 8), "little")
    assert code_bytes(t.pid) == code
    assert wait_for(lambda: int.from_bytes(t.read_mem(spin, 8), "little") != counter)  # spinner runs on
    assert t.sum()


def test_injected_syscall_that_blocks_times_out_and_is_undone(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    settle(t)
    with Frozen(t.pid, timeout=0.3) as f:
        r = f.get_regs(t.pid)
        with pytest.raises(InjectionError, match=r"did not return within 0\.3s"):
            f.syscall(NR_PAUSE)  # blocks until a signal: we interrupt it and put the registers back
        assert f.get_regs(t.pid) == r
        assert f.syscall(NR_GETPID) == t.pid
    assert t.sum()


def test_scratch_is_below_red_zone_and_restored(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    settle(t)
    with Frozen(t.pid) as f:
        rsp = f.get_regs(t.pid)["rsp"]
        a = f.scratch(256)
        assert a + 256 <= rsp - 128 and a % 64 == 0
        old = f.read_mem(a, 256)
        f.write_mem(a, b"\xee" * 256)
        assert f.scratch(256) == a
        with f.scratch_region(64) as b:
            assert a <= b and b + 64 <= rsp - 128
            f.write_mem(b, b"\x11" * 64)
        assert f.read_mem(a, 256) == b"\xee" * 256  # the region put back what was there
    assert t.read_mem(a, 256) == old  # and thaw put back the original
    assert t.sum()


def test_sigactions(spawn: Spawn) -> None:
    t = spawn("sigtarget")
    words = t.cmd("info").split()
    usr1, rt = int(words[1], 16), int(words[3], 16)
    with Frozen(t.pid) as f:
        acts = {a.sig: a for a in f.sigactions()}
    assert signal.SIGKILL not in acts and signal.SIGSTOP not in acts
    assert set(acts) >= set(range(1, 65)) - {9, 19, 32, 33}
    a = acts[signal.SIGUSR1]
    assert a.handler == usr1
    assert a.flags & SA_SIGINFO and a.restorer != 0
    assert a.mask == 1 << (signal.SIGUSR2 - 1)
    assert acts[SIGRTMIN].handler == rt
    assert acts[signal.SIGUSR2].handler == 1  # SIG_IGN
    assert acts[signal.SIGTERM].handler == 0  # SIG_DFL
    assert t.cmd("count").startswith("usr1 0 ")


# ----- signals that arrive while frozen ---------------------------------------------------------------


def test_signals_taken_during_injection_are_delivered_after_thaw(spawn: Spawn) -> None:
    t = spawn("sigtarget")
    os.kill(t.pid, signal.SIGSTOP)
    assert wait_for(lambda: t.state() == "T")
    # Pending while stopped; the first injected step makes the kernel hand them to us.
    os.kill(t.pid, signal.SIGUSR1)
    sigqueue(t.pid, SIGRTMIN, 7)
    sigqueue(t.pid, SIGRTMIN, 11)
    with Frozen(t.pid) as f:
        assert f.syscall(NR_GETPID) == t.pid
        held = [s for sigs in f.held_signals.values() for s in sigs]
        assert sorted(held) == [signal.SIGUSR1, SIGRTMIN, SIGRTMIN]
    assert wait_for(lambda: t.state() == "T")
    assert t.tracer() == 0
    os.kill(t.pid, signal.SIGCONT)
    words = t.cmd("count").split()
    assert words[1] == "1"  # SIGUSR1 once
    assert int(words[5]) in (os.getpid(), 0)  # a kill()-sent signal: the sender is us either way
    assert words[7:] == ["2", "sum", "18"]  # both queued values arrived, with their si_value


def test_no_signal_lost_under_repeated_freezes(spawn: Spawn) -> None:
    t = spawn("sigtarget")
    n = 400
    stop = threading.Event()

    def sender() -> None:
        for i in range(n):
            sigqueue(t.pid, SIGRTMIN, i)
            if i % 3 == 0:
                time.sleep(0.0002)
        stop.set()

    th = threading.Thread(target=sender)
    with sigchld.blocked():
        th.start()
    held_total = 0
    while not stop.is_set():
        with Frozen(t.pid) as f:
            f.syscall(NR_GETPID)
            held_total += sum(len(v) for v in f.held_signals.values())
    th.join()
    print(f"signals held and given back: {held_total}")
    assert wait_for(lambda: t.cmd("count").split()[7] == str(n))
    assert t.cmd("count").split()[9] == str(n * (n - 1) // 2)


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
def test_no_signal_lost_under_repeated_settled_freezes(spawn: Spawn, stopped: bool) -> None:
    """A dump's freeze: a single-stepped call in every thread (each ends in a stop for the step's own
    SIGTRAP), settle() (release_scratch), then registers, mask and held signals read from every
    thread (the lazy waits), and the thaw; queued signals sent all the while, to a running or a
    stopped target. None is lost or doubled (count and sum of the values), a stopped target is
    left stopped, and the process answers."""
    t = spawn("sigtarget")
    if stopped:
        os.kill(t.pid, signal.SIGSTOP)
        assert wait_for(lambda: t.state() == "T")
    n = 300
    done = threading.Event()

    def sender() -> None:
        for i in range(n):
            sigqueue(t.pid, SIGRTMIN, i)
        done.set()

    th = threading.Thread(target=sender)
    with sigchld.blocked():
        th.start()
    freezes = 0
    while not done.is_set() or freezes < 20:
        with Frozen(t.pid) as f:
            for tid in f.tids:
                assert f.syscall(NR_GETPID, tid=tid, quick=True) == t.pid
            f.release_scratch()
            for tid in f.tids:
                f.get_regs(tid)
                f.get_sigmask(tid)
            assert all(s != signal.SIGTRAP for v in f.held_signals.values() for s in v)
        freezes += 1
    th.join()
    if stopped:
        assert t.stopped_state() == "T" and t.tracer() == 0
        os.kill(t.pid, signal.SIGCONT)
    assert wait_for(lambda: t.cmd("count").split()[7] == str(n))
    assert t.cmd("count").split()[9] == str(n * (n - 1) // 2)


# ----- deferred signals -------------------------------------------------------------------------------


def test_deferred_signals_reraise_after_block() -> None:
    seen: list[str] = []
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        signal.raise_signal(signal.SIGINT)  # (its Python handler has run when this returns)
        with deferred_signals():  # nested: only the outer block re-raises
            pass
        seen.append("after kill")
    assert seen == ["after kill"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    got: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda s, fr: got.append(s))
    try:
        with deferred_signals():
            signal.raise_signal(signal.SIGTERM)
            assert got == []
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_ctrl_c_inside_frozen_block_thaws(spawn: Spawn) -> None:
    t = spawn("memtarget", "64")
    with pytest.raises(KeyboardInterrupt), deferred_signals(), Frozen(t.pid) as f:
        os.kill(os.getpid(), signal.SIGINT)
        assert f.syscall(NR_GETPID) == t.pid  # still runs: the interrupt waits for the block's end
    assert t.tracer() == 0
    assert t.sum()
