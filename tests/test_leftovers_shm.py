"""tests/leftovers.py beyond queues: stale /dev/shm entries (a migration's staging copy, a zdtm
program's shm file) and SysV segments of the test programs are removed before a run; those of a
live owner, fresh ones that a dead ckpt's guard may still use, and others' are left alone. Real
files, real segments, real processes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.leftovers import (
    RUN_ENV,
    SHM00_SIZE,
    STALE_AGE,
    TEST_KEYED_SIZE,
    remove_stale_shm,
    remove_stale_sysv,
)

libc = ctypes.CDLL(None, use_errno=True)
IPC_STAT = 2


def _dead_pid() -> int:
    p = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(p.stdout)


def _live() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)


def _staging(name: str, owner: int | None, age: float) -> Path:
    d = Path("/dev/shm") / name
    d.mkdir(mode=0o700)
    (d / "layer-0001.ckpt").write_bytes(b"x" * 4096)
    if owner is not None:
        (d / ".ckpt-lock").write_text(f"{owner}\n")
    t = time.time() - age
    os.utime(d, (t, t))
    return d


def test_stale_shm_entries_removed_others_kept() -> None:
    dead, live = _dead_pid(), _live()
    tag = f"{os.getpid()}x{time.monotonic_ns()}"
    old, fresh = STALE_AGE + 60, 0.0
    made: list[Path] = []
    try:
        made += [
            _staging(f"ckpt-migrate-dead-old-{tag}", dead, old),  # removed
            _staging(f"ckpt-migrate-nolock-old-{tag}", None, old),  # removed
            _staging(f"ckpt-migrate-dead-fresh-{tag}", dead, fresh),  # its guard may still use it
            _staging(f"ckpt-migrate-live-old-{tag}", live.pid, old),  # its migration runs
            _staging(f"ckpt-other-dead-old-{tag}", dead, old),  # not a staging name
        ]
        for n in (f"zdtm-shm00-{dead}-{dead}", f"zdtm-shm00-{live.pid}-{dead}"):
            made.append(Path("/dev/shm") / n)
            made[-1].write_bytes(b"y")
        gone = set(remove_stale_shm())
        assert [p.name in gone for p in made] == [True, True, False, False, False, True, False]
        assert [p.exists() for p in made] == [False, False, True, True, True, False, True]
    finally:
        live.communicate(b"")
        for p in made:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


_MAKE = """
import ctypes, os, sys
libc = ctypes.CDLL(None)
size, mode, keyed, who, wait = int(sys.argv[1]), int(sys.argv[2], 8), sys.argv[3], sys.argv[4], sys.argv[5]
key = 0x5CE00000 | (os.getpid() & 0xFFFF) if keyed == "keyed" else 0  # (0: IPC_PRIVATE)
if who == "nobody":
    os.setuid(65534)  # (ctypes is loaded: nothing more is imported from root's pyenv)
shmid = libc.shmget(key, size, 0o3000 | mode)  # IPC_CREAT | IPC_EXCL
if who == "chown" and shmid >= 0:  # made by this user, then given to another (IPC_SET)
    buf = ctypes.create_string_buffer(512)
    assert libc.shmctl(shmid, 2, buf) == 0  # IPC_STAT
    buf[4:8] = (65534).to_bytes(4, sys.byteorder)  # struct ipc_perm's uid, after its key
    assert libc.shmctl(shmid, 1, buf) == 0  # IPC_SET
print(shmid, flush=True)
if wait == "wait":
    sys.stdin.read()
"""


def _segment(
    size: int, wait: bool, mode: int = 0o600, keyed: bool = False, who: str = "self"
) -> tuple[int, subprocess.Popen[str]]:
    p = subprocess.Popen(
        [sys.executable, "-c", _MAKE, str(size), f"{mode:o}", "keyed" if keyed else "private", who,
         "wait" if wait else "exit"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert p.stdout is not None
    shmid = int(p.stdout.readline())
    assert shmid >= 0
    if not wait:
        p.wait()
    return shmid, p


def _exists(shmid: int) -> bool:
    buf = ctypes.create_string_buffer(512)
    return bool(libc.shmctl(shmid, IPC_STAT, buf) == 0)


def test_stale_sysv_segments_removed_others_kept() -> None:
    """Only segments with a test program's key, size and mode, owned and made by this user, their
    users gone, are removed: as root, a uid check alone would take any root program's segment."""
    made = []
    try:
        for kw, removed in [
            (dict(size=SHM00_SIZE, wait=False), True),  # shm00's, its maker gone
            (dict(size=SHM00_SIZE, wait=True), False),  # its maker still runs
            (dict(size=4096, wait=False), False),  # not a test program's size
            (dict(size=SHM00_SIZE, wait=False, mode=0o644), False),  # nor its mode
            (dict(size=SHM00_SIZE, wait=False, who="nobody"), False),  # another user's
            (dict(size=SHM00_SIZE, wait=False, who="chown"), False),  # given to another user
            (dict(size=TEST_KEYED_SIZE, wait=False, mode=0o640, keyed=True), True),  # objects.c's
            (dict(size=4096, wait=False, mode=0o640, keyed=True), False),  # its key, not its size
        ]:
            made.append((*_segment(**kw), removed))
        gone = remove_stale_sysv()
        ids = [i for i, _, _ in made]
        assert [i in gone for i in ids] == [r for _, _, r in made]
        assert [_exists(i) for i in ids] == [not r for _, _, r in made]
    finally:
        for shmid, p, _ in made:
            if p.poll() is None:
                p.communicate("")
            libc.shmctl(shmid, 0, None)  # IPC_RMID


