"""ckpt restore and ckpt merge: processes rebuilt from layers, run on, dumped again; refusals.

A restored process gets the stdin/stdout of `ckpt restore` (pipes here), so the tests run
`python -m ckpt restore LAYER` as a user would and talk to the restored process through its pipes.
Every process a test starts, restored ones included, is killed at teardown.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckpt.errors import RestoreError, Unsupported
from ckpt.image import STATE_DATA, Layer, open_layer
from ckpt.ptrace import Frozen
from ckpt.restore import make_plan
from ckpt.restore.helper import CODE_OFFSET
from ckpt.restore.task import resume_regs
from ckpt.stubelf import ARGS_OFF as _ARGS_OFF
from ckpt.stubelf import stub_code
from tests.util import ROOT, TARGETS, LineChannel, Target, build_c, run_ckpt, subreaper_on, subreaper_restore

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
ROUNDS_EXE = str(build_c("rounds"))


def _exe(pid: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _tracer(pid: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("TracerPid:"):
                return int(ln.split()[1])
    return -1


class Restored:
    """`ckpt restore LAYER [ARGS]` as a subprocess whose stdin/stdout the restored process shares."""

    def __init__(
        self, layer: Path, *args: str, timeout: float = 60.0, stdin: int | None = subprocess.PIPE
    ) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt", "restore", str(layer), *args],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT, bufsize=0,
        )  # fmt: skip
        self.chan = LineChannel(self.proc, timeout, lambda: f"; ckpt stderr: {self.stderr_now()}")
        self._pid: int | None = None

    def readline(self) -> str:
        return self.chan.readline()

    def send(self, line: str) -> None:
        self.chan.send(line)

    def cmd(self, line: str) -> str:
        return self.chan.cmd(line)

    def stderr_now(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1)
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(running)"
        return self.proc.stderr.read().decode(errors="replace")

    @property
    def pid(self) -> int:
        """The restored rounds process: the child of `ckpt restore`, or the pid --detach printed."""
        if self._pid is None:
            deadline = time.monotonic() + self.timeout
            while self._pid is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                    # The stub (python until it execs, then a zombie) and the helper are children too,
                    # for a moment; the restored process is the untraced one running the dumped exe.
                    done = [k for k in kids if _exe(k) == ROUNDS_EXE and _tracer(k) == 0]
                    if done:
                        self._pid = int(done[0])
                time.sleep(0.01)
            assert self._pid is not None, "no restored process appeared"
        return self._pid

    def set_pid(self, pid: int) -> None:
        self._pid = pid

    def wait(self) -> int:
        return self.proc.wait(self.timeout)

    def close(self) -> None:
        """Kill the restored process (and any helper still there), reap it, then `ckpt restore`."""
        pids = {self._pid} if self._pid is not None else set()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                pids |= {
                    int(k)
                    for k in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                }
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            self.proc.wait(10)  # it reaps its child and exits with 128 + 9
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        for pid in pids:  # orphans of a --detach restore came to us (the fixture is a subreaper)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphans of the processes a test starts become the test's to reap (PID 1 may not reap them)."""
    was_subreaper = subreaper_on()
    try:
        yield
    finally:
        subreaper_restore(was_subreaper)


@pytest.fixture
def restored() -> Iterator[Callable[..., Restored]]:
    """Start `ckpt restore`s; at teardown every restored process is killed and reaped. The test
    process is a subreaper meanwhile, so the processes a --detach restore leaves behind are ours to
    reap rather than zombies of init."""
    started: list[Restored] = []
    was_subreaper = subreaper_on()

    def _restore(layer: Path, *args: str, **kw: object) -> Restored:
        r = Restored(layer, *args, **kw)  # type: ignore[arg-type]
        started.append(r)
        return r

    try:
        yield _restore
    finally:
        for r in started:
            r.close()
        subreaper_restore(was_subreaper)


