"""The flag counters' tracepoint ids where no tracefs is mounted (ckpt/proc/flagwatch.py): read
through a tracefs mount attached nowhere (ids_from_detached_mount), or through a child in its own
private mount namespace (ids_in_private_namespace, where the new mount API is missing), each equal
to the ids of a tracefs the test mounts itself (in a namespace of its own), and nothing left
mounted, no child left behind, in this namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ckpt.proc import flagwatch
from ckpt.proc.flagwatch import EVENTS, Unavailable, ids_from_detached_mount, ids_in_private_namespace

ROOT = Path(__file__).resolve().parent.parent


def _mountinfo() -> list[str]:
    """The tracefs mounts of this mount namespace: what the code under test could leave. (Not the
    whole table: the namespace is the other xdist worker's too, whose tests mount and unmount
    cgroups, tmpfs and /run/netns meanwhile.)"""
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if " - tracefs " in line]


def _children() -> set[int]:
    """This process's children. Compared with <=, not ==: a child an earlier test left finished
    (a Popen it did not wait for) may be reaped meanwhile, by subprocess's reaping of finished
    Popens at the next one started."""
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        out |= {int(k) for k in Path(f"/proc/self/task/{tid}/children").read_text().split()}
    return out


def _ids_mounted_by_the_test() -> tuple[int, ...]:
    """The ids as a tracefs mounted by util-linux in a private namespace of the test's own shows
    them (mount(8) rather than the code under test)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("no util-linux unshare/mount here")
    with tempfile.TemporaryDirectory(prefix="test-tracefs-") as mnt:
        reads = "; ".join(f"cat {mnt}/events/{tp}/id" for tp, _ in EVENTS)
        got = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
             f"mount -t tracefs tracefs {mnt}; {reads}"],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
    return tuple(int(x) for x in got.stdout.split())


def test_private_namespace_ids_equal_a_mounted_tracefs() -> None:
    before, kids = _mountinfo(), _children()
    ids = ids_in_private_namespace()
    assert _mountinfo() == before  # nothing mounted (or left mounted) here
    assert _children() <= kids  # no child left (<=: see _children)
    assert len(ids) == len(EVENTS)
    assert ids == _ids_mounted_by_the_test()
    assert _mountinfo() == before
    # Where a tracefs is mounted in this namespace, the ids it shows are the same too.
    for root in (*flagwatch.TRACEFS, *flagwatch._mounted_tracefs()):
        if os.path.exists(f"{root}/events/raw_syscalls/sys_enter/id"):
            assert flagwatch._ids_from(root) == ids


def test_detached_mount_ids_equal_a_mounted_tracefs() -> None:
    """The detached mount: the same ids, with nothing mounted here (before, during: it is attached
    to no directory) and no child (it runs none)."""
    before, kids = _mountinfo(), _children()
    ids = ids_from_detached_mount()
    assert _mountinfo() == before
    assert _children() <= kids
    assert ids == ids_in_private_namespace()
    assert ids == _ids_mounted_by_the_test()
    fds = set(os.listdir("/proc/self/fd"))
    ids_from_detached_mount()
    assert set(os.listdir("/proc/self/fd")) == fds  # the fs context's and the mount's fds closed


def test_the_ids_flagwatch_uses_are_those() -> None:
    """What FlagWatch opens its counters with (the cached lookup), here with or without tracefs."""
    before = _mountinfo()
    assert flagwatch._tracepoint_ids() == ids_in_private_namespace()
    assert flagwatch.prefetch_ids() is None
    assert _mountinfo() == before


def test_a_child_past_its_time_is_killed_and_reaped() -> None:
    """The deadline (the pipe's EOF and the pidfd, not sleeps): past it the child is killed and
    reaped, nothing stays mounted, and the reason says so."""
    before, kids = _mountinfo(), _children()
    with pytest.raises(Unavailable, match="took over 0 s"):
        ids_in_private_namespace(timeout=0)
    assert _children() <= kids
    assert _mountinfo() == before


def test_refused_without_cap_sys_admin() -> None:
    """No CAP_SYS_ADMIN (a real refusal of the kernel: the capability dropped by setpriv): Unavailable
    with the reason, and FlagWatch says so too."""
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv here")
    code = (
        "from ckpt.proc.flagwatch import Unavailable, ids_from_detached_mount, ids_in_private_namespace\n"
        "from ckpt.proc.flagwatch import open_watch\n"
        "import os\n"
        "try:\n"
        "    ids_in_private_namespace()\n"
        "except Unavailable as e:\n"
        "    print('unavailable:', e)\n"
        "try:\n"
        "    ids_from_detached_mount()\n"
        "except Unavailable as e:\n"
        "    print('detached:', e)\n"
        "print('watch:', open_watch(os.getpid(), [os.getpid()]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    got = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    if not os.path.exists("/sys/kernel/tracing/events/raw_syscalls"):
        assert lines[0] == (
            "unavailable: no tracefs mounted, and none in a private namespace: "
            "unshare(CLONE_NEWNS): Operation not permitted"
        )
        assert lines[1] == "detached: fsopen(tracefs): Operation not permitted"
        # (FlagWatch tries the detached mount, then the child: the child's refusal is the reason)
        assert lines[2] == f"watch: {lines[0].removeprefix('unavailable: ')}"
    else:
        assert lines[0].startswith("unavailable: ")  # (the mounted tracefs serves FlagWatch there)
