"""ckpt/forkwarm.py: what makes a served dump's freeze as short as a warm process's.

own_pages(), in a forked child, makes the pages HOT names its own at once, then (its thread left to
finish) every present page of its private writable mappings (PM_MMAP_EXCLUSIVE in its own
/proc/self/pagemap), changing no byte of them, and ready() stops that thread; rehearse() dumps its
helper a full and N incremental times, learns HOT from one more in a fork (the pages that dump's
freeze wrote: shared with this process before, its own after), then leaves no helper, no directory,
no thread behind, and cleans up the same when a dump fails. Each runs in a fresh python3 of its own (a
fork of this test process would copy an xdist worker's state; rehearse() waits for every other
thread of its process to end, and an xdist worker keeps some).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from tests.util import HYPOTHESIS_SEED, ROOT

WAIT = 120
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

OWN_PAGES = r"""
import ctypes, hashlib, json, mmap, os, struct, sys, threading
from ckpt import forkwarm

EXCLUSIVE, PRESENT = 1 << 56, 1 << 63
data = bytearray(os.urandom(4 << 20))  # present, written: shared with the child after the fork
digest = hashlib.sha256(data).hexdigest()
# Two private pages, written, in two mappings side by side (the second's flags differ: not merged).
two = mmap.mmap(-1, 2 * 4096, flags=mmap.MAP_PRIVATE)
two.write(b"a" * 4096 + b"b" * 4096)
two.madvise(mmap.MADV_NOHUGEPAGE, 4096, 4096)
pair = ctypes.addressof(ctypes.c_char.from_buffer(two))
with open("/proc/self/maps") as f:
    assert sum(int(x.split("-")[0], 16) in (pair, pair + 4096) for x in f) == 2, "not two mappings"

