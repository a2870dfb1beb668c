"""One guest boot for all the guest scenarios of a pytest session, run beside the host's tests.

Each guest test used to boot its own VM and wait for it: six boots (~8 s of TCG each) and ~2.5 min of
the suite's wall time spent waiting on one emulated CPU while the host's second CPU idled. Now
tests/vm/conftest.py starts this module as a separate process right after collection (when any
selected test needs a guest result); it boots the guest once, runs every scenario wanted there one
after another (each with its own bound, output and exit status), then the harness's timeout check
(a second boot: its point is a guest that is killed), and writes what it saw to a JSON file. The host
tests run meanwhile; the guest tests, collected last, read the results (tests/vm/conftest.py,
``vm_session``). Each scenario's assertions are those it had with a boot of its own.

A separate process, not a thread of pytest: tests/conftest.py kills every Popen started during a test
when that test ends, and some tests compare the runner's threads and children before and after.
This process is started before any test and is reaped only by ``wait``; its QEMU is its child.

Run by hand: ``python -m tests.vm.session --dir D --scenarios smoke,softdirty --timeout-run``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VM_DIR = Path(__file__).resolve().parent
RESULT = "session.json"
# The harness checks' environment and arguments (tests/vm/test_vm_smoke.py).
HARNESS_VAR = "a b'c"
HARNESS_ARGS = ("x", "y z")
HARNESS_STATUS = 7
# Boot (~8 s quiet, ~30 s at load 10) and the guest's own set-up, on top of the scenarios' bounds.
BOOT_S = 120
# The timeout check: a guest still running at this bound (boot included) is killed. 8 s was short of a
# boot at load 10 on 2 CPUs, 30 s of one beside the host's tests at load 15 (it printed nothing): run
# in the background, a longer bound costs no wall time. After the scenarios' guest, never beside it.
TIMEOUT_CHECK_S = 90
FULL = os.environ.get("CKPT_VM_FULL") == "1"


@dataclass(frozen=True)
class Scenario:
    name: str
    timeout_s: int
    argv: list[str]  # run in the guest, cwd the repo; "$R" is the scenario's own results directory


def _scenarios(scratch: Path) -> dict[str, Any]:
    """Builders of each scenario's command line (host builds done when the scenario is wanted)."""
    from tests.examples_util import build_example
    from tests.util import build_c

    py = sys.executable  # the pytest process's python: the guest sees the host's whole root

    def smoke() -> Scenario:
        # Compiled on the host into a directory the guest reads through the read-only root share.
        probe = scratch / "softdirty_probe"
        gcc = "gcc"
        subprocess.run(
            [gcc, "-O2", "-Wall", "-Werror", "-o", str(probe), str(VM_DIR / "softdirty_probe.c")],
            check=True,
            timeout=120,
        )
        script = f'uname -r; exec {shlex.quote(str(probe))} > "$R/probe.txt" 2>&1'
        return Scenario("smoke", 120, ["/bin/sh", "-c", script])

    def softdirty() -> Scenario:
        argv = [py, str(VM_DIR / "guest_softdirty.py"), "--memtarget", str(build_c("memtarget"))]
        argv += ["--track", "soft-dirty", "--expect-auto", "soft-dirty", "--out", "$R/guest.json"]
        return Scenario("softdirty", 240, argv)

    def dirtyrate() -> Scenario:
        argv = [py, str(VM_DIR / "guest_dirtyrate.py"), "--dirtier", str(build_example("dirtier"))]
        return Scenario("dirtyrate", 240, [*argv, "--out", "$R/guest.json"])

    def cgthrottle() -> Scenario:
        # Last: it mounts cgroup2 on the guest's /sys/fs/cgroup and changes the root cgroup.
        argv = [py, str(VM_DIR / "guest_cgthrottle.py"), "--cpuhog", str(build_c("cpuhog"))]
        argv += ["--dirtier", str(build_c("dirtier")), "--out", "$R/guest.json"]
        return Scenario("cgthrottle", 600, argv + (["--migrations"] if FULL else []))

    return {"smoke": smoke, "softdirty": softdirty, "dirtyrate": dirtyrate, "cgthrottle": cgthrottle}


ORDER = ("smoke", "softdirty", "dirtyrate", "cgthrottle")


def _arg(a: str) -> str:
    # "$R" stays a shell variable; everything else is quoted.
    return a.replace("$R", '"$R"') if a.startswith("$R") else shlex.quote(a)


