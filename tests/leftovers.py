"""Kernel objects a killed test program leaves behind it, outliving the run, removed before a run.

The machine the suite runs on may be used again and again (CI's is): what one run leaves charges
limits the next one meets. A POSIX message queue stays until unlinked and stays charged to root's
RLIMIT_MSGQUEUE (800 KiB: ~9 queues of the default size), so after a few runs that killed programs
holding one, every mq_open failed with EMFILE. The tests name theirs after the program's pid
(`/ckpt-test-mq-PID`, `/zdtm-mq-PID`); one whose program is gone is removed here.

The same for what else a killed program or a killed run leaves (tests/snapshot.py finds them):
- /dev/shm/ckpt-migrate-*: the staging copy of a `ckpt migrate` chain, memory, left when ckpt and
  its guard both died (the guard removes it when only ckpt dies); its owner is the pid in its lock
  file (chainlock.py). A dead owner's guard may still use it (its TCP records, up to 150 s), and one
  without a lock file may be a migration still connecting: both only once unchanged for STALE_AGE.
- /dev/shm/zdtm-NAME-RUNNER-PID: a zdtm program's POSIX shm file (shm00), stale once its runner
  (the pytest worker) is gone; the older name zdtm-NAME-PID once PID is gone and STALE_AGE passed.
- processes reparented to init that carry a test run's CKPT_TEST_RUN (RUN_ENV: every process a run
  starts inherits it, "CONTROLLER:WORKER" pids, tests/conftest.py) whose controller and worker are
  both gone: a target's child orphaned when the target was killed (test_pidns_start's tree child
  ran on so, in every run), older than STALE_AGE (a dead ckpt's guard may still be acting). The
  worker alone gone is not enough: the guest session one worker started for all of them
  (tests/vm/session.py) runs on after that worker exits, until the controller ends it. Nothing is
  taken on CKPT_LOCK_OWNER alone: a user of ckpt may set it (ckpt/netlock.py).
- SysV shared memory segments of the test programs (private ones of shm00's size and mode 0600,
  keyed ones of objects.c/tree_sysv.c: 0x5ce0PPPP, 0x5ce1PPPP with PPPP the creator's pid, 3 pages,
  mode 0640) that nothing attaches, whose creator and last user are both gone, and whose owner and
  creator are this run's user."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Collection

# Queue names the tests create, with the pid of the program that made them.
OURS = re.compile(r"^(?:ckpt-test-mq|zdtm-mq)-(\d+)$")


def stale_queues(names: list[str]) -> list[str]:
    """Those of ``names`` made by a test program that no longer runs."""
    return [n for n in names if (m := OURS.match(n)) and not os.path.exists(f"/proc/{m.group(1)}")]


STALE_AGE = 600.0  # s: far beyond any one migration's or zdtm cycle's use of its object
SHM = "/dev/shm"
ZDTM_SHM = re.compile(r"^zdtm-[a-z0-9_]+-(\d+)-(\d+)$")
ZDTM_SHM_OLD = re.compile(r"^zdtm-[a-z0-9_]+-(\d+)$")
STAGING = "ckpt-migrate-"
SHM00_SIZE = 8 * 4096  # tests/zdtm/shm00.c's private segment
TEST_KEYS = (0x5CE00000, 0x5CE10000)  # tests/targets/objects.c, tree_sysv.c: key | (pid & 0xffff)
TEST_KEYED_SIZE = 3 * 4096  # their keyed segments' size (mode 0640)


def _gone(pid: str | int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def _old(path: str, now: float) -> bool:
    try:
        return now - os.lstat(path).st_mtime > STALE_AGE
    except OSError:
        return False


def _staging_owner(path: str) -> str | None:
    try:
        with open(os.path.join(path, ".ckpt-lock")) as f:
            words = f.read(32).split()
    except OSError:
        return None
    return words[0] if words and words[0].isdigit() else None


def stale_shm(names: list[str], now: float | None = None) -> list[str]:
    """Those of the /dev/shm entries ``names`` that a dead test program or run left (above)."""
    now = time.time() if now is None else now
    out = []
    for n in names:
        path = os.path.join(SHM, n)
        if n.startswith(STAGING):
            owner = _staging_owner(path)
            if (owner is None or _gone(owner)) and _old(path, now):
                out.append(n)
        elif m := ZDTM_SHM.match(n):
            if _gone(m.group(1)):
                out.append(n)
        elif (m := ZDTM_SHM_OLD.match(n)) and _gone(m.group(1)) and _old(path, now):
            out.append(n)
    return out


def remove_stale_shm() -> list[str]:
    try:
        names = os.listdir(SHM)
    except OSError:
        return []
    gone = stale_shm(names)
    for n in gone:
        path = os.path.join(SHM, n)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return gone


def _made_by_tests(key: int, size: int, mode: int, cpid: int) -> bool:
    """Whether a segment has the key, size and mode a test program gives its own (above): as
    root, uid checks alone would take any root program's segment."""
    if key == 0:
        return size == SHM00_SIZE and mode == 0o600
    return (
        key & 0xFFFF0000 in TEST_KEYS
        and key & 0xFFFF == cpid & 0xFFFF
        and size == TEST_KEYED_SIZE
        and mode == 0o640
    )


