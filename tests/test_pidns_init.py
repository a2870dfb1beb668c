"""A pid namespace's own init (pid 1 inside it: `unshare --pid --fork PROGRAM`), restored with
`--pidns` as the init of a new namespace, its children at the pids they had inside (issue 12),
as CRIU restores a pid namespace's root task.

The target (tests/test_pidns_inner.py's TARGET, started as the namespace's init) records what it
saw before the dump (getpid 1, getppid 0, its child's pid 2, each thread's tid) and checks it
again itself after the restore; the test checks the same from outside through NSpid, and that the
restored init is what the kernel treats as one (killing it ends the namespace).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.image import Layer
from ckpt.restore.pidns import nspid
from tests.test_pidns import _detached
from tests.test_pidns_inner import Contained, _inner, _lines
from tests.test_restore_tree import _dump, _line_within
from tests.util import build_c


@pytest.fixture
def init_target(subreaper: list[int]) -> Iterator[Callable[..., Contained]]:
    """Start the target as its own pid namespace's init; killed (with its namespace) at the end."""
    made: list[Contained] = []

    def start(*args: str) -> Contained:
        made.append(Contained(*args, init=True))
        return made[-1]

    try:
        yield start
    finally:
        for c in made:
            c.kill()


def _ns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/pid").st_ino


def _fds(pid: int) -> list[tuple[int, str]]:
    """Each fd and what it is (a pipe's inode aside: the restore makes the pipes anew)."""
    out = []
    for n in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        link = os.readlink(f"/proc/{pid}/fd/{n}")
        out.append((int(n), link.split(":[")[0] if link.startswith("pipe:") else link))
    return out


