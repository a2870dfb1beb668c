"""Pipes and FIFOs restored with the bytes buffered in them (issue 12 (B) 1).

tests/targets/fdkinds.c holds the pipes and checks them itself (`check` answers "ok" or names what
differs); each test dumps it (a full layer, then an incremental one with --kill), restores the
chain's top layer and asks the restored process to check again. `sort` is the real program.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.test_restore import ENV, Restored, dump, killed, restored, wait_in_syscall  # noqa: F401
from tests.util import ROOT, LineChannel, Target, run_ckpt


def _chain(t: Target, d: Path, *, force: bool = False) -> Path:
    dump(t.pid, d)
    assert t.cmd("check") == "ok"  # the dump took no byte from any pipe
    out = dump(t.pid, d, "--incremental", "--kill", *(["--force"] if force else []))
    killed(t)
    return Path(str(out["layer"]))


def _restore(r: Restored) -> None:
    out = json.loads(r.readline())
    r.set_pid(out["pid"])


def test_pipes_restored_with_their_bytes(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t = spawn("fdkinds", "pipe,follow", stderr=subprocess.DEVNULL)
    assert t.cmd("check") == "ok"
    layer = _chain(t, tmp_path / "d")
    r = restored(layer, "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"
    assert r.cmd("check") == "ok"  # checking changed nothing


def test_full_pipe_of_one_mib(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """A 1 MiB pipe, full (pipe-max-size): every byte is copied by one tee and written back."""
    t = spawn("fdkinds", "bigpipe", stderr=subprocess.DEVNULL)
    assert t.cmd("check") == "ok"
    r = restored(_chain(t, tmp_path / "d"), "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"


def test_fifo_restored_with_its_bytes(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = spawn("fdkinds", "fifo", str(tmp_path), stderr=subprocess.DEVNULL)
    assert t.cmd("check") == "ok"
    layer = _chain(t, tmp_path / "d")  # --kill: the FIFO, open nowhere now, lost its bytes
    r = restored(layer, "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"


def test_fifo_moved_is_refused(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = spawn("fdkinds", "fifo", str(tmp_path), stderr=subprocess.DEVNULL)
    layer = _chain(t, tmp_path / "d")
    fifo.unlink()
    fifo.write_bytes(b"not a fifo")
    r = run_ckpt("restore", str(layer))
    assert r.returncode != 0
    assert "fd 30 (" in r.stderr and "the path now names another file" in r.stderr, r.stderr


def _inheriting(spawn: Callable[..., Target], w: int) -> Target:
    """fdkinds "inherit" with `w` as its fd 3, the way a shell or a job server hands a pipe on."""
    return spawn(
        "fdkinds", "inherit", stderr=subprocess.DEVNULL, pass_fds=(3,), preexec_fn=lambda: os.dup2(w, 3)
    )


def test_inherited_pipe_needs_inherit_fd(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    r0, w0 = os.pipe()
    try:
        t = _inheriting(spawn, w0)
        assert t.cmd("check") == "ok"
        assert os.read(r0, 100) == f"inherited {t.pid}\n".encode()
        ino = os.fstat(w0).st_ino
        out = dump(t.pid, tmp_path / "d", "--kill")  # restorable with --inherit-fd: --kill goes ahead
        killed(t)
        layer = Path(str(out["layer"]))
        r = run_ckpt("restore", str(layer))
        assert r.returncode == 1
        assert f"fd 3 (pipe:[{ino}])" in r.stderr and f"--inherit-fd fd[N]:pipe:[{ino}]" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        r = run_ckpt("restore", str(layer), "--inherit-fd", "fd[0]:socket:[5]")
        assert r.returncode != 0 and "only pipes can be inherited" in r.stderr, r.stderr
    finally:
        os.close(r0)
        os.close(w0)


def test_inherit_fd_gives_a_new_pipe(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    r0, w0 = os.pipe()
    r1, w1 = os.pipe()
    proc = None
    try:
        t = _inheriting(spawn, w0)
        ino = os.fstat(w0).st_ino
        layer = _chain(t, tmp_path / "d")
        os.close(w0)
        os.close(r0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach", "--json",
             "--inherit-fd", f"fd[{w1}]:pipe:[{ino}]"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
            bufsize=0, pass_fds=(w1,),
        )  # fmt: skip
        chan = LineChannel(proc, 60)
        pid = json.loads(chan.readline())["pid"]
        os.close(w1)
        w1 = -1
        assert chan.cmd("check") == "ok"
        assert os.read(r1, 100) == f"inherited {pid}\n".encode()
        chan.send("exit 0")
        assert proc.wait(30) == 0  # ckpt restore --detach left: its orphan is ours (a subreaper)
        assert os.waitpid(pid, 0)[1] == 0  # ours to reap: the `restored` fixture made us a subreaper
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for fd in (r1, w1):
            if fd >= 0:
                os.close(fd)


def test_sort_continues_reading_its_pipe(tmp_path: Path, restored: Callable[..., Restored]) -> None:  # noqa: F811
    """`producer | sort`: sort is dumped with lines still buffered in its stdin pipe, killed, and
    restored reading the same pipe (fds 0-2 are `ckpt restore`'s): it sorts every line."""
    lines = [f"{(i * 7919) % 10007:05d} line {i}\n".encode() for i in range(4000)]
    first, second = b"".join(lines[:2000]), b"".join(lines[2000:])
    out = tmp_path / "sorted.txt"
    r, w = os.pipe()
    env = dict(os.environ, LC_ALL="C")
    with open(out, "wb") as f:
        sort = subprocess.Popen(["sort"], stdin=r, stdout=f, stderr=subprocess.DEVNULL, env=env)
    try:
        os.write(w, first)
        wait_in_syscall(sort.pid, (0,))  # it read what there was and waits for more
        os.kill(sort.pid, signal.SIGSTOP)
        assert os.waitpid(sort.pid, os.WUNTRACED)[1] >> 8 == signal.SIGSTOP
        os.write(w, second)  # buffered in the pipe: sort is stopped
        d = tmp_path / "d"
        dump(sort.pid, d)
        layer = Path(str(dump(sort.pid, d, "--incremental", "--kill")["layer"]))
        assert sort.wait(30) == -signal.SIGKILL
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt", "restore", str(layer)],
            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
        )  # fmt: skip
        os.close(w)
        w = -1
        # It comes back stopped, as dumped (ckpt/restore/jobstop.py): continued, it sorts on.
        assert proc.stderr is not None
        said = proc.stderr.readline().decode()
        assert f"process {sort.pid} left stopped (SIGSTOP)" in said, said + proc.stderr.read().decode()
        os.kill(sort.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if sort.poll() is None:
            sort.kill()
            sort.wait()
        os.close(r)
        if w >= 0:
            os.close(w)
    assert out.read_bytes() == b"".join(sorted(lines))


def test_terminal_dup_above_2_follows(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """fd 6 a dup of fd 2, a terminal (bash keeps its terminal at fd 255 so): both become ckpt
    restore's fd 2, as fds 0-2 always did; before, fd 6 was refused as a terminal beyond 0-2."""
    master, slave = os.openpty()
    try:
        t = spawn("fdkinds", "follow2", stderr=slave)
        assert os.readlink(f"/proc/{t.pid}/fd/6").startswith("/dev/pts/")
        layer = _chain(t, tmp_path / "d")
        r = restored(layer, "--detach", "--json")
        _restore(r)
        assert r.cmd("check") == "ok"
    finally:
        os.close(master)
        os.close(slave)


def test_fifo_that_outlived_the_process_keeps_its_bytes_once(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """Another holder keeps the FIFO, and its 100 bytes, alive across the kill: the restore finds
    them there and does not write them a second time."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = spawn("fdkinds", "fifo", str(tmp_path), stderr=subprocess.DEVNULL)
    keeper = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        layer = _chain(t, tmp_path / "d")
        r = restored(layer, "--detach", "--json")
        _restore(r)
        assert r.cmd("check") == "ok"  # 100 bytes, not 200
    finally:
        os.close(keeper)
