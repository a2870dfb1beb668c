from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import leftovers, serial, snapshot
from tests.util import HYPOTHESIS_SEED, LOCK_OWNER, Target, build_c, subreaper_on, subreaper_restore

# Every ckpt this run starts (the tests' ENVs copy os.environ) names its network locks after this
# run, so the lock checks see only this run's, not those of a run beside it (ckpt/netlock.py).
os.environ["CKPT_LOCK_OWNER"] = LOCK_OWNER
# Every process this run starts carries its controller's and worker's pids: what a killed run
# left is told by both being gone (tests/leftovers.py), never by CKPT_LOCK_OWNER, a user's too.
_controller = os.environ.get(leftovers.RUN_ENV, "").split(":")[0]
if not (os.environ.get("PYTEST_XDIST_WORKER") and _controller.isdigit()):
    _controller = str(os.getpid())
os.environ[leftovers.RUN_ENV] = f"{_controller}:{os.getpid()}"

# A run started in the background of a non-interactive shell (`pytest ... &`) inherits SIGINT (and
# SIGQUIT) ignored, and so would every ckpt and target it starts, exec keeping SIG_IGN: the Ctrl-C
# tests (and python3's own SIGINT handler in a dumped target) need the default. Python put none of
# its own when it started with SIGINT ignored.
# (The targets' signal states are compared with what they set themselves: SIGQUIT too.)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


_BEFORE: dict[str, list[str]] = {}  # the machine when the run began (the controller's: tests/snapshot.py)


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        leftovers.remove_stale()  # once per run, before any test (tests/leftovers.py)
        _BEFORE.update(snapshot.snapshot())
    if not os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "numprocesses", None):
        # The xdist controller, before it starts its workers: they inherit the blocked SIGCHLD, so
        # the thread execnet starts in each (its I/O thread, before any conftest runs) keeps it
        # blocked like numpy's below; the worker's main thread unblocks it again (next lines).
        # Else that thread could take the SIGCHLD a tracing wait is woken by, and every freeze
        # in the runner would go the fallback's way (ckpt/ptrace/sigchld.py), not a CLI user's.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        # One guest session for all workers: the first to collect starts it, the others join it,
        # and this process ends it (tests/vm/session.py start_or_join, pytest_sessionfinish below).
        from tests.vm import session as vm_session

        os.environ[vm_session.SHARED_ENV] = tempfile.mkdtemp(prefix="ckpt-vm-xdist-")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        # Each worker leads a process group of its own, which every ckpt and restore helper it
        # starts inherits: a test that looks for its leftovers among all processes tells its own
        # from the other worker's by that (tests/test_restore.py _ours).
        with contextlib.suppress(PermissionError):
            os.setpgid(0, 0)
    # numpy's OpenBLAS starts a thread when numpy is first imported. Started with SIGCHLD blocked (as
    # the CLI arranges), it cannot take the SIGCHLD that wakes a ptrace wait, and the tests run the
    # waits a user of the CLI gets (ckpt/ptrace/sigchld.py); the fallback has its own test.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        import numpy  # noqa: F401
    finally:
        if signal.SIGCHLD not in old:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    config.addinivalue_line(
        "markers", "vm: boots a kernel under QEMU (slow; skipped with a reason if unavailable)"
    )