def guest_script(scenarios: list[Scenario]) -> str:
    """The one script the guest runs: the harness checks first, then each scenario in its own
    results directory with its own bound (coreutils `timeout` of the host's root), then exit 7."""
    lines = [
        "# tests/vm/test_vm_smoke.py: environment, working directory, arguments, read-only root.",
        'echo "cwd=$(pwd) var=$CKPT_TEST_VAR args=$*"',
        'echo written > "$CKPT_VM_RESULTS/result.txt"',
        "touch /etc/ckpt-vm-should-fail 2>/dev/null && echo root-writable",
        "top=$CKPT_VM_RESULTS",
    ]
    for s in scenarios:
        cmd = " ".join(_arg(a) for a in s.argv)
        lines += [
            f"R=$top/{s.name}",
            'mkdir -p "$R"',
            'date +%s.%N > "$R/start"',
            f'CKPT_VM_RESULTS="$R" R="$R" timeout -k 5 {s.timeout_s} {cmd} > "$R/output.log" 2>&1 </dev/null',
            'echo $? > "$R/exit_status"',
            'date +%s.%N > "$R/end"',
        ]
    lines.append(f"exit {HARNESS_STATUS}")
    return "\n".join(lines) + "\n"


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


def _collect(share: Path, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        d = share / name
        status = _read(d / "exit_status").strip()
        took = None
        if (d / "start").exists() and (d / "end").exists():
            took = round(float(_read(d / "end")) - float(_read(d / "start")), 1)
        out[name] = {
            "dir": str(d),
            "exit_status": int(status) if status.lstrip("-").isdigit() else None,
            "output": _read(d / "output.log"),
            "script_s": took,
        }
    return out


def run(workdir: Path, names: list[str], timeout_check: bool) -> dict[str, Any]:
    from .vm import GuestError, GuestTimeout, VmUnavailable, ensure_assets, host_scratch_dir, run_in_guest

    res: dict[str, Any] = {"scenarios": {}, "started": time.time()}
    try:
        assets = ensure_assets()
    except VmUnavailable as exc:
        res["unavailable"] = exc.reason
        return res
    res["kernel_release"] = assets.kernel_release
    with ExitStack() as stack:
        if names:
            scratch = stack.enter_context(host_scratch_dir(assets))
            builders = _scenarios(scratch)
            scenarios = [builders[n]() for n in ORDER if n in names]
            share = workdir / "share"
            env = {"CKPT_VM_PYTHON": sys.executable, "PYTHONPATH": str(REPO), "CKPT_TEST_VAR": HARNESS_VAR}
            bound = BOOT_S + sum(s.timeout_s + 10 for s in scenarios)
            try:
                g = run_in_guest(
                    guest_script(scenarios),
                    share_rw=share,
                    env=env,
                    cwd=REPO,
                    args=HARNESS_ARGS,
                    timeout_s=bound,
                    assets=assets,
                )
                res["guest"] = {"exit_status": g.exit_status, "output": g.output, "duration_s": g.duration_s}
            except GuestError as exc:
                res["guest"] = {"error": f"{type(exc).__name__}: {exc}", "serial_log": exc.serial_log[-4000:]}
            res["share"] = str(share)
            res["scenarios"] = _collect(share, [s.name for s in scenarios])
    if timeout_check:
        t0 = time.monotonic()
        try:
            run_in_guest(
                "echo started\nsleep 1000\n",
                share_rw=workdir / "timeout",
                timeout_s=TIMEOUT_CHECK_S,
                assets=assets,
            )
            res["timeout"] = {"raised": None}
        except GuestTimeout as exc:
            res["timeout"] = {"raised": "GuestTimeout", "output": exc.output}
        except GuestError as exc:
            res["timeout"] = {"raised": type(exc).__name__, "output": exc.output, "message": str(exc)}
        res["timeout"]["duration_s"] = round(time.monotonic() - t0, 1)
    return res


def _children() -> list[int]:
    kids: list[int] = []
    for t in Path("/proc/self/task").iterdir():
        try:
            kids += [int(x) for x in (t / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return kids


def _on_term(signum: int, _frame: object) -> None:
    """The session ended first (a failure with -x, ^C): `timeout` passes the signal on to QEMU."""
    for pid in _children():
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--dir", type=Path, required=True, help="work directory: shares and session.json")
    p.add_argument("--scenarios", default="", help=f"comma-separated, of {','.join(ORDER)}")
    p.add_argument("--timeout-run", action="store_true", help="also the harness's timeout check")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    names = [n for n in a.scenarios.split(",") if n]
    unknown = set(names) - set(ORDER)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}")
    try:
        res = run(a.dir, names, a.timeout_run)
    except Exception:
        res = {"error": traceback.format_exc(), "scenarios": {}}
    res["finished"] = time.time()
    tmp = a.dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.rename(a.dir / RESULT)
    return 0


# -- the pytest side (tests/vm/conftest.py) ---------------------------------------------------
@dataclass
class Background:
    proc: subprocess.Popen[bytes]
    workdir: Path
    bound_s: float
    done: Any = None

    def result(self) -> dict[str, Any]:
        """What the guest reported; waits for it (woken by the process's exit: its end of the pipe)."""
        if self.done is None:
            assert self.proc.stdout is not None
            import select

            r, _, _ = select.select([self.proc.stdout], [], [], self.bound_s)
            if not r:
                self.stop()
                raise TimeoutError(f"the guest session did not end within {self.bound_s:.0f} s")
            self.proc.stdout.read()
            self.proc.wait(timeout=60)
            path = self.workdir / RESULT
            if not path.exists():
                log = _read(self.workdir / "session.log")
                raise RuntimeError(f"the guest session wrote no result (exit {self.proc.returncode}):\n{log}")
            self.done = json.loads(path.read_text())
        result: dict[str, Any] = self.done
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start(names: list[str], timeout_check: bool) -> Background:
    """Start the session process; its stdout is a pipe it never writes, so EOF means it ended."""
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-vm-session-"))
    workdir.chmod(0o755)
    log = open(workdir / "session.log", "wb")  # noqa: SIM115 (the child holds it)
    argv = [sys.executable, "-m", "tests.vm.session", "--dir", str(workdir), "--scenarios", ",".join(names)]
    if timeout_check:
        argv.append("--timeout-run")
    with log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            start_new_session=True,  # a test's killpg or a ^C of the terminal does not reach it
        )
    # Set-up on a fresh machine (apt: QEMU, the kernel; 900 s each at most), then the guest's bound.
    bound = 1800 + BOOT_S + sum(t + 10 for t in (120, 240, 240, 600)) + TIMEOUT_CHECK_S + 60
    return Background(proc, workdir, bound)


# -- one session for the workers of an xdist run (tests/vm/conftest.py) ------------------------
SHARED_ENV = "CKPT_VM_SHARED"  # a directory the xdist controller makes and its workers inherit
_SHARED_INFO = "session"  # in it: the session process's pid, work directory and bound


def _ended(pidfd: int, bound_s: float) -> bool:
    """Whether the process of `pidfd` ended within `bound_s` (a pidfd is readable once it has)."""
    import select

    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(int(bound_s * 1000)))