def dump(pid: int, d: Path, *extra: str) -> dict[str, object]:
    r = run_ckpt("dump", "--pid", str(pid), "-D", str(d), "--json", *extra, check=True)
    out: dict[str, object] = json.loads(r.stdout)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_in_syscall(pid: int, nrs: tuple[int, ...], timeout: float = 10.0) -> None:
    """Until the process is blocked in one of the syscalls `nrs` (/proc/PID/syscall)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(Path(f"/proc/{pid}/syscall").read_text().split()[0]) in nrs:
                return
        time.sleep(0.01)
    info = {
        f: (Path(f"/proc/{pid}/{f}").read_text() if Path(f"/proc/{pid}/{f}").exists() else "?")
        for f in ("syscall", "stat", "wchan")
    }
    raise TimeoutError(f"process {pid} did not block in syscall {nrs}: {info}")


def rounds(spawn: Callable[..., Target], *args: str) -> Target:
    """tests/targets/rounds.c with stderr on /dev/null: pytest's capture file is a deleted file,
    which restore rightly refuses to reopen."""
    return spawn("rounds", *args, stderr=subprocess.DEVNULL)


def killed(t: Target) -> None:
    """Reap a target that `ckpt dump --kill` ended."""
    assert t.proc.wait(30) == -signal.SIGKILL
    t.close()


# -- the C target: rounds continue after a restore ------------------------------------------------
def test_restore_continues_rounds(tmp_path: Path, spawn: Callable[..., Target], datafile: Path,
                                  restored: Callable[..., Restored]) -> None:  # fmt: skip
    log = tmp_path / "log.txt"
    t = rounds(spawn, "256", str(datafile), str(log))
    ref = rounds(spawn, "256", str(datafile), str(tmp_path / "ref.log"))
    for _ in range(3):
        assert t.cmd("round") == ref.cmd("round")
    assert t.cmd("log before") == "ok"
    assert t.cmd("fread 1000") == ref.cmd("fread 1000")
    before = t.sum()
    pid = t.pid
    dump(pid, tmp_path / "d", "--kill")
    killed(t)

    r = restored(tmp_path / "d" / "layer-0001.ckpt")
    assert r.cmd("sum") == f"sum {before}"
    info = r.cmd("info").split()
    assert int(info[1]) == pid  # the pid was free again: kept
    assert r.pid == pid
    assert Path(f"/proc/{pid}/comm").read_text() == Path(f"/proc/{ref.pid}/comm").read_text()
    assert os.readlink(f"/proc/{pid}/exe") == os.readlink(f"/proc/{ref.pid}/exe")
    for _ in range(4):
        assert r.cmd("round") == ref.cmd("round")
    assert r.cmd("fread 1000") == ref.cmd("fread 1000")  # the fd's offset came back
    assert r.cmd("log after") == "ok"  # O_APPEND, reopened at its number
    assert log.read_text() == "before\nafter\n"
    assert r.cmd("grow 200000").startswith("brk ")  # the heap (brk) goes on where it was
    assert ref.cmd("grow 200000").startswith("brk ")
    assert r.cmd("sum") == ref.cmd("sum")
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "[heap]" in maps and "[stack]" in maps and "[vdso]" in maps and str(datafile) in maps
    r.send("exit 7")
    assert r.wait() == 7  # ckpt restore exits with the process's status


def test_restore_detach_json(
    tmp_path: Path, spawn: Callable[..., Target], restored: Callable[..., Restored]
) -> None:
    t = rounds(spawn, "64")
    t.cmd("round")
    before = t.sum()
    dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    r = restored(tmp_path / "d" / "layer-0001.ckpt", "--detach", "--json")
    out = json.loads(r.readline())
    r.set_pid(out["pid"])
    assert r.wait() == 0  # ckpt returned once the process ran
    assert r.cmd("sum") == f"sum {before}"  # the process lives on, on the same pipes
    assert out["pid_kept"] is True


def test_restored_state_matches_dump(tmp_path: Path, spawn: Callable[..., Target], datafile: Path,
                                     restored: Callable[..., Restored]) -> None:  # fmt: skip
    """Dump, restore, dump the restored process where it waits again: the two images agree on
    registers (general, FPU/vector, fs_base), signal mask and actions, mm fields, fds, memory."""
    t = rounds(spawn, "128", str(datafile), str(tmp_path / "log"))
    t.cmd("round")
    t.cmd("fread 777")
    dump(t.pid, tmp_path / "a", "--kill")
    killed(t)
    r = restored(tmp_path / "a" / "layer-0001.ckpt")
    wait_in_syscall(r.pid, (0,))  # back in read(0), restarted by the kernel's rules
    dump(r.pid, tmp_path / "b", "--track", "none")
    with (
        open_layer(tmp_path / "a" / "layer-0001.ckpt") as a,
        open_layer(tmp_path / "b" / "layer-0001.ckpt") as b,
    ):
        ta, tb = a.top.threads[0], b.top.threads[0]
        assert ta.regs == tb.regs
        assert ta.sigmask == tb.sigmask and ta.xsave == tb.xsave
        assert a.top.sigactions == b.top.sigactions
        ma, mb = a.top.mm, b.top.mm
        assert (ma.start_brk, ma.brk, ma.start_stack, ma.arg_start, ma.env_end, ma.auxv, ma.exe, ma.cwd) == (
            mb.start_brk, mb.brk, mb.start_stack, mb.arg_start, mb.env_end, mb.auxv, mb.exe, mb.cwd,
        )  # fmt: skip

        def fds(v: Any) -> list[tuple[int, str, int, int]]:
            return [(f.fd, f.kind, f.flags, f.pos) for f in v.top.fds if f.kind in ("file", "chr")]

        assert fds(a) == fds(b)
        assert a.top.task == b.top.task  # credentials, limits, umask, personality; no children
        # The rseq area is the kernel's to write: it holds the CPU the thread last ran on, which
        # differs between the two runs now that the restored process's rseq is registered again.
        rseq = ta.rseq

        def mem(view: Any, v: Any) -> bytes:
            m = bytearray(view.read(v.start, v.end - v.start))
            if rseq is not None and v.start <= rseq[0] < v.end:
                m[rseq[0] - v.start : rseq[0] - v.start + rseq[1]] = bytes(rseq[1])
            return bytes(m)

        for v in a.vmas:
            if v.dumped and v.anonymous and v.path != "[vdso]":
                assert mem(a, v) == mem(b, v), v


# -- blocking syscalls resume ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "syscalls", "signal_after", "answer"),
    [
        ("sleep 1500", (35, 230), None, "slept"),  # nanosleep / clock_nanosleep: -ERESTART_RESTARTBLOCK
        ("sigwait", (128,), signal.SIGUSR1, "sig 10"),  # rt_sigtimedwait; SIGUSR1 must still be blocked
        ("pause", (34,), signal.SIGUSR2, "paused 1"),  # -ERESTARTNOHAND; the SIGUSR2 handler must be back
    ],
)
def test_blocking_syscall_resumes(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],
    command: str,
    syscalls: tuple[int, ...],
    signal_after: int | None,
    answer: str,
) -> None:
    # A sleep can end before `ckpt dump` (a new python process) freezes it on a loaded machine; the
    # layer then shows the process back in read(). Such a try proves nothing: a longer sleep is tried.
    for attempt, ms in enumerate((1500, 5000, 15000, 45000)):
        t = rounds(spawn, "64")
        t.cmd("round")
        before = t.sum()
        assert t.proc.stdin is not None
        t.proc.stdin.write(command.replace("1500", str(ms)).encode() + b"\n")
        wait_in_syscall(t.pid, syscalls)
        d = tmp_path / f"d{attempt}"
        dump(t.pid, d, "--kill")
        killed(t)
        regs = Layer.open(d / "layer-0001.ckpt").threads[0].regs
        if regs["orig_rax"] in syscalls:
            break
    else:
        pytest.fail(f"no dump caught the process inside {command!r}")
    r = restored(d / "layer-0001.ckpt")
    if signal_after is not None:
        wait_in_syscall(r.pid, syscalls)
        os.kill(r.pid, signal_after)
    assert r.readline() == answer
    assert r.cmd("sum") == f"sum {before}"


# -- chains and merged layers ---------------------------------------------------------------------
def _chain(tmp_path: Path, spawn: Callable[..., Target], datafile: Path) -> tuple[Path, str, Target]:
    """A full dump and 3 incrementals with rounds between; the target is killed by the last."""
    d = tmp_path / "chain"
    t = rounds(spawn, "512", str(datafile))
    ref = rounds(spawn, "512", str(datafile))
    dump(t.pid, d)
    for i in range(3):
        assert t.cmd("round") == ref.cmd("round")
        assert t.cmd("grow 40000").startswith("brk")
        ref.cmd("grow 40000")
        before = t.sum()
        dump(t.pid, d, "--incremental", *(["--kill"] if i == 2 else []))
    killed(t)
    return d / "layer-0004.ckpt", before, ref


def test_merge_reads_the_same(tmp_path: Path, spawn: Callable[..., Target], datafile: Path) -> None:
    layer, _, _ = _chain(tmp_path, spawn, datafile)
    out = tmp_path / "merged.ckpt"
    run_ckpt("merge", str(layer), "-o", str(out), check=True)
    assert Layer.open(out).inventory.parent is None
    assert out.stat().st_mode & 0o777 == 0o600  # a layer holds a process's memory
    with open_layer(layer) as a, open_layer(out) as b:
        assert len(a.layers) == 4 and len(b.layers) == 1
        ta, tb = a.page_table(), b.page_table()
        assert np.array_equal(ta.addr, tb.addr) and np.array_equal(ta.state, tb.state)
        assert np.array_equal(ta.digest, tb.digest)
        for v in a.vmas:
            if v.dumped and v.anonymous:
                assert a.read(v.start, v.end - v.start) == b.read(v.start, v.end - v.start)
    r1 = run_ckpt("read", str(layer), "--addr", hex(a.vmas[0].start), "--size", "4096", check=True)
    r2 = run_ckpt("read", str(out), "--addr", hex(a.vmas[0].start), "--size", "4096", check=True)
    assert r1.stdout == r2.stdout
    pytest.importorskip("ckpt.diff", reason="ckpt diff is not there yet")
    first = layer.parent / "layer-0001.ckpt"
    d1 = run_ckpt("diff", str(first), str(layer), "--json", check=True)
    d2 = run_ckpt("diff", str(first), str(out), "--json", check=True)
    assert json.loads(d1.stdout)["changed_ranges"] == json.loads(d2.stdout)["changed_ranges"]
    same = run_ckpt("diff", str(layer), str(out), "--json", check=True)
    assert json.loads(same.stdout)["changed_ranges"] == []


def test_restore_chain_equals_merged(tmp_path: Path, spawn: Callable[..., Target], datafile: Path,
                                     restored: Callable[..., Restored]) -> None:  # fmt: skip
    layer, before, ref = _chain(tmp_path, spawn, datafile)
    merged = tmp_path / "merged.ckpt"
    run_ckpt("merge", str(layer), "-o", str(merged), check=True)
    expect = [f"sum {before}", ref.cmd("round"), ref.cmd("round"), ref.cmd("sum")]
    for source in (layer, merged):
        r = restored(source)
        assert [r.cmd("sum"), r.cmd("round"), r.cmd("round"), r.cmd("sum")] == expect, source
        r.send("exit 0")
        assert r.wait() == 0


# -- a real program -------------------------------------------------------------------------------
def test_python_program_finishes_after_restore(tmp_path: Path, restored: Callable[..., Restored]) -> None:
    # compute.py ... stop: mid-computation however long the dumps take (a fixed 400 steps, 10 ms
    # apart, gave a loaded machine ~4 s for both dumps).
    script = TARGETS / "compute.py"
    ref_out, out = tmp_path / "ref.txt", tmp_path / "out.txt"
    p = subprocess.Popen([sys.executable, str(script), str(out), "stop"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert p.stdout is not None
        lines = [p.stdout.readline()]
        while lines[-1] != "step 50\n":  # mid-way, for sure
            lines.append(p.stdout.readline())
        dump(p.pid, tmp_path / "d")
        while lines[-1] != "step 150\n":
            lines.append(p.stdout.readline())
        dump(p.pid, tmp_path / "d", "--incremental", "--kill")
        assert p.wait(30) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()
        assert p.stdin is not None
        p.stdin.close()
    assert not out.exists()
    r = restored(tmp_path / "d" / "layer-0002.ckpt", timeout=120)
    rest = [r.readline()]  # the copy stops once it has shown a step of its own
    r.send("stop")
    while not rest[-1].startswith("done "):
        rest.append(r.readline())
    assert rest[0].startswith("step ") and int(rest[0].split()[1]) >= 150, rest[:3]
    assert r.wait() == 0
    steps = rest[-1].split()[1]
    subprocess.run(
        [sys.executable, str(script), str(ref_out), steps], check=True, stdout=subprocess.DEVNULL, timeout=120
    )
    assert out.read_text() == ref_out.read_text(), f"the copy's result of {steps} steps differs"


# -- pid -------------------------------------------------------------------------------------------
def test_restore_while_original_runs(
    tmp_path: Path, spawn: Callable[..., Target], restored: Callable[..., Restored]
) -> None:
    t = rounds(spawn, "128")
    t.cmd("round")
    before = t.sum()
    dump(t.pid, tmp_path / "d")
    r = restored(tmp_path / "d" / "layer-0001.ckpt")
    assert r.cmd("sum") == f"sum {before}"
    new = int(r.cmd("info").split()[1])
    assert new != t.pid and new == r.pid and alive(t.pid)
    assert r.cmd("round") == t.cmd("round")  # two processes from here on, the same future
    r.send("exit 3")
    assert r.wait() == 3
    err = r.stderr_now()
    assert f"restored as pid {new}" in err and "in use" in err


def test_restored_process_dumps_again(tmp_path: Path, spawn: Callable[..., Target], datafile: Path,
                                      restored: Callable[..., Restored]) -> None:  # fmt: skip
    t = rounds(spawn, "256", str(datafile))
    ref = rounds(spawn, "256", str(datafile))
    assert t.cmd("round") == ref.cmd("round")
    dump(t.pid, tmp_path / "a", "--kill")
    killed(t)
    r1 = restored(tmp_path / "a" / "layer-0001.ckpt", "--detach", "--json")
    pid = json.loads(r1.readline())["pid"]
    r1.set_pid(pid)
    assert r1.wait() == 0
    assert r1.cmd("round") == ref.cmd("round")
    full = dump(pid, tmp_path / "b")
    assert r1.cmd("round") == ref.cmd("round")
    inc = dump(pid, tmp_path / "b", "--incremental", "--kill")
    assert inc["incremental"] is True and full["pages_dumped"] > inc["pages_dumped"]  # type: ignore[operator]
    r2 = restored(tmp_path / "b" / "layer-0002.ckpt")
    assert r2.cmd("sum") == ref.cmd("sum")
    assert r2.cmd("round") == ref.cmd("round")


def test_changed_file_mapping(tmp_path: Path, spawn: Callable[..., Target], datafile: Path,
                              restored: Callable[..., Restored]) -> None:  # fmt: skip
    """A private file mapping whose file changed after the dump: filled from the image when it holds
    every page of the mapping, refused when it does not."""
    full, part = tmp_path / "full", tmp_path / "part"
    t = rounds(spawn, "32", str(datafile))
    before = t.sum()  # reads every page of the mapping: all of them are in the image
    dump(t.pid, full, "--kill")
    killed(t)
    t = rounds(spawn, "32", str(datafile))  # untouched pages of the mapping are not in this image
    dump(t.pid, part, "--kill")
    killed(t)
    with open(datafile, "r+b") as f:  # same inode, new bytes and mtime
        f.write(b"changed")
    r = restored(full / "layer-0001.ckpt")
    assert r.cmd("sum") == f"sum {before}"
    assert str(datafile) not in Path(f"/proc/{r.pid}/maps").read_text()  # anonymous copy now
    bad = run_ckpt("restore", str(part / "layer-0001.ckpt"))
    assert bad.returncode == 1 and "changed since the dump" in bad.stderr and "missing" in bad.stderr, (
        bad.stderr
    )


# -- the task: credentials, limits, umask, personality, pending signals, children ----------------
ADDR_NO_RANDOMIZE = 0x0040000
NR_MPROTECT = 10


def _as_nobody() -> None:
    """preexec_fn: an ordinary user with a changed umask, limits, groups and personality. More
    groups (16 KiB of gid_t) than the restore's scratch area holds."""
    os.umask(0o027)
    resource.setrlimit(resource.RLIMIT_NOFILE, (123, 4000))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 1 << 20))
    _libc.personality(ADDR_NO_RANDOMIZE)
    os.setgroups([100, 65533, *range(20000, 24000)])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