def test_snapshot_reports_a_runs_leftovers() -> None:
    """tests/snapshot.py: a process carrying the run's CKPT_LOCK_OWNER and a /dev/shm file made
    after the first snapshot are reported; a process of another run is not."""
    from tests import snapshot

    before = snapshot.snapshot()
    f = Path("/dev/shm") / f"ckpt-snapshot-probe-{os.getpid()}"
    ours = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, env=dict(os.environ, CKPT_LOCK_OWNER="feedf00d"),
    )  # fmt: skip
    other = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, env=dict(os.environ, CKPT_LOCK_OWNER="0badcafe"),
    )  # fmt: skip
    try:
        f.write_bytes(b"z")
        lines = snapshot.report(before, snapshot.snapshot(), "feedf00d")
        assert f"shm: {f}" in lines
        mine = [ln for ln in lines if ln.startswith("process of this run")]
        assert [ln.split()[6].split("@")[0] for ln in mine] == [str(ours.pid)]
    finally:
        for p in (ours, other):
            p.communicate(b"")
        f.unlink()


# Forks a child that waits for a signal for ever, says its pid, and exits: the child is orphaned.
_ORPHAN = """
import os, signal
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)  # (the caller reads stdout to its end)
    os.dup2(null, 2)
    while True:
        signal.pause()
print(pid, flush=True)
"""


def _orphan(**env: str) -> int:
    base = {k: v for k, v in os.environ.items() if k not in ("CKPT_LOCK_OWNER", RUN_ENV)}
    p = subprocess.run(
        [sys.executable, "-c", _ORPHAN], stdin=subprocess.DEVNULL, capture_output=True, text=True,
        env=base | env, timeout=60,
    )  # fmt: skip
    return int(p.stdout)


def test_this_runs_marker_names_controller_and_worker() -> None:
    controller, worker = os.environ[RUN_ENV].split(":")
    assert worker == str(os.getpid())
    assert controller == str(os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid())


def test_stale_run_processes_killed_others_kept() -> None:
    """An orphan (reparented to init) of a run whose controller and worker are both gone is killed;
    one whose worker alone is gone (the guest session a worker started for all: tests/vm/session.py),
    one whose controller alone is gone, and one carrying only CKPT_LOCK_OWNER are kept."""
    from tests.leftovers import remove_stale_processes
    from tests.util import subreaper_on, subreaper_restore

    was = subreaper_on()
    subreaper_restore(0)  # (orphans go to init here, as a killed run's do)
    fds: list[int] = []
    try:
        dead, dead2, me = _dead_pid(), _dead_pid(), os.getpid()
        orphans = [
            _orphan(CKPT_TEST_RUN=f"{dead}:{dead2}"),  # killed
            _orphan(CKPT_TEST_RUN=f"{me}:{dead}"),  # its controller runs
            _orphan(CKPT_TEST_RUN=f"{dead}:{me}"),  # its worker runs
            _orphan(CKPT_LOCK_OWNER=f"{dead:08x}"),  # not a test run's mark
            _orphan(CKPT_LOCK_OWNER=f"{dead:08x}", CKPT_TEST_RUN=f"{dead}"),  # not one either
        ]
        fds = [os.pidfd_open(pid) for pid in orphans]
        killed = remove_stale_processes(min_age=0.0, among=orphans)
        assert killed == orphans[:1]
        assert select.select(fds[:1], [], [], 60)[0]  # (readable once it has exited)
        assert not select.select(fds[1:], [], [], 0)[0]
    finally:
        for fd in fds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        subreaper_restore(was)
