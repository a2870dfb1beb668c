"""Process trees (issue 12 B3): `ckpt dump` of a process with children dumps the whole tree, and
`ckpt restore` rebuilds it: each child forked from its restored parent (which can wait() for it),
pids kept, sessions and process groups, zombies with their exit status.

The targets check themselves after the restore (tests/targets/tree.c), as CRIU's zdtm tests do.
The test process is a subreaper, so the processes a --kill leaves behind are ours to reap.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest

from ckpt.image import Layer
from tests.util import ROOT, build_c, run_ckpt

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")


def _open_gate(fifo: Path) -> None:
    """Open `fifo` for writing and close it, which lets a shell blocked in `read x < fifo` on.
    Bounded: if the restored reader is gone (a failed restore), the open would block forever."""
    t = threading.Thread(target=fifo.write_text, args=("",), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"no process opened {fifo} to read within 60 s: the restored one is gone"


def _line_within(stream: IO[bytes], timeout: float, what: str) -> str:
    """One line of `stream`, or a failure naming `what` after `timeout` seconds: a restored process
    that never answers fails the test instead of stalling the run (a thread: the stream is buffered,
    so the line may already be read in, where select on its fd would not see it)."""
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    assert got, f"no line from {what} within {timeout:.0f} s"
    return got[0].decode().strip()


def _reap(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p, 0)


def _start_tree(reap: list[int]) -> tuple[subprocess.Popen[bytes], list[int]]:
    exe = build_c("tree")
    proc = subprocess.Popen(
        [str(exe)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    assert line[0] == "ready", line
    pids = [int(x) for x in line[1:]]
    reap.extend(pids)
    return proc, pids


def _dump(pid: int, d: Path, *extra: str) -> dict[str, object]:
    r = run_ckpt("dump", "--pid", str(pid), "-D", str(d), "--json", *extra, check=True)
    out: dict[str, object] = json.loads(r.stdout)
    return out


def _restore_detached(layer: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach", "--json", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert p.stdout is not None
    first = p.stdout.readline()
    if not first:
        p.wait(60)
        assert p.stderr is not None
        raise AssertionError(f"restore failed: {p.stderr.read().decode()}")
    return p, json.loads(first)


def _check_restored_tree(layer: Path, pids: list[int], reap: list[int]) -> None:
    r, info = _restore_detached(layer)
    root, a, g, z, p, s = pids
    tree = {m["dumped_pid"]: m for m in info["tree"]}  # type: ignore[attr-defined]
    assert info["pid"] == root and info["pid_kept"]
    assert sorted(tree) == sorted(pids)
    assert all(m["pid"] == m["dumped_pid"] for m in tree.values()), tree
    assert tree[z]["zombie"] and not tree[a]["zombie"]
    for x in (g, a, p, s, root):
        os.kill(x, signal.SIGUSR1)
    assert r.stdout is not None
    assert _line_within(r.stdout, 120, "the restored tree's root") == "tree ok"
    assert r.wait(60) == 0
    _, st = os.waitpid(root, 0)  # ckpt restore --detach exited: the root is ours (subreaper)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    _reap(reap)


def test_tree_dump_and_restore(tmp_path: Path, subreaper: list[int]) -> None:
    proc, pids = _start_tree(subreaper)
    root, a, g, z, p, s = pids
    out = _dump(root, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    members = {m["pid"]: m for m in out["tree"]}  # type: ignore[attr-defined]
    assert sorted(members) == sorted([a, g, z, p, s])
    assert members[z]["zombie"] and members[z]["layer"] is None
    assert members[g]["ppid"] == a
    proc.wait(30)
    _reap(subreaper)
    rec = Layer.open(str(out["layer"])).tree
    assert rec is not None
    by = {q.pid: q for q in rec.processes}
    assert by[z].exit_status == 7 << 8
    assert by[p].pgid == p and by[s].sid == s and by[a].pgid == by[root].pgid
    _check_restored_tree(Path(str(out["layer"])), pids, subreaper)


def test_tree_from_incremental_chain(tmp_path: Path, subreaper: list[int]) -> None:
    """A full tree dump, then an incremental one with --kill: every member's chain grows by an
    incremental layer on its own (its tracker armed by the first dump and read by the second), and the
    top root layer restores the whole tree."""
    proc, pids = _start_tree(subreaper)
    root = pids[0]
    d = tmp_path / "d"
    full = _dump(root, d)
    assert full["restorable"], full["not_restorable"]
    inc = _dump(root, d, "--incremental", "--kill")
    assert inc["incremental"] and inc["parent"] == full["layer"]
    for m in inc["tree"]:  # type: ignore[attr-defined]
        if not m["zombie"]:
            assert m["incremental"], m
            assert Path(m["layer"]).name == "layer-0002.ckpt"
            assert Layer.open(m["layer"]).inventory.parent is not None
    proc.wait(30)
    _reap(subreaper)
    _check_restored_tree(Path(str(inc["layer"])), pids, subreaper)


def test_shell_job(tmp_path: Path, subreaper: list[int]) -> None:
    """sh waiting for its background job: restored, it still waits for it, and sees how it ended."""
    script = 'sleep 1000 & echo "ready $!"; wait $!; echo "status $?"'
    proc = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    word, child = proc.stdout.readline().decode().split()
    subreaper.extend([proc.pid, int(child)])
    assert word == "ready"
    out = _dump(proc.pid, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    assert [m["pid"] for m in out["tree"]] == [int(child)]  # type: ignore[attr-defined]
    proc.wait(30)
    _reap(subreaper)
    r, info = _restore_detached(Path(str(out["layer"])))
    assert info["pid"] == proc.pid
    assert r.wait(60) == 0
    os.kill(int(child), signal.SIGTERM)
    assert r.stdout is not None
    assert r.stdout.readline().decode().strip() == f"status {128 + signal.SIGTERM}"
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


def _refused(tmp_path: Path, pid: int, words: str) -> None:
    """Dumped but not restorable for `words`; --kill refuses and the tree runs on; restore refuses."""
    d = tmp_path / "d"
    out = _dump(pid, d)
    assert not out["restorable"]
    assert any(words in w for w in out["not_restorable"]), out["not_restorable"]  # type: ignore[attr-defined]
    r = run_ckpt("dump", "--pid", str(pid), "-D", str(d), "--kill")
    assert r.returncode == 1 and words in r.stderr and "runs on" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    os.kill(pid, 0)
    r = run_ckpt("restore", str(out["layer"]))
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert r.stderr.startswith(f"ckpt: cannot restore the tree of pid {pid}: unsupported: ")


def test_pipeline_with_bytes_in_its_pipe(tmp_path: Path, subreaper: list[int]) -> None:
    """sh running `writer | { ...; sort; }`: the pipe between the two subshells holds bytes the
    reader has not read yet. Restored, the pipe is one pipe again, with those bytes, its write end
    in the writer, its read end in the reader: sort reads them and sees EOF when the writer ends."""
    f = {n: tmp_path / n for n in ("w", "r", "gw", "gr")}
    for p in f.values():
        os.mkfifo(p)
    script = (
        f'{{ printf "3\\n1\\n2\\n"; echo w > {f["w"]}; read x < {f["gw"]}; }} | '
        f"{{ echo r > {f['r']}; read x < {f['gr']}; sort; }}"
    )
    proc = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    subreaper.append(proc.pid)
    assert f["w"].read_text() == "w\n" and f["r"].read_text() == "r\n"  # both subshells are there
    kids = _wait_children(proc.pid, 2)
    subreaper.extend(kids)
    out = _dump(proc.pid, tmp_path / "d", "--kill")
    assert out["restorable"], out["not_restorable"]
    assert sorted(m["pid"] for m in out["tree"]) == sorted(kids)  # type: ignore[attr-defined]
    proc.wait(30)
    _reap(subreaper)
    r, info = _restore_detached(Path(str(out["layer"])))
    assert info["pid"] == proc.pid and all(m["pid"] == m["dumped_pid"] for m in info["tree"])  # type: ignore[attr-defined]
    assert r.wait(60) == 0
    _open_gate(f["gr"])  # the reader goes on to sort, which reads the pipe's bytes
    _open_gate(f["gw"])  # the writer ends: sort sees EOF
    assert r.stdout is not None
    assert r.stdout.read() == b"1\n2\n3\n"  # EOF: every process holding our pipe has ended
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


def test_shared_log_file(tmp_path: Path, subreaper: list[int]) -> None:
    """A shell and its background job writing to one log (`sh ... > log`): one open file, one
    offset. Restored, they still share it: what each writes after the restore follows what the other
    wrote, nothing is overwritten."""
    f = {n: tmp_path / n for n in ("r", "s", "g")}
    for p in f.values():
        os.mkfifo(p)
    log = tmp_path / "log"
    job = f"{{ echo r > {f['r']}; read x < {f['g']}; echo three; }}"
    script = f"echo one; {job} & echo two; echo s > {f['s']}; wait; echo four"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL
        )
    subreaper.append(proc.pid)
    assert f["r"].read_text() == "r\n" and f["s"].read_text() == "s\n"
    kids = _wait_children(proc.pid, 1)
    subreaper.extend(kids)
    d = _dump(proc.pid, tmp_path / "d", "--kill")
    assert d["restorable"], d["not_restorable"]
    rec = Layer.open(str(d["layer"])).tree
    assert rec is not None and (proc.pid, 1, kids[0], 1) in rec.shared_files
    proc.wait(30)
    _reap(subreaper)
    assert log.read_text() == "one\ntwo\n"
    r, _ = _restore_detached(Path(str(d["layer"])))
    assert r.wait(60) == 0
    _open_gate(f["g"])  # the job writes "three" and ends; the shell's wait returns, it writes "four"
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    assert log.read_text() == "one\ntwo\nthree\nfour\n"


def test_shared_eventfd_is_refused(tmp_path: Path, subreaper: list[int]) -> None:
    """An eventfd a parent and its child both hold (one object, one counter): each process would
    get an eventfd of its own, so the tree is refused, naming the fds."""
    code = (
        "import os, signal\n"
        "e = os.eventfd(3)\n"
        "c = os.fork()\n"
        "if c == 0:\n"
        "    signal.pause()\n"
        "print('ready', c, e, flush=True); signal.pause()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    _, c, e = proc.stdout.readline().decode().split()
    subreaper.append(int(c))
    _refused(
        tmp_path,
        proc.pid,
        f"fd {e} of pid {proc.pid} and fd {e} of pid {c} are one open anon_inode:[eventfd]",
    )


def test_group_without_leader_is_refused(tmp_path: Path, subreaper: list[int]) -> None:
    """A process left in a group whose leader exited: no restored process can have that group id."""
    code = (
        "import os, signal\n"
        "r, w = os.pipe()\n"
        "l = os.fork()\n"
        "if l == 0:\n"
        "    os.setpgid(0, 0); os.close(r); os.write(w, b'x'); os.read(0, 1); os._exit(0)\n"
        "os.setpgid(l, l); os.read(r, 1)\n"
        "m = os.fork()\n"
        "if m == 0:\n"
        "    os.setpgid(0, l); os.close(r); os.write(w, b'x'); os.close(w); signal.pause()\n"
        "os.read(r, 1); os.close(r); os.close(w)\n"
        "os.kill(l, 9); os.waitpid(l, 0)\n"
        "print('ready', m, l, flush=True); signal.pause()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    _, m, leader = proc.stdout.readline().decode().split()
    subreaper.append(int(m))
    _refused(tmp_path, proc.pid, f"is in process group {leader}, whose leader is not a process of the tree")


def _wait_children(pid: int, n: int) -> list[int]:
    """The children of `pid`: `n` of them, which its handshake (a line, a FIFO) has shown exist."""
    kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert len(kids) == n, kids
    return kids


def _ids(pid: int) -> tuple[int, int, int, str, int]:
    """(ppid, pgid, sid, state, exit code) from /proc/PID/stat."""
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[2]), int(rest[3]), rest[0], int(rest[49])


def test_pids_in_use_are_mapped(tmp_path: Path, subreaper: list[int]) -> None:
    """Restored with --new-pids while the original tree still runs: every pid is new, and the
    relations (parents, each group and session led by the new pid of its leader, the zombie's
    status) hold through the map, which the JSON gives and stderr reports. (Without --new-pids:
    refused, tests/test_tree_pid_held.py.)"""
    proc, pids = _start_tree(subreaper)
    root, a, g, z, p, s = pids
    out = _dump(root, tmp_path / "d")
    r, info = _restore_detached(Path(str(out["layer"])), "--new-pids")
    new = {m["dumped_pid"]: m["pid"] for m in info["tree"]}  # type: ignore[attr-defined]
    subreaper.extend(new.values())
    assert not info["pid_kept"] and not set(new.values()) & set(pids)
    assert r.wait(60) == 0
    assert r.stderr is not None
    err = r.stderr.read().decode()
    assert f"restored as pid {new[root]}" in err and f"pid {g} restored as pid {new[g]}" in err, err
    _, rpgid, rsid, _, _ = _ids(new[root])
    assert _ids(new[a])[:3] == (new[root], rpgid, rsid)
    assert _ids(new[g])[:3] == (new[a], rpgid, rsid)
    assert _ids(new[p])[:3] == (new[root], new[p], rsid)
    assert _ids(new[s])[:3] == (new[root], new[s], new[s])
    zppid, _, _, state, code = _ids(new[z])
    assert (zppid, state, code) == (new[root], "Z", 7 << 8)
    os.kill(root, signal.SIGKILL)
    proc.wait(30)


def _rec(**changes: object) -> dict[str, object]:
    procs: list[dict[str, object]] = [
        {"pid": 10, "ppid": 1, "pgid": 10, "sid": 10, "layer": None, "digest": None, "exit_status": None},
        {
            "pid": 11,
            "ppid": 10,
            "pgid": 10,
            "sid": 10,
            "layer": "tree/11-5/layer-0001.ckpt",
            "digest": "0" * 32,
        },
        {"pid": 12, "ppid": 10, "pgid": 10, "sid": 10, "layer": None, "digest": None, "exit_status": 7 << 8},
    ]
    for k, v in changes.items():
        i, field = k.split("_", 1)
        procs[int(i[1:])][field] = v
    return {"processes": procs}


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"p1_layer": "../../etc/layer-0001.ckpt"}, "is not a layer under tree/"),
        ({"p1_layer": "/abs/tree/1-1/layer-0001.ckpt"}, "is not a layer under tree/"),
        ({"p1_digest": "zz"}, "32 lowercase hex"),
        ({"p1_ppid": 99}, "is not a process listed before it"),
        ({"p2_pid": 11}, "appears twice"),
        ({"p0_layer": "tree/10-1/layer-0001.ckpt", "p0_digest": "0" * 32}, "the root is the layer itself"),
        ({"p1_layer": None, "p1_digest": None}, "a live process needs a layer"),
        ({"p2_exit_status": 1 << 20}, "exit_status"),
        ({"p2_exit_status": 0x7F}, "not the status of a process that ended"),
        ({"p2_exit_status": 0x0105}, "not the status of a process that ended"),
    ],
)
def test_tree_record_is_checked(changes: dict[str, object], words: str) -> None:
    """The tree record is read from an untrusted image: every field bounded, every layer it names
    inside the root's directory, parents before children."""
    from ckpt.image.tree import TreeRecord
    from ckpt.image.validate import MetaError

    TreeRecord.from_dict(_rec())
    with pytest.raises(MetaError, match=words):
        TreeRecord.from_dict(_rec(**changes))


