"""python's multiprocessing.Pool (issue 12 B3/B4): its POSIX semaphores are /dev/shm files, deleted
right after sem_open and mapped shared by every process of the pool. A tree restore makes each such
object once and maps it into every process that had it (restore/treeobjects.py), so the semaphores
stay shared, and their futexes with them.

The pool is stopped mid-way through `imap` over a known computation (its workers wait on a
multiprocessing.Event: a Condition, a Lock and Semaphores, all sem_open'd), dumped with --kill,
restored; a SIGUSR1 to the restored parent sets the event, and the run finishes with the output of
an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_restore_tree import _dump, _reap, _restore_detached, _wait_children

K, N = 6, 16  # items K.. wait for the event; N items in all
POOL = f"""
import hashlib, multiprocessing as mp, os, signal, sys

def work(i):
    if i >= {K}:
        # one write(2): print() to stderr writes each argument apart, so the two workers' lines
        # could interleave on the pipe ("waiting waiting 6 7" then an empty line: seen in CI)
        os.write(2, b"waiting %d\\n" % i)
        ev.wait()
    h = b"%d" % i
    for _ in range(2000):
        h = hashlib.sha256(h).digest()
    return i, h.hex()[:16], mp.current_process().name != "MainProcess"

def go(*_):
    ev.set()

mp.set_start_method("fork")
ev = mp.Event()
signal.signal(signal.SIGUSR1, go)
if "now" in sys.argv:
    ev.set()
with mp.Pool(2) as p:
    for r in p.imap(work, range({N})):
        print(*r, flush=True)
print("done", flush=True)
"""


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", POOL, *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.parametrize("chain", [False, True], ids=["full", "incremental"])
def test_multiprocessing_pool_is_restored(chain: bool, tmp_path: Path, subreaper: list[int]) -> None:
    """`incremental`: a full tree dump first, then the incremental one with --kill (the semaphores'
    contents in the top layers, or inherited from the full ones when unchanged)."""
    plain = _start("now")
    want, err = plain.communicate(timeout=120)
    assert plain.returncode == 0, err
    assert want.decode().splitlines()[-1] == "done" and len(want.splitlines()) == N + 1

    proc = _start()
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    before = [proc.stdout.readline() for _ in range(K)]  # items 0..K-1: both workers are past them
    assert [int(x.split()[0]) for x in before] == list(range(K)), before
    # Both workers are about to wait for the event (in sem_wait, a futex on a shared page).
    assert proc.stderr is not None
    lines = [proc.stderr.readline() for _ in range(2)]
    if not all(lines):  # (seen once in CI: stderr at its end before ckpt ran; say how it ended)
        status = proc.wait(30)
        raise AssertionError(f"the pool ended before its dump: status {status}, stderr {lines!r}, {_ps()}")
    waiting = sorted(ln.split()[1] for ln in lines)
    assert waiting == [b"%d" % K, b"%d" % (K + 1)], lines
    subreaper.extend(_wait_children(proc.pid, 2))
    shm = [ln for ln in Path(f"/proc/{proc.pid}/maps").read_text().splitlines() if "/dev/shm/sem." in ln]
    assert shm and all(ln.endswith("(deleted)") for ln in shm), shm
    if chain:
        assert _dump(proc.pid, tmp_path / "d")["restorable"]
    out = _dump(proc.pid, tmp_path / "d", "--kill", *(["--incremental"] if chain else []))
    assert out["incremental"] == chain
    assert out["restorable"], out["not_restorable"]
    assert proc.wait(30) == -signal.SIGKILL
    _reap(subreaper)

    # --detach: its JSON line comes once every process of the tree runs; what the tree prints after
    # it comes on the same pipe (the restored processes' stdout is the restore's).
    r, info = _restore_detached(Path(str(out["layer"])))
    assert info["pid"] == proc.pid and info["pid_kept"], info
    assert r.wait(60) == 0
    kids = _wait_children(proc.pid, 2)
    for k in kids:  # at the same addresses, one object in every process again
        assert _shm_maps(k) == _shm_maps(proc.pid), k
    os.kill(proc.pid, signal.SIGUSR1)
    assert r.stdout is not None
    rest = r.stdout.read()  # until the last process holding the pipe (the root) ends
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    assert (b"".join(before) + rest).decode() == want.decode()


def _ps() -> str:
    """Our children and what each is (for a failure's message)."""
    kids = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
    return "children: " + "; ".join(
        f"{k} {Path(f'/proc/{k}/stat').read_text().split()[2]}" for k in kids if Path(f"/proc/{k}").exists()
    )


def _shm_maps(pid: int) -> list[tuple[str, str]]:
    """(address range, device:inode) of each semaphore mapping."""
    out = []
    for ln in Path(f"/proc/{pid}/maps").read_text().splitlines():
        w = ln.split()
        if len(w) >= 6 and w[5].startswith("/dev/shm/sem."):
            out.append((w[0], f"{w[3]}:{w[4]}"))
    return sorted(out)