def _status(pid: int) -> dict[str, str]:
    keys = ("Uid", "Gid", "Groups", "Umask", "CapInh", "CapPrm", "CapEff", "CapAmb", "NoNewPrivs")
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines) if k in keys}


def test_ordinary_user_is_not_restored_as_root(tmp_path: Path, spawn: Callable[..., Target],
                                                 restored: Callable[..., Restored]) -> None:  # fmt: skip
    """A process of uid/gid 65534 with its own groups, umask, limits and personality comes back with
    all of them, from its layer and from a merge of it, though `ckpt restore` runs as root."""
    t = spawn("rounds", "64", stderr=subprocess.DEVNULL, preexec_fn=_as_nobody)
    t.cmd("round")
    before = t.sum()
    want = _status(t.pid)
    assert want["Uid"] == "65534\t65534\t65534\t65534" and want["Umask"] == "0027", want
    assert len(want["Groups"].split()) == 4002
    limits = Path(f"/proc/{t.pid}/limits").read_text()
    assert "Max open files            123                  4000" in limits
    personality = Path(f"/proc/{t.pid}/personality").read_text()
    dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    layer = tmp_path / "d" / "layer-0001.ckpt"
    merged = tmp_path / "merged.ckpt"
    run_ckpt("merge", str(layer), "-o", str(merged), check=True)
    for source in (layer, merged):
        r = restored(source)
        assert r.cmd("sum") == f"sum {before}"
        assert _status(r.pid) == want, source
        assert Path(f"/proc/{r.pid}/limits").read_text() == limits
        assert Path(f"/proc/{r.pid}/personality").read_text() == personality
        # Dumpable again after the change of credentials: /proc/PID is the process's user's, not root's.
        st = os.stat(f"/proc/{r.pid}/status")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert r.cmd("round") == "round 2 sum " + r.cmd("sum").split()[1]
        r.send("exit 0")
        assert r.wait() == 0