def test_show_verify_and_a_changed_member(tmp_path: Path, subreaper: list[int]) -> None:
    """show lists the tree; verify checks every member's chain; a member layer that is not the one
    the tree names (here: another member's, swapped in) stops the restore before anything starts."""
    proc, pids = _start_tree(subreaper)
    root, a, g = pids[:3]
    out = _dump(root, tmp_path / "d")
    top = Path(str(out["layer"]))
    shown = json.loads(run_ckpt("show", str(top), "--json", check=True).stdout)
    assert sorted(p["pid"] for p in shown["tree"]["processes"]) == sorted(pids)
    assert "process tree" in run_ckpt("show", str(top), check=True).stdout
    members = {m["pid"]: Path(m["layer"]) for m in out["tree"] if m["layer"]}  # type: ignore[attr-defined]
    checked = run_ckpt("verify", str(top), check=True).stdout
    assert all(str(p) in checked for p in members.values()), checked
    members[a].write_bytes(members[g].read_bytes())
    r = run_ckpt("restore", str(top))
    assert r.returncode == 1 and f"the layer of pid {a}" in r.stderr and "digest differs" in r.stderr, (
        r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1
    assert run_ckpt("verify", str(top)).returncode == 1
    os.kill(root, 0)  # the dumped tree ran on throughout
    proc.kill()
    proc.wait(30)


def test_tree_record_shared_files_name_its_processes() -> None:
    from ckpt.image.tree import TreeRecord
    from ckpt.image.validate import MetaError

    assert TreeRecord.from_dict(dict(_rec(), shared_files=[[10, 1, 11, 1]])).shared_files == [(10, 1, 11, 1)]
    for bad in ([10, 1, 99, 1], [10, 1, 10, 2], [10, 1, 11]):
        with pytest.raises(MetaError, match="shared_files"):
            TreeRecord.from_dict(dict(_rec(), shared_files=[bad]))


def test_incremental_tree_that_grew(tmp_path: Path, subreaper: list[int]) -> None:
    """A child born between two dumps: the incremental tree dump adds an incremental layer to the
    chain of the child that was there, starts a chain for the new one, and the top restores both."""
    g = tmp_path / "g"
    os.mkfifo(g)
    script = f'sleep 1001 & echo "a $!"; read x < {g}; sleep 1002 & echo "b $!"; wait'
    proc = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    subreaper.append(proc.pid)
    assert proc.stdout is not None
    a = int(proc.stdout.readline().split()[1])
    subreaper.append(a)
    d = tmp_path / "d"
    full = _dump(proc.pid, d)
    assert [m["pid"] for m in full["tree"]] == [a]  # type: ignore[attr-defined]
    _open_gate(g)
    b = int(proc.stdout.readline().split()[1])
    subreaper.append(b)
    inc = _dump(proc.pid, d, "--incremental", "--kill")
    assert inc["restorable"], inc["not_restorable"]
    got = {m["pid"]: m for m in inc["tree"]}  # type: ignore[attr-defined]
    assert got[a]["incremental"] and Path(got[a]["layer"]).name == "layer-0002.ckpt"
    assert not got[b]["incremental"] and Path(got[b]["layer"]).name == "layer-0001.ckpt"
    proc.wait(30)
    _reap(subreaper)
    r, info = _restore_detached(Path(str(inc["layer"])))
    assert sorted(m["pid"] for m in info["tree"]) == sorted([proc.pid, a, b])  # type: ignore[attr-defined]
    assert r.wait(60) == 0
    for k in (a, b):
        os.kill(k, signal.SIGTERM)
    _, st = os.waitpid(proc.pid, 0)  # sh's wait saw both of its restored children end
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


def test_child_forked_after_tracking_was_armed(tmp_path: Path, subreaper: list[int]) -> None:
    """A child forked (no exec) after the first dump armed its parent's dirty tracking holds a copy
    of the parent's userfaultfd: ckpt's, not the child's. The incremental tree dump leaves it out,
    and the tree restores: the parent wakes its restored child and reaps its status."""
    code = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "c = os.fork()\n"
        "if c == 0:\n"
        "    signal.pause(); os._exit(5)\n"
        "print('child', c, flush=True)\n"
        "signal.pause()\n"
        "os.kill(c, signal.SIGUSR1)\n"
        "print('status', os.waitstatus_to_exitcode(os.waitpid(c, 0)[1]), flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    subreaper.append(proc.pid)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == b"ready\n"
    d = tmp_path / "d"
    full = _dump(proc.pid, d)
    assert full["tracker"] == "uffd-wp" and full["tree"] == []
    proc.stdin.write(b"fork\n")
    proc.stdin.flush()
    c = int(proc.stdout.readline().split()[1])
    subreaper.append(c)
    inc = _dump(proc.pid, d, "--incremental", "--kill")
    assert inc["restorable"], inc["not_restorable"]
    proc.wait(30)
    _reap(subreaper)
    r, info = _restore_detached(Path(str(inc["layer"])))
    assert [m["pid"] for m in info["tree"]] == [proc.pid, c]  # type: ignore[attr-defined]
    assert r.wait(60) == 0
    os.kill(proc.pid, signal.SIGUSR1)
    assert r.stdout is not None
    assert r.stdout.readline() == b"status 5\n"
    _, st = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