def _wait_exit(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    return os.WEXITSTATUS(status)


@pytest.mark.parametrize("chain", ["full", "incremental"])
def test_init_with_a_child_is_pid_one_again(
    chain: str, tmp_path: Path, init_target: Callable[..., Contained], subreaper: list[int]
) -> None:
    """The init (1, parent 0 outside) with a child (2) that has a thread: restored, the init is pid
    1 of a new namespace and the child's parent, the child pid 2 with its thread's tid; the init
    wakes its child by the pid fork() gave it, reaps it (exit 3) and exits 7. From a full dump, and
    from a chain whose top is an incremental layer."""
    c = init_target("tree")
    pid, ppid, kid, kid_tid, kid_outer = c.seen
    assert (pid, ppid, kid) == (1, 0, 2)
    before = _fds(c.outer)
    if chain == "incremental":
        _dump(c.outer, tmp_path / "d")
    out = _dump(c.outer, tmp_path / "d", *(["--incremental"] if chain == "incremental" else []), "--kill")
    assert out["restorable"], out["not_restorable"]
    with Layer.open(str(out["layer"])) as top:
        assert top.meta.inventory.incremental == (chain == "incremental")
        assert top.meta.pidns is not None and (top.meta.pidns.pid, top.meta.pidns.ppid) == (1, 0)
        assert top.tree is not None and top.tree.ns_pids == {c.outer: (1, c.ns), kid_outer: (2, c.ns)}

    r, info = _detached(str(out["layer"]), subreaper)
    new = int(info["pid"])  # type: ignore[call-overload]
    assert info["init_pid"] == new and info["pid_kept"] and info["warnings"] == [], info
    members = {m["dumped_pid"]: int(m["pid"]) for m in info["tree"]}  # type: ignore[attr-defined]
    child = members[kid_outer]
    assert members[c.outer] == new
    assert _inner(new) == 1 and _inner(child) == 2
    assert nspid(f"/proc/{new}/status")[0] == new  # (our number first: one level below ours)
    assert _ns(new) == _ns(child) != _ns(os.getpid())  # (the original's, gone, may give its inode again)
    tids = sorted(nspid(f"/proc/{child}/task/{t}/status")[-1] for t in os.listdir(f"/proc/{child}/task"))
    assert tids == sorted([kid, kid_tid])
    # ckpt's pidfd, which the init held for its child's fds, is gone: the init has the fds it had.
    assert _fds(new) == before
    os.kill(child, signal.SIGUSR1)  # (blocked until the init's own SIGUSR1 wakes it: queued)
    os.kill(new, signal.SIGUSR1)
    assert _lines(r) == sorted(
        [
            f"root ok {pid} {ppid} {pid} {ppid} reaped=True",
            f"child ok {kid} {pid} {kid} {pid} ",
            f"child-thread ok {kid_tid} {kid_tid}",
        ]
    )
    assert _wait_exit(new) == 7


def test_init_alone_with_a_thread(
    tmp_path: Path, init_target: Callable[..., Contained], subreaper: list[int]
) -> None:
    """One process (no child), its namespace's init, with a thread: pid 1 and its tid again; no fd of
    ckpt's left in it (it held ckpt's pidfd above its own while its fds were taken)."""
    c = init_target()
    pid, ppid, tid = c.seen
    assert (pid, ppid) == (1, 0)
    before = _fds(c.outer)
    out = _dump(c.outer, tmp_path / "d", "--kill")
    r, info = _detached(str(out["layer"]), subreaper)
    new = int(info["pid"])  # type: ignore[call-overload]
    assert info["init_pid"] == new and info["warnings"] == [], info
    assert _inner(new) == 1
    tids = sorted(nspid(f"/proc/{new}/task/{t}/status")[-1] for t in os.listdir(f"/proc/{new}/task"))
    assert tids == sorted([1, tid])
    assert _fds(new) == before
    os.kill(new, signal.SIGUSR1)
    assert _lines(r) == [f"root ok {pid} {ppid} {pid} {ppid} ", f"root-thread ok {tid} {tid}"]
    assert _wait_exit(new) == 7


def test_killing_the_restored_init_ends_its_namespace(
    tmp_path: Path, init_target: Callable[..., Contained], subreaper: list[int]
) -> None:
    """The restored init is the namespace's init for the kernel: SIGKILL to it kills its child too."""
    c = init_target("tree")
    kid_outer = c.seen[4]
    out = _dump(c.outer, tmp_path / "d", "--kill")
    r, info = _detached(str(out["layer"]), subreaper)
    new = int(info["pid"])  # type: ignore[call-overload]
    child = {m["dumped_pid"]: int(m["pid"]) for m in info["tree"]}[kid_outer]  # type: ignore[attr-defined]
    os.kill(new, signal.SIGKILL)
    assert _lines(r) == []  # every restored process gone (the pipe's last writer with it)
    _, status = os.waitpid(new, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_pid_one_below_the_root_is_refused() -> None:
    """Pid 1 inside is the namespace's init: only the root of a tree can be restored as it."""
    from ckpt.errors import RestoreError
    from ckpt.restore.pidns import refuse_pid_one

    refuse_pid_one({10: 1, 11: 2}, 10)
    with pytest.raises(RestoreError, match="pid 11 of the dump is to be pid 1"):
        refuse_pid_one({10: 2, 11: 1}, 10)


def test_c_tree_rooted_at_an_init(tmp_path: Path, subreaper: list[int]) -> None:
    """tests/targets/tree.c as its namespace's init (`unshare --pid --fork tree`): a grandchild, a
    zombie (exit 7), a group leader and a session leader below pid 1. Restored, each process has the
    pid it saw (1-6) and checks its pid, parent, group, session and memory itself; the init reaps
    them all (the zombie first) and says `tree ok`."""
    exe = build_c("tree")
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--", str(exe)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        # (Its G is read from /proc/A/..., which names the caller's pid A here: only R is checked.)
        assert line[:2] == ["ready", "1"], line
        (root,) = (int(x) for x in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        assert _inner(root) == 1
        out = _dump(root, tmp_path / "d", "--kill")
        assert out["restorable"], out["not_restorable"]
        assert proc.wait(30) != 0  # (unshare saw its child killed)
        r, info = _detached(str(out["layer"]), subreaper)
        new = int(info["pid"])  # type: ignore[call-overload]
        assert info["init_pid"] == new and info["ns_pid"] == 1, info
        inside = {m["dumped_pid"]: (int(m["pid"]), m["zombie"]) for m in info["tree"]}  # type: ignore[attr-defined]
        assert sorted(_inner(p) for p, _ in inside.values()) == [1, 2, 3, 4, 5, 6]
        assert sum(z for _, z in inside.values()) == 1
        for p, zombie in inside.values():
            if not zombie and p != new:
                os.kill(p, signal.SIGUSR1)
        os.kill(new, signal.SIGUSR1)
        assert r.stdout is not None
        assert _line_within(r.stdout, 120, "the restored tree's init") == "tree ok"
        assert _wait_exit(new) == 0
    finally:
        proc.kill()
        proc.wait()