def test_signal_held_at_dump_survives_kill(tmp_path: Path, spawn: Callable[..., Target],
                                            restored: Callable[..., Restored]) -> None:  # fmt: skip
    """A signal that arrives while the process is stopped is taken off it by the dump's injected
    syscalls. The layer keeps it as pending, so `--kill` does not lose it: the restored process
    handles it as it resumes."""
    t = rounds(spawn, "64")
    t.cmd("round")
    before = t.sum()
    os.kill(t.pid, signal.SIGSTOP)
    assert t.stopped_state() == "T"
    os.kill(t.pid, signal.SIGUSR2)  # pending: the process is stopped
    dump(t.pid, tmp_path / "d", "--kill")
    pid = t.pid
    killed(t)
    layer = tmp_path / "d" / "layer-0001.ckpt"
    assert [(p.tid, p.sig) for p in Layer.open(layer).task.pending] == [(pid, signal.SIGUSR2)]
    r = restored(layer)
    # It comes back stopped, as it was dumped (ckpt/restore/jobstop.py); the restore says so, and
    # that its SIGUSR2, numbered below SIGSTOP, is taken before the stop.
    assert r.proc.stderr is not None
    err = [r.proc.stderr.readline().decode()]
    while "left stopped" not in err[-1] and err[-1]:
        err.append(r.proc.stderr.readline().decode())
    assert any("takes its pending SIGUSR2 before it stops again" in e for e in err), err
    assert f"left stopped (SIGSTOP), as it was dumped: kill -CONT {pid} continues it" in err[-1], err
    r.set_pid(pid)
    os.kill(pid, signal.SIGCONT)
    assert r.cmd("sum") == f"sum {before}"
    r.send("pause")
    wait_in_syscall(r.pid, (34,))
    os.kill(r.pid, signal.SIGUSR2)
    assert r.readline() == "paused 2"  # the SIGUSR2 of before the dump, then this one