@dataclass
class Joined:
    """The session another worker of this xdist run started (not our child: waited for by pidfd)."""

    pidfd: int
    workdir: Path
    bound_s: float
    done: Any = None

    def result(self) -> dict[str, Any]:
        if self.done is None:
            if self.pidfd >= 0 and not _ended(self.pidfd, self.bound_s):
                raise TimeoutError(f"the guest session did not end within {self.bound_s:.0f} s")
            path = self.workdir / RESULT
            if not path.exists():
                log = _read(self.workdir / "session.log")
                raise RuntimeError(f"the guest session wrote no result:\n{log}")
            self.done = json.loads(path.read_text())
        result: dict[str, Any] = self.done
        return result


def start_or_join(shared: Path, names: list[str], timeout_check: bool) -> Background | Joined:
    """The first worker to get here starts the session; the others join it. Each worker collects the
    same tests, so each would start the same one. (Under a lock: the one that comes second finds the
    first one's note complete.)"""
    import fcntl

    with open(shared / "lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        info = shared / _SHARED_INFO
        if not info.exists():
            bg = start(names, timeout_check)
            note = {"pid": bg.proc.pid, "workdir": str(bg.workdir), "bound_s": bg.bound_s}
            info.write_text(json.dumps(note))
            return bg
        note = json.loads(info.read_text())
    try:
        pidfd = os.pidfd_open(note["pid"])
    except ProcessLookupError:
        pidfd = -1  # (ended and reaped already: its result is written)
    return Joined(pidfd, Path(note["workdir"]), note["bound_s"])


def end_shared(shared: Path) -> None:
    """At the end of the xdist run (the controller's): the session stopped if it still runs (-x, ^C),
    its work directory and `shared` removed."""
    import shutil

    info = shared / _SHARED_INFO
    if info.exists():
        note = json.loads(info.read_text())
        with suppress(ProcessLookupError, FileNotFoundError):
            pidfd = os.pidfd_open(note["pid"])
            try:
                # (Read after the pidfd is open: a pid that changed hands since is another process's,
                # whose command line does not name this session's work directory.)
                ours = note["workdir"].encode() in Path(f"/proc/{note['pid']}/cmdline").read_bytes()
                if ours and not _ended(pidfd, 0):
                    signal.pidfd_send_signal(pidfd, signal.SIGTERM)  # (it passes it on to QEMU)
                    if not _ended(pidfd, 30):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)
        if not os.environ.get("CKPT_VM_KEEP"):
            shutil.rmtree(note["workdir"], ignore_errors=True)
    shutil.rmtree(shared, ignore_errors=True)


@contextmanager
def started(names: list[str], timeout_check: bool) -> Iterator[Background]:
    bg = start(names, timeout_check)
    try:
        yield bg
    finally:
        bg.stop()


if __name__ == "__main__":
    # stdout is the parent's "ended" pipe: kept open, never written, in a descriptor no child
    # inherits (os.dup's are not inheritable); what is printed goes to the log.
    _ended = os.dup(1)
    os.dup2(2, 1)
    sys.exit(main())