def shared(spans):
    # Present pages of these spans that this process still shares (not exclusively mapped).
    n = 0
    with open("/proc/self/pagemap", "rb") as f:
        for lo, hi in spans:
            f.seek(lo // 4096 * 8)
            for (v,) in struct.iter_unpack("<Q", f.read((hi - lo) // 4096 * 8)):
                n += bool(v & PRESENT) and not v & EXCLUSIVE
    return n

r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    spans = forkwarm.present_private()
    before = shared(spans)
    buf = ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))
    lo = (buf // 4096 + 8) * 4096  # (a page inside the data: present, and shared since the fork)
    # HOT as learned: the data page, and a shared mapping the service never had there (a stale
    # address): never written, so never made present.
    shm = mmap.mmap(-1, 4 * 4096, flags=mmap.MAP_SHARED)
    sa = ctypes.addressof(ctypes.c_char.from_buffer(shm))
    # And a span across two mappings side by side (as learn() merges the top page of a thread's
    # stack, VM_NOHUGEPAGE since Linux 6.7, with the first of the mapping above it).
    forkwarm.HOT = sorted([(lo, lo + 4096), (sa, sa + 4 * 4096), (pair, pair + 2 * 4096)])
    hot_before = shared([(lo, lo + 4096)]), shared([(pair, pair + 2 * 4096)])
    forkwarm.own_pages()
    # (at once: before its thread's turn)
    hot_after = shared([(lo, lo + 4096)]), shared([(pair, pair + 2 * 4096)])
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(sa // 4096 * 8)
        shm_present = sum(v >> 63 for (v,) in struct.iter_unpack("<Q", f.read(4 * 8)))
    forkwarm._populating[0].join()  # the rest, left to finish
    forkwarm.ready()
    out = {"before": before, "after": shared(spans), "digest": hashlib.sha256(data).hexdigest(),
           "pair": two[:] == b"a" * 4096 + b"b" * 4096,
           "hot": [hot_before, hot_after], "threads": threading.active_count(), "shm": shm_present}
    os.write(w, json.dumps(out).encode())
    os._exit(0)
os.close(w)
got = json.loads(os.read(r, 1 << 16))
os.waitpid(pid, 0)
got["parent_digest"] = digest
print(json.dumps(got))
"""

REHEARSE = r"""
import json, os, sys, tempfile, threading
from ckpt import forkwarm
from ckpt.errors import CkptError
from ckpt.ptrace.sigchld import blocked
from ckpt.ranges import subtract

tempfile.tempdir = sys.argv[1]
seen = []
def failing(pid, d, **kw):
    seen.append(pid)
    raise CkptError("no dump here")
out = {}
with blocked():
    if sys.argv[2] == "fail":
        try:
            forkwarm.rehearse(3, dump=failing)
        except CkptError as e:
            out["error"] = str(e)
        pid = seen[0]
    else:
        from ckpt.api import dump
        def counted(pid, d, **kw):
            seen.append((pid, kw.get("incremental", False), len(os.listdir(d))))
            return dump(pid, d, **kw)
        out["rehearsal"] = forkwarm.rehearse(2, dump=counted)
        out["dumps"] = seen
        pid = seen[0][0]
        # Every learned page in private writable memory; a span may cross from one such mapping into
        # the next (a thread's stack and the mapping above it: learn() merges pages, not mappings).
        out["hot_inside"] = all(a % 4096 == 0 and b % 4096 == 0 for a, b in forkwarm.HOT) and not subtract(
            forkwarm.HOT, forkwarm._private_writable()
        )
out["helper_gone"] = not os.path.exists(f"/proc/{pid}")
out["left"] = os.listdir(sys.argv[1])
out["tasks"] = len(os.listdir("/proc/self/task"))
out["threads"] = threading.active_count()
print(json.dumps(out))
"""


def _run(script: str, *args: str) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=WAIT, env=ENV, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_own_pages_leaves_no_page_shared_and_no_byte_changed() -> None:
    got = _run(OWN_PAGES)
    assert got["before"] >= (4 << 20) // 4096  # the child shared at least the 4 MiB written before the fork
    assert got["after"] == 0
    assert got["hot"] == [[1, 2], [0, 0]]  # the learned pages made its own at once, across mappings too
    assert got["pair"]
    assert got["shm"] == 0  # a learned address now in a shared mapping: left alone
    assert got["digest"] == got["parent_digest"]
    assert got["threads"] == 1


STOPPED = r"""
import json, threading, time
from ckpt import forkwarm
import os
data = bytearray(os.urandom(16 << 20))
pid = os.fork()
if pid == 0:
    forkwarm.STEP = 4096  # (one page a call: the thread is still at work when ready() comes)
    forkwarm.own_pages()
    t = forkwarm._populating[0]
    forkwarm.ready()
    print(json.dumps({"alive": t.is_alive(), "threads": threading.active_count()}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_ready_stops_the_thread() -> None:
    """ready() does not wait for the rest: it stops the thread, which has ended when it returns."""
    assert _run(STOPPED) == {"alive": False, "threads": 1}


def test_rehearse_dumps_full_then_incremental_and_leaves_nothing(tmp_path: Path) -> None:
    got = _run(REHEARSE, str(tmp_path), "ok")
    dumps = got["dumps"]
    assert isinstance(dumps, list) and len(dumps) == 3  # (and one more in the fork that learns HOT)
    assert [inc for _, inc, _ in dumps] == [False, True, True]
    assert len({pid for pid, _, _ in dumps}) == 1  # one helper, dumped three times
    assert 0 not in [n for _, _, n in dumps][1:]  # each incremental on top of the layers before
    rehearsal = got["rehearsal"]
    assert isinstance(rehearsal, dict) and rehearsal["dumps"] == 3
    assert rehearsal["hot_pages"] > 0 and got["hot_inside"]
    assert got["helper_gone"] and got["left"] == []
    assert (got["tasks"], got["threads"]) == (1, 1)


def test_a_failed_rehearsal_leaves_nothing(tmp_path: Path) -> None:
    got = _run(REHEARSE, str(tmp_path), "fail")
    assert got["error"] == "no dump here"
    assert got["helper_gone"] and got["left"] == []
    assert (got["tasks"], got["threads"]) == (1, 1)


def _created_in(path: Path) -> int:
    """An inotify descriptor that becomes readable when something is created in ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    assert libc.inotify_add_watch(fd, os.fsencode(path), 0x100) >= 0  # IN_CREATE
    return int(fd)


def _with_env(needle: bytes) -> list[int]:
    """Processes whose environment holds ``needle``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read():
                        out.append(int(name))
            except OSError:
                pass
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_during_the_rehearsal_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    """A service asked to stop (SIGTERM, SIGINT, SIGHUP) while it rehearses: its helper killed, the
    rehearsal's directory and the socket removed, exit 0, nothing listened on. (A first version
    raised from the signal handler, and once left tempfile's probe file in TMPDIR.)"""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    sock = tmp_path / "svc" / "sock"
    watch = _created_in(tmp)
    env = dict(ENV, TMPDIR=str(tmp))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "service", "--socket", str(sock), "--json", "--rehearse", "200"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert select.select([watch], [], [], WAIT)[0], "no rehearsal directory was made"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        os.close(watch)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (0, b"", b"")
    assert os.listdir(tmp) == [] and not sock.exists()
    assert _with_env(f"TMPDIR={tmp}".encode()) == []  # (its helper, its fork: gone)


def _spans(draw: st.DrawFn) -> list[tuple[int, int]]:
    cuts = sorted(set(draw(st.lists(st.integers(0, 60), max_size=12))))
    return [(a * 4096, b * 4096) for a, b in zip(cuts[::2], cuts[1::2], strict=False)]


@seed(HYPOTHESIS_SEED)
@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_within_is_the_intersection(data: st.DataObject) -> None:
    """ranges.intersect (what clips the learned pages to this process's private writable memory):
    exactly the pages both span lists hold, as sorted disjoint spans."""
    from ckpt.ranges import intersect

    a, b = _spans(data.draw), _spans(data.draw)
    got = intersect(a, b)
    pages = {p for lo, hi in got for p in range(lo, hi, 4096)}
    want = {p for lo, hi in a for p in range(lo, hi, 4096)} & {p for lo, hi in b for p in range(lo, hi, 4096)}
    assert pages == want
    assert all(lo < hi for lo, hi in got) and all(x[1] <= y[0] for x, y in itertools.pairwise(got))


PREPARED = r"""
import json, os, subprocess, threading
from ckpt import forkwarm
from ckpt.ptrace import Frozen
data = bytearray(os.urandom(16 << 20))
target = subprocess.Popen(["sleep", "60"])
pid = os.fork()
if pid == 0:
    forkwarm.STEP = 4096  # (one page a call: the thread is still at work when the freeze comes)
    forkwarm.own_pages()
    t = forkwarm._populating[0]
    fz = Frozen(target.pid)
    fz.prepare()  # (any freeze's first step: a dump's, a tree member's, a resumed stop's)
    out = {"alive": t.is_alive(), "threads": threading.active_count()}
    fz.thaw()
    print(json.dumps(out), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
target.kill()
target.wait()
"""


def test_any_freeze_stops_the_thread() -> None:
    """The thread is stopped by the freeze's own preparation, whoever freezes (not by a call in one
    kind of dump), before anything is seized."""
    assert _run(PREPARED) == {"alive": False, "threads": 1}