def test_prot_none_page_is_restored(tmp_path: Path, spawn: Callable[..., Target],
                                     restored: Callable[..., Restored]) -> None:  # fmt: skip
    """A page the process wrote and then made PROT_NONE comes back with its bytes, still PROT_NONE;
    made readable again, the process's own checksum over it is the one from before the dump."""
    t = rounds(spawn, "64")
    t.cmd("round")
    before = t.sum()
    region = int(t.cmd("info").split()[3], 16)
    want = t.read_mem(region, 4096)
    with Frozen(t.pid) as f:  # the process itself would call mprotect(region, 4096, PROT_NONE)
        assert f.syscall(NR_MPROTECT, region, 4096, 0) == 0
    dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    layer = tmp_path / "d" / "layer-0001.ckpt"
    assert region in {int(a) for a in Layer.open(layer).pages.data}
    r = restored(layer)
    pid = r.pid
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    assert any(ln.startswith(f"{region:x}-{region + 4096:x} ---p ") for ln in maps), maps
    assert r.cmd("info").split()[3] == f"{region:#x}"  # it runs, and does not touch the page
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, region) == want
    finally:
        os.close(fd)
    with Frozen(pid) as f:
        assert f.syscall(NR_MPROTECT, region, 4096, 3) == 0  # PROT_READ | PROT_WRITE
    assert r.cmd("sum") == f"sum {before}"