def stale_sysv_shm(rows: list[dict[str, str]], euid: int | None = None) -> list[int]:
    """The ids of the test programs' segments (above) that nothing attaches, their users gone, the
    segment owned and made by this user (`euid`, default this process's)."""
    euid = os.geteuid() if euid is None else euid
    out = []
    for row in rows:
        with contextlib.suppress(KeyError, ValueError):
            key, size = int(row["key"]) & 0xFFFFFFFF, int(row["size"])
            mode, cpid = int(row["perms"], 8) & 0o777, int(row["cpid"])
            if (
                int(row["uid"]) == euid
                and int(row["cuid"]) == euid
                and _made_by_tests(key, size, mode, cpid)
                and row["nattch"] == "0"
                and _gone(cpid)
                and _gone(row["lpid"])
            ):
                out.append(int(row["shmid"]))
    return out


def remove_stale_sysv() -> list[int]:
    try:
        with open("/proc/sysvipc/shm") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    head = lines[0].split() if lines else []
    ids = stale_sysv_shm([dict(zip(head, ln.split(), strict=False)) for ln in lines[1:]])
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return [i for i in ids if libc.shmctl(i, 0, None) == 0]  # IPC_RMID


def _ticks_per_s() -> int:
    return os.sysconf("SC_CLK_TCK")


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


RUN_ENV = "CKPT_TEST_RUN"  # "CONTROLLER:WORKER": the pids of the test run that started a process
_RUN = re.compile(rb"(\d{1,10}):(\d{1,10})")


def stale_processes(min_age: float = STALE_AGE, among: Collection[int] | None = None) -> list[int]:
    """Processes reparented to init, of a test run that is gone (above), older than `min_age` s;
    only those of `among` if given."""
    out = []
    now = _uptime()
    key = RUN_ENV.encode() + b"="
    for name in os.listdir("/proc"):
        if not name.isdigit() or (among is not None and int(name) not in among):
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, IndexError):
            continue
        run = _RUN.fullmatch(next((e[len(key) :] for e in env if e.startswith(key)), b""))
        if fields[1] != "1" or run is None:
            continue
        if _gone(int(run[1])) and _gone(int(run[2])) and now - int(fields[19]) / _ticks_per_s() >= min_age:
            out.append(int(name))
    return out


def remove_stale_processes(min_age: float = STALE_AGE, among: Collection[int] | None = None) -> list[int]:
    """Kills them, each by a pidfd opened before it is checked again (a pid reused meanwhile is
    another process, which the check then leaves alone)."""
    import signal

    killed = []
    for pid in stale_processes(min_age, among):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if pid in stale_processes(min_age, [pid]):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                killed.append(pid)
        except OSError:
            pass
        finally:
            os.close(fd)
    return killed


def remove_stale() -> dict[str, list[str]]:
    """Everything above, once per run before any test: what was removed, by kind."""
    return {
        "mqueue": remove_stale_queues(),
        "shm": remove_stale_shm(),
        "sysv": [str(i) for i in remove_stale_sysv()],
        "processes": [str(p) for p in remove_stale_processes()],
    }


def remove_stale_queues() -> list[str]:
    """Unlinks this IPC namespace's stale test queues; returns their names. The queues are listed
    through an mqueue mount made in a mount namespace of its own (`unshare -m`), which ends with the
    command, so the host's mounts are never touched."""
    try:
        p = subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t mqueue none /mnt && ls -1 /mnt"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if p.returncode != 0:
        return []
    import ctypes

    rt = ctypes.CDLL("librt.so.1")
    gone = stale_queues(p.stdout.split())
    for n in gone:
        rt.mq_unlink(f"/{n}".encode())
    return gone
