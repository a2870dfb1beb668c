"""The runner of ckpt's zdtm-style corpus (tests/zdtm/*.c), shared by tests/test_zdtm.py and
bench/zdtm_table.py.

Each program sets one property (or a small group) up, says "ready", and checks itself when asked
(tests/zdtm/zdtm.h). A run: start it, dump it (`full`: one dump with --kill; `incr`: a full dump,
"touch", an incremental dump with --kill), restore the layer with `ckpt restore` (which gives the
restored process its own stdin/stdout, held by the runner), ask "check", then "exit". Outcomes:

  PASS     restored, and the program found every property as it was
  REFUSED  the dump (--kill refuses an unrestorable process) or the restore refused, with one
           `ckpt: ...` line
  WRONG    restored, but the check failed, or the process crashed or never answered

`none` runs a program with no ckpt at all (touch, check): the program's own check must pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.util import ROOT, LineChannel, build_c

ZDTM = ROOT / "tests" / "zdtm"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="200")
VARIANTS = ("full", "incr")
TIMEOUT = 60.0
CFLAGS = ("-Wno-format-truncation", "-Wno-unused-result")
# Programs run in an IPC namespace of their own, entered by ckpt's dump: their SysV semaphore sets
# die with it, whatever the outcome (a set left in the host's namespace, operated on, would make every
# multi-threaded dump there refused: ckpt/proc/semundo.py), and no other program sees them meanwhile.
# A POSIX message queue too: one left behind by a killed program stays charged to root's
# RLIMIT_MSGQUEUE (800 KiB, ~9 default queues) until unlinked, and later mq_opens fail with EMFILE.
OWN_IPC = frozenset({"semundo00", "mqueue00"})


def programs() -> list[str]:
    return sorted(p.stem for p in ZDTM.glob("*.c"))


def describe(name: str) -> str:
    """The first sentence of the program's leading comment."""
    text = (ZDTM / f"{name}.c").read_text()
    if "/*" not in text:
        return ""
    words = " ".join(ln.strip(" *") for ln in text.split("/*", 1)[1].split("*/", 1)[0].splitlines()).split()
    return " ".join(words).split(". ")[0].rstrip(".")


@dataclasses.dataclass
class Outcome:
    name: str
    variant: str
    verdict: str  # PASS, REFUSED, WRONG, or SETUP (the program itself is broken)
    detail: str = ""


class _Stop(Exception):
    def __init__(self, verdict: str, detail: str) -> None:
        super().__init__(detail)
        self.verdict = verdict
        self.detail = detail


def _ckpt(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "ckpt", *args], capture_output=True, text=True, env=ENV,
        cwd=ROOT, timeout=TIMEOUT * 2,
    )  # fmt: skip


def _refusal(stderr: str) -> str:
    lines = [
        ln
        for ln in stderr.strip().splitlines()
        if ln.startswith("ckpt: ") and "warning" not in ln and "internal error" not in ln
    ]
    return lines[-1] if lines else ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """The original was started as the leader of a process group of its own (its children, if any,
    are in it): kill the group while its leader is unreaped (so the group id is still ours)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(TIMEOUT)


def _children(pid: int) -> list[int]:
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents first (zombies included)."""
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop(0))
        out += kids
        todo += kids
    return out


def _end(pids: list[int]) -> None:
    """Kill and reap processes of a program's tree (parents first). The caller is a subreaper
    (tests/test_zdtm.py, bench/zdtm_table.py), so the orphans of a killed tree are its children:
    reaped here at once, their pids are free for the restore that follows (a zombie holding a
    dumped pid would make the restore give that process another pid). A pid that is not our
    child (not yet reparented, or reaped by another): ECHILD, left alone."""
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            select.select([fd], [], [], TIMEOUT)  # readable once it has exited
        finally:
            os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _kill_restore(proc: subprocess.Popen[bytes]) -> None:
    """Kill the restored process(es) below `ckpt restore`, then `ckpt restore` itself."""
    if proc.poll() is None:
        todo, pids = [proc.pid], []
        while todo:
            kids = _children(todo.pop())
            pids += kids
            todo += kids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(TIMEOUT)


def _close(proc: subprocess.Popen[bytes]) -> None:
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f:
            f.close()


def _start(exe: Path, cwd: Path, own_ipc: bool = False) -> tuple[subprocess.Popen[bytes], LineChannel]:
    argv = ["unshare", "--ipc", str(exe)] if own_ipc else [str(exe)]  # (unshare execs it: same pid)
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        cwd=cwd, bufsize=0, process_group=0,
    )  # fmt: skip
    chan = LineChannel(proc, TIMEOUT)
    first = chan.readline()
    if first != "ready":
        _kill_group(proc)
        _close(proc)
        raise _Stop("SETUP", f"did not get ready: {first!r}")
    return proc, chan