@pytest.hookimpl(tryfirst=True)  # before -m serial / -m "not serial" selects (scripts/test.sh)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(serial.matches(item.nodeid, e) for e in serial.SERIAL):
            item.add_marker(pytest.mark.serial)
    if config.args != list(config.getini("testpaths")):
        return  # a selection: an entry may name a test left out of it
    modules = {item.nodeid.split("::")[0] for item in items}
    stale = [
        e
        for e in serial.SERIAL
        if e.split("::")[0] in modules and not any(serial.matches(i.nodeid, e) for i in items)
    ]
    if stale:
        raise pytest.UsageError(f"tests/serial.py names tests that do not exist: {stale}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    shared = os.environ.get("CKPT_VM_SHARED")
    if shared and not os.environ.get("PYTEST_XDIST_WORKER"):  # the xdist controller's, after its workers
        from tests.vm import session as vm_session

        vm_session.end_shared(Path(shared))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the run left on the machine, once, by the controller after its workers ended: a warning
    (another run beside it may have made what is new), so it is listed, not failed."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not _BEFORE:
        return
    lines = snapshot.report(_BEFORE, snapshot.snapshot(), LOCK_OWNER)
    if lines:
        terminalreporter.section("objects left on the machine since the run began (this run's or another's)")
        for ln in lines[:50]:
            terminalreporter.write_line(ln)
        if len(lines) > 50:
            terminalreporter.write_line(f"... and {len(lines) - 50} more (python -m tests.snapshot)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    out = [f"hypothesis seed: {HYPOTHESIS_SEED} (CKPT_HYPOTHESIS_SEED replays or varies it)"]
    from ckpt.proc.semundo import used_sets

    used = used_sets()
    if used:  # (left by a killed program, typically): run under `unshare --ipc` for a clean namespace
        out.append(
            f"SysV semaphore sets {used[:8]} were operated on in this IPC namespace: every multi-threaded "
            "target dumped here is refused (SEM_UNDO cannot be told apart; ckpt/proc/semundo.py)"
        )
    return out


@pytest.fixture(scope="session", autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.exit("ckpt's tests need root (ptrace of other processes, userfaultfd on another process)", 2)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Target]]:
    """spawn(name, *args) builds tests/targets/NAME.c and starts it; every target is killed afterwards."""
    started: list[Target] = []

    def _spawn(name: str, *args: str, **kw: object) -> Target:
        t = Target([str(build_c(name)), *args], **kw)  # type: ignore[arg-type]
        started.append(t)
        return t

    yield _spawn
    for t in started:
        t.close()


@pytest.fixture
def python_stops() -> Iterator[None]:
    """The freeze's stops all through Python (CKPT_QUICKSTOPS=0): for tests that stand in for its
    waits (Frozen._wait) to play out a stop that comes late or never. The C stops hand such a stop
    over to the same Python loops (tests/test_quickstops.py)."""
    from ckpt.ptrace import quickstops

    quickstops.reset(False)
    try:
        yield
    finally:
        quickstops.reset(True)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another uid (1001) can reach (pytest's tmp_path is under a 0700 directory of root's)."""
    d = Path(tempfile.mkdtemp(prefix="ckpt-public-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture
def datafile(tmp_path: Path) -> Path:
    """A 16-page file with known bytes, for private file mappings."""
    p = tmp_path / "mapped.bin"
    p.write_bytes(bytes((i * 7 + i // 4096) & 0xFF for i in range(16 * 4096)))
    return p


_libc = ctypes.CDLL(None, use_errno=True)


def _descends(pid: int) -> bool:
    """Whether `pid` is a process below this one (a child, or an orphan of the tree given to us)."""
    for _ in range(64):
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == os.getpid():
            return True
        if pid <= 1:
            return False
    return False


def _kill_if_ours(pid: int) -> None:
    """SIGKILL `pid` if it is still one of ours. pid_max is 32768 here and several runs share the
    machine: a pid whose process ended early in the test may be another run's process by now."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # (Checked after the pidfd is open: if the pid changed hands in between, the pidfd's
        # process is gone and the signal goes nowhere.)
        if _descends(pid):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)


@pytest.fixture
def subreaper() -> Iterator[list[int]]:
    """Pids to kill and reap at the end (process trees); orphans come to us meanwhile."""
    pids: list[int] = []
    was_subreaper = subreaper_on()
    try:
        yield pids
    finally:
        for p in pids:
            _kill_if_ours(p)
        for p in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, 0)
        subreaper_restore(was_subreaper)


# Every Popen a test makes, so that its end closes what the test left open (_no_popen_left).
_popens: list[weakref.ref[subprocess.Popen[bytes]]] = []
_popen_init = subprocess.Popen.__init__


def _recorded_init(self: subprocess.Popen[bytes], *args: object, **kw: object) -> None:
    _popen_init(self, *args, **kw)  # type: ignore[arg-type]
    _popens.append(weakref.ref(self))


subprocess.Popen.__init__ = _recorded_init  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _no_popen_left() -> Iterator[None]:
    """A Popen that a test leaves with its pipes open, or its process unreaped, is closed and reaped
    when the test ends (after its other fixtures: autouse, set up first). Left to the garbage
    collector, its pipes would close in the middle of a later test, one that compares fd tables or
    waits for a pipe's EOF (tests/test_tree_abort.py saw it in CI). CKPT_TEST_LEAKS=1 fails the test
    that leaked instead, naming the command, to find them."""
    start = len(_popens)
    yield
    leaked: list[str] = []
    for ref in _popens[start:]:
        p = ref()
        if p is None:
            continue
        what: list[str] = []
        if p.poll() is None:  # (a pid reaped elsewhere: ECHILD, returncode 0)
            what.append("running")
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
        for name in ("stdin", "stdout", "stderr"):
            f = getattr(p, name)
            if f is not None and not f.closed:
                what.append(name)
                with contextlib.suppress(OSError):
                    f.close()
        if what:
            argv = [str(a) for a in p.args] if isinstance(p.args, list) else [str(p.args)]
            leaked.append(f"{' '.join(argv)[:100]!r} ({', '.join(what)})")
    del _popens[start:]
    if leaked and os.environ.get("CKPT_TEST_LEAKS") == "1":
        pytest.fail("left open: " + "; ".join(leaked))