def test_refuses_a_process_with_children(tmp_path: Path, subreaper: None) -> None:
    # sh forks the child, then becomes rounds: rounds has a child it did not start itself.
    t = Target(["sh", "-c", 'sleep 1000 & exec "$0" 16', ROUNDS_EXE], stderr=subprocess.DEVNULL)
    kids = [int(k) for k in Path(f"/proc/{t.pid}/task/{t.pid}/children").read_text().split()]
    assert len(kids) == 1
    try:
        # --kill would leave the child orphaned and the layer cannot be restored: refused, even
        # with --force; nothing written, the process and its child run on.
        for extra in (["--kill"], ["--kill", "--force"]):
            r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--no-tree", *extra)
            assert r.returncode == 1, r
            assert r.stderr.startswith(f"ckpt: not killing pid {t.pid}: it has 1 child"), r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
            assert alive(t.pid) and alive(kids[0])
            assert not list((tmp_path / "d").glob("layer-*"))
        # Without --kill the dump says the layer is not restorable, and why.
        out = dump(t.pid, tmp_path / "d", "--no-tree")
        assert out["restorable"] is False
        assert out["not_restorable"] == [f"unsupported: a child process (pid {kids[0]})"]
        d = str(tmp_path / "d")
        text = run_ckpt("dump", "--pid", str(t.pid), "-D", d, "--no-tree", check=True).stdout
        assert f"restorable: no\n    - unsupported: a child process (pid {kids[0]})" in text, text
        assert alive(t.pid) and alive(kids[0])
        os.kill(t.pid, signal.SIGKILL)
        t.proc.wait(30)
        r = run_ckpt("restore", str(tmp_path / "d" / "layer-0001.ckpt"))
        msg = r.stderr.strip()
        assert r.returncode == 1 and len(msg.splitlines()) == 1, r.stderr
        assert msg == f"ckpt: cannot restore pid {t.pid}: unsupported: a child process (pid {kids[0]})", msg
        _no_restore_left(t.pid)
    finally:
        for k in kids:
            os.kill(k, signal.SIGKILL)
        t.close()
        for k in kids:
            os.waitpid(k, 0)  # rounds's until it died; ours (the subreaper's) since