def _dump(proc: subprocess.Popen[bytes], d: Path, *extra: str, own_ipc: bool = False) -> Path:
    ns = ["nsenter", f"--ipc=/proc/{proc.pid}/ns/ipc"] if own_ipc else []
    r = _ckpt("dump", "--pid", str(proc.pid), "-D", str(d), "--json", *extra, prefix=ns)
    if r.returncode != 0:
        why = _refusal(r.stderr)
        if why and "Traceback" not in r.stderr:
            raise _Stop("REFUSED", f"dump: {why}")
        raise _Stop("WRONG", f"dump failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return Path(json.loads(r.stdout)["layer"])


def _restore_and_check(layer: Path, cwd: Path, seen: list[int]) -> None:
    """`seen` gets the restored processes' pids (and ckpt restore's), for _remove_sysv."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(layer)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=cwd, bufsize=0,
    )  # fmt: skip
    chan = LineChannel(proc, TIMEOUT)
    restored: list[int] = []
    seen.append(proc.pid)
    try:
        try:
            answer = chan.cmd("check")
        except (EOFError, TimeoutError, BrokenPipeError) as e:
            _kill_restore(proc)
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            why = _refusal(err)
            if proc.returncode == 1 and why and "Traceback" not in err:
                raise _Stop("REFUSED", f"restore: {why}") from None
            raise _Stop(
                "WRONG", f"no answer to check ({e}); ckpt restore {proc.returncode}: {err.strip()[-800:]}"
            ) from None
        restored = _descendants(proc.pid)  # the restored process and its tree, if any
        seen += restored
        if answer != "PASS":
            raise _Stop("WRONG", answer)
        chan.send("exit")
        rc = proc.wait(TIMEOUT)
        if rc != 0:
            raise _Stop("WRONG", f"exit after the check: ckpt restore returned {rc}")
    finally:
        _kill_restore(proc)
        _close(proc)
        _end(restored[1:])


def run(name: str, variant: str, exe: Path | None = None) -> Outcome:
    """One program through one variant (`full`, `incr`, or `none`)."""
    exe = exe or build_c(name, CFLAGS, where=ZDTM)
    work = Path(tempfile.mkdtemp(prefix=f"zdtm-{name}-"))
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = []  # the program's processes, original and restored: what they leave is removed
    try:
        os.chmod(work, 0o755)
        cwd = work / "cwd"
        cwd.mkdir()
        own_ipc = name in OWN_IPC
        proc, chan = _start(exe, cwd, own_ipc)
        tree = _descendants(proc.pid)
        pids += [proc.pid, *tree]  # (before any dump: a tree dump's --kill ends them too)
        try:
            if variant == "none":
                chan.cmd("touch")
                answer = chan.cmd("check")
                return Outcome(name, variant, "PASS" if answer == "PASS" else "SETUP", answer)
            d = work / "d"
            if variant == "incr":
                _dump(proc, d, own_ipc=own_ipc)
                if chan.cmd("touch") != "touched":
                    raise _Stop("WRONG", "no answer to touch after the full dump")
                layer = _dump(proc, d, "--incremental", "--kill", own_ipc=own_ipc)
            else:
                layer = _dump(proc, d, "--kill", own_ipc=own_ipc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(TIMEOUT)
        finally:
            _kill_group(proc)
            _close(proc)
            _end(tree)
        _restore_and_check(layer, cwd, pids)
        return Outcome(name, variant, "PASS")
    except _Stop as s:
        return Outcome(name, variant, s.verdict, s.detail)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _unlink_shm(name, proc.pid if proc else None)
        _remove_sysv(pids)


def _unlink_shm(name: str, pid: int | None) -> None:
    """The program's POSIX shm file (/dev/shm/zdtm-NAME-RUNNER-PID): a tmpfs file outlives every
    process that mapped it, and the program, killed by the dump and its copy told to exit, never
    unlinks it."""
    if pid is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/zdtm-{name}-{os.getpid()}-{pid}")


def _remove_sysv(pids: list[int]) -> None:
    """The SysV segments the program's processes made or last used, once nothing attaches them: a
    segment outlives its processes until removed (IPC_RMID), and the program (shm00) is killed by
    the dump, its restored copy told to exit; the restore makes a second segment (its helper the
    creator, the copy the last user). Held by no one by now, they are this run's alone."""
    import ctypes

    if not pids:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        rows = Path("/proc/sysvipc/shm").read_text().splitlines()
    except OSError:
        return
    head = rows[0].split() if rows else []
    for ln in rows[1:]:
        row = dict(zip(head, ln.split(), strict=False))
        with contextlib.suppress(KeyError, ValueError):
            if row["nattch"] == "0" and (int(row["cpid"]) in pids or int(row["lpid"]) in pids):
                libc.shmctl(int(row["shmid"]), 0, None)  # IPC_RMID


def run_all(cases: Iterable[tuple[str, str]], workers: int = 2) -> dict[tuple[str, str], Outcome]:
    cases = list(cases)
    exes = {name: build_c(name, CFLAGS, where=ZDTM) for name in sorted({n for n, _ in cases})}
    with ThreadPoolExecutor(workers) as pool:
        futures = {(n, v): pool.submit(run, n, v, exes[n]) for n, v in cases}
        return {k: f.result() for k, f in futures.items()}
