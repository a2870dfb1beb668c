"""Refusals that name what they refuse, and edges that failed unclearly (issue 12 (A), the review's
leftovers): a POSIX message queue fd is named; a working directory literally named "x (deleted)" is
told from a removed one at dump, not on the restore host; an image path longer than the kernel's
PATH_MAX is a malformed layer, named; a pid-1 restore whose root's highest fd is RLIMIT_NOFILE-1
finds ckpt's pidfd another place. Real processes throughout."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from tests.fuzzing import meta_of, pack, with_meta
from tests.test_pidns import _detached, _inner
from tests.test_restore import dump, killed
from tests.util import ROOT, Target, run_ckpt

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: "), r.stderr
    return lines[0]


MQ = """
import ctypes, os, sys
rt = ctypes.CDLL("librt.so.1", use_errno=True)
rt.mq_open.restype = ctypes.c_int
name = f"/ckpt-test-mq-{os.getpid()}".encode()
q = rt.mq_open(name, os.O_RDWR | os.O_CREAT, 0o600, None)
assert q >= 0, os.strerror(ctypes.get_errno())
print("ready", q, name.decode(), flush=True)
sys.stdin.readline()
rt.mq_unlink(name)
"""


def test_a_message_queue_fd_is_named(tmp_path: Path) -> None:
    t = Target([sys.executable, "-c", MQ])  # its stderr to pytest: a failed mq_open shows why
    name = ""
    try:
        _, q, name = t.ready.split()
        r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill")
        line = _one_line(r)
        assert f"fd {q} (" in line and f"a POSIX message queue {name}" in line, line
        assert t.proc.poll() is None  # refused before the kill
    finally:
        t.close()
        # The killed target never unlinks it: a queue left stays charged to root's RLIMIT_MSGQUEUE
        # (~9 default queues) and, runs later, every mq_open here failed with EMFILE.
        if name:
            ctypes.CDLL("librt.so.1").mq_unlink(name.encode())


CWD = """
import os, sys
os.chdir(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    print(os.readlink("/proc/self/cwd"), flush=True)
"""


def test_cwd_literally_named_deleted_is_refused_at_dump(tmp_path: Path) -> None:
    lit = tmp_path / "x (deleted)"
    lit.mkdir()
    t = Target([sys.executable, "-c", CWD, str(lit)], stderr=subprocess.DEVNULL)
    try:
        line = _one_line(run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill"))
        assert "a working directory whose name ends in ' (deleted)'" in line and str(lit) in line, line
        assert t.proc.poll() is None
    finally:
        t.close()


def test_removed_cwd_restored_though_its_name_exists_here(tmp_path: Path) -> None:
    """The restore host has a directory named like the removed one's /proc name: before, the restore
    took the removed directory for a literal name and refused; the dump tells now."""
    gone = tmp_path / "x"
    gone.mkdir()
    t = Target([sys.executable, "-c", CWD, str(gone)], stderr=subprocess.DEVNULL)
    try:
        gone.rmdir()
        layer = Path(str(dump(t.pid, tmp_path / "d", "--kill")["layer"]))
        killed(t)
    finally:
        t.close()
    (tmp_path / "x (deleted)").mkdir()  # what /proc showed, now a real name
    r = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(layer)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    out, err = r.communicate(b"cwd\n", timeout=120)
    assert r.returncode == 0, err.decode()
    assert out.decode().strip() == f"{gone} (deleted)"  # removed again, as it was


def test_an_overlong_image_path_is_a_named_malformed_layer(tmp_path: Path) -> None:
    t = Target([sys.executable, "-c", CWD, "/"], stderr=subprocess.DEVNULL)
    try:
        layer = Path(str(dump(t.pid, tmp_path / "d", "--kill")["layer"]))
        killed(t)
    finally:
        t.close()
    raw = layer.read_bytes()
    for field in ("cwd", "fd"):
        meta = meta_of(raw)
        if field == "cwd":
            meta["mm"]["cwd"] = "/" + "a" * 13000  # beyond the restore's 12 KiB scratch area too
        else:
            meta["fds"][-1]["path"] = "/" + "a" * 13000
        bad = tmp_path / f"bad-{field}.ckpt"
        bad.write_bytes(with_meta(raw, pack(meta)))
        line = _one_line(run_ckpt("restore", str(bad)))
        assert "metadata is invalid" in line and "string of 13001 characters" in line, line
        assert "internal" not in line and len(line) < 300, line


INIT = """
import os, resource, signal
top = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
fd = os.open("/dev/null", os.O_RDONLY)
os.dup2(fd, top, inheritable=False)
os.close(fd)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
os.write(1, f"ready {os.readlink('/proc/self')} {os.getpid()} {top}\\n".encode())
signal.sigwait({signal.SIGUSR1})
os._exit(7 if os.readlink(f"/proc/self/fd/{top}") == "/dev/null" else 3)
"""


def test_pid_one_with_an_fd_at_the_rlimit(tmp_path: Path, subreaper: list[int]) -> None:
    """The root, its namespace's init, holds fd RLIMIT_NOFILE-1 (ckpt's limit is the same): ckpt's
    pidfd cannot go above it, and goes into the lowest gap; the fd table comes back exact."""
    p = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--", sys.executable, "-c", INIT],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert p.stdout is not None
        word, outer, inner, top = p.stdout.readline().decode().split()
        assert word == "ready" and inner == "1"
        assert int(top) == resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
        before = sorted(os.listdir(f"/proc/{outer}/fd"), key=int)
        assert before[-1] == top
        out = json.loads(
            run_ckpt("dump", "--pid", outer, "-D", str(tmp_path / "d"), "--json", "--kill", check=True).stdout
        )
        _, info = _detached(str(out["layer"]), subreaper)
        new = int(info["pid"])
        assert info["init_pid"] == new and _inner(new) == 1, info
        assert sorted(os.listdir(f"/proc/{new}/fd"), key=int) == before  # no pidfd of ckpt's left
        os.kill(new, signal.SIGUSR1)
        _, st = os.waitpid(new, 0)
        assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 7
    finally:
        p.kill()
        p.wait(30)
        if p.stdout:
            p.stdout.close()