# -- refusals ------------------------------------------------------------------------------------
def _no_restore_left(pid: int) -> None:
    """Neither the dumped pid nor any restore helper is alive: nothing was half-restored."""
    assert not alive(pid)
    assert not [
        p for p in os.listdir("/proc") if p.isdigit() and "ckpt-restore-helper" in _exe(p) and _ours(p)
    ]


def _ours(pid: str) -> bool:
    """A process started from this worktree (run_ckpt's cwd) by this test process (its process
    group, which every ckpt it starts and their helpers inherit: under xdist each worker leads one,
    tests/conftest.py): other worktrees' test runs and the other worker have restore helpers of
    their own."""
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(ROOT) and os.getpgid(int(pid)) == os.getpgrp()
    except OSError:
        return False


def test_refuses_corrupt_chain(tmp_path: Path, spawn: Callable[..., Target], datafile: Path) -> None:
    layer, _, _ = _chain(tmp_path, spawn, datafile)
    pid = Layer.open(layer).inventory.pid
    # Damage a chunk of the middle of the chain that the restore needs.
    with open_layer(layer) as v:
        pt = v.page_table()
        k = 2
        mid = v.layers[k]
        idx = pt.index[(pt.layer == k) & (pt.state == STATE_DATA)]
        chunk = mid.pages.chunks[int(mid.chunk_of(idx[len(idx) // 2]))]
        path = mid.path
    data = bytearray(path.read_bytes())
    data[chunk.offset + chunk.clen // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1 and "corrupt" in r.stderr and str(path.name) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    _no_restore_left(pid)
    # A missing parent: refused when the chain is opened.
    (layer.parent / "layer-0002.ckpt").unlink()
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1 and "missing" in r.stderr, r.stderr
    _no_restore_left(pid)


def test_refuses_unsupported_resources(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = rounds(spawn, "64", "", "", "socket,pipe,shm,sysv,thread,tcp")
    r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill")
    # Established TCP connections are refused at the dump without --tcp-established (test_restore_tcp.py)
    assert r.returncode == 1 and "established TCP connections" in r.stderr, r.stderr
    assert alive(t.pid) and not list((tmp_path / "d").glob("layer-*"))
    out = dump(t.pid, tmp_path / "d", "--kill", "--force")  # it can be killed all the same
    killed(t)
    assert out["restorable"] is False and not any("thread" in w for w in out["not_restorable"])
    r = run_ckpt("restore", str(tmp_path / "d" / "layer-0001.ckpt"))
    assert r.returncode == 1, r.stderr
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "unsupported" in msg
    for what in ("a socket",):  # its threads, socketpair, pipe and SysV segment are restored
        assert what in msg, msg
    _no_restore_left(t.pid)


# -- units -----------------------------------------------------------------------------------------
def test_refuses_another_kernel(
    tmp_path: Path, spawn: Callable[..., Target], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = rounds(spawn, "16")
    dump(t.pid, tmp_path / "d")
    real = os.uname()
    fake = os.uname_result((real.sysname, real.nodename, "0.0.0-other", real.version, real.machine))
    monkeypatch.setattr("ckpt.restore.plan.os.uname", lambda: fake)
    with (
        open_layer(tmp_path / "d" / "layer-0001.ckpt") as v,
        pytest.raises(RestoreError, match="same kernel"),
    ):
        make_plan(v)


def test_refuses_task_state_it_cannot_give_back(
    tmp_path: Path, spawn: Callable[..., Target], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = rounds(spawn, "16")
    dump(t.pid, tmp_path / "d")
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    mine = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with open_layer(tmp_path / "d" / "layer-0001.ckpt") as v:
        task = v.top.meta.task

        def refused(error: type[Exception], message: str, **change: Any) -> None:
            v.top.meta.task = dataclasses.replace(task, **change)
            with pytest.raises(error, match=message):
                make_plan(v)

        refused(Unsupported, r"a filesystem uid \(1001\) that is not its", uid=(1000, 1000, 1000, 1001))
        too_many = {**task.rlimits, "nofile": (64, nr_open + 1)}
        msg = rf"open files \({nr_open + 1}\) is above fs.nr_open \({nr_open}\)"
        refused(RestoreError, msg, rlimits=too_many)
        # Raising a hard limit above ckpt's own needs CAP_SYS_RESOURCE.
        monkeypatch.setattr("ckpt.restore.plan._has_cap", lambda cap: False)
        above = {**task.rlimits, "nofile": (64, mine + 1)}
        msg = rf"hard limit on nofile \({mine + 1}\) is above ckpt's \({mine}\), and raising it needs"
        refused(RestoreError, msg, rlimits=above)
        v.top.meta.task = task
        assert make_plan(v).task == task


def test_syscall_restart_rules() -> None:
    regs = {"rax": (-516) & (2**64 - 1), "orig_rax": 230, "rip": 0x1002}
    assert resume_regs(regs) == {"rax": 230, "orig_rax": 2**64 - 1, "rip": 0x1000}
    for code in (512, 513, 514):  # the kernel applies these itself when the helper is detached
        regs = {"rax": (-code) & (2**64 - 1), "orig_rax": 0, "rip": 0x1002}
        assert resume_regs(regs) == regs


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to assemble stub.S")
def test_stub_bytes_match_source(tmp_path: Path) -> None:
    obj, binf = tmp_path / "stub.o", tmp_path / "stub.bin"
    subprocess.run(["gcc", "-c", str(ROOT / "ckpt" / "restore" / "stub.S"), "-o", str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binf)], check=True)
    built = binf.read_bytes()
    ours = stub_code(0, 3)
    assert built[:_ARGS_OFF] == ours[:_ARGS_OFF]  # the code; the data after it is filled in at run time
    assert len(built) == len(ours) and CODE_OFFSET % 64 == 0


def test_refuses_a_digest_that_hides_a_written_file_page(
    tmp_path: Path, spawn: Callable[..., Target], datafile: Path
) -> None:
    """A restore leaves a private file page to the file when the page's digest says it equals the
    file's. Its written bytes are checked by their chunk's checksum (format 2), but that digest is
    what it decides by: a layer whose digest for a written page claims the file's bytes is refused,
    not restored with the file's page instead."""
    import xxhash

    from tests.test_image import meta_dict, reassemble

    t = rounds(spawn, "64", str(datafile))
    pid = t.pid
    d = tmp_path / "d"
    dump(t.pid, d, "--kill")
    killed(t)
    layer = d / "layer-0001.ckpt"
    with Layer.open(layer) as lay:
        vma = next(v for v in lay.vmas if v.dumped and v.path == str(datafile))
        addr = vma.start + 4096  # the page rounds.c wrote (0x5a), the others are the file's
        i = lay.data_index(addr)
        assert i >= 0
    filepage = datafile.read_bytes()[vma.offset + 4096 :][:4096]
    meta = meta_dict(layer)
    dg = np.frombuffer(meta["pages"]["digests"], dtype="<u8").copy()
    dg[i] = xxhash.xxh3_64_intdigest(filepage)
    meta["pages"]["digests"] = dg.tobytes()
    reassemble(layer, meta)
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"page {addr:#x} digest mismatch" in r.stderr, r.stderr
    _no_restore_left(pid)
