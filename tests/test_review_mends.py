"""Findings of the review of the merged tree, each on a real process: restore exactly or refuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fuzzing import meta_of, pack, with_meta
from tests.test_restore import Restored, dump, killed, restored  # noqa: F401 (a fixture)
from tests.util import Target, run_ckpt


@pytest.fixture
def uts_sleeper() -> Iterator[int]:
    """A sleep in a UTS namespace of its own whose parent (sh) shares it: the pid of the sleep."""
    proc = subprocess.Popen(
        ["unshare", "-u", "sh", "-c", "hostname other-$$; sleep 1000 & echo $!; wait"],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()


def test_namespace_shared_with_parent_is_refused(tmp_path: Path, uts_sleeper: int) -> None:
    """Its parent's namespace is not the environment's: restored into ckpt's, the hostname would
    differ, so the restore refuses naming the uts namespace (and the dump left it running)."""
    ino = os.stat(f"/proc/{uts_sleeper}/ns/uts").st_ino
    out = dump(uts_sleeper, tmp_path / "d")
    r = run_ckpt("restore", str(out["layer"]))
    assert r.returncode == 1 and r.stderr.startswith("ckpt: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"a uts namespace of its own (uts:[{ino}]" in r.stderr, r.stderr
    assert os.stat(f"/proc/{uts_sleeper}/ns/uts").st_ino == ino  # still there, untouched


def test_many_timers_dump_and_restore(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """60 timers: the leader's questions take several injected runs, the mlockall probe's Refs
    among them; a full dump, an incremental one after many new mappings, the restore has them all."""
    t = spawn("manytimers", "60")
    dump(t.pid, tmp_path / "untracked", "--track", "none")
    assert t.cmd("check") == "ok"
    d = tmp_path / "d"
    dump(t.pid, d)
    assert t.cmd("map 200") == "mapped 200"
    out = dump(t.pid, d, "--incremental", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    got = json.loads(r.readline())
    r.set_pid(got["pid"])
    assert r.wait() == 0
    assert r.cmd("check") == "ok"
    assert r.cmd("map 3") == "mapped 3"
    assert r.cmd("check") == "ok"


def test_hostile_socket_option_is_refused(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """A unix socket option past an int's range in the layer: one line naming it, no traceback."""
    t = spawn("fdkinds", "socket", str(tmp_path), stderr=subprocess.DEVNULL)
    assert t.cmd("check") == "ok"
    layer = Path(str(dump(t.pid, tmp_path / "d", "--kill")["layer"]))
    killed(t)
    raw = layer.read_bytes()
    meta = meta_of(raw)
    unix = [a for a in meta["anonfds"] if "so_rcvbuf" in a["ints"]]
    assert unix
    unix[0]["ints"]["so_rcvbuf"] = 1 << 40
    layer.write_bytes(with_meta(raw, pack(meta)))
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1 and r.stderr.startswith("ckpt: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"fd {unix[0]['fd']}" in r.stderr and "so_rcvbuf" in r.stderr, r.stderr


DUPS = """
import os, sys
a = os.open(sys.argv[1], os.O_RDWR)
b = os.dup(a)
c = os.open(sys.argv[2], os.O_RDONLY)
os.lseek(a, 7, 0)
print("ready", a, b, c, flush=True)
for line in sys.stdin:
    if line.startswith("seek"):
        os.lseek(a, 100, 0)
    print(os.lseek(a, 0, 1), os.lseek(b, 0, 1), os.lseek(c, 0, 1), flush=True)
"""


@pytest.mark.parametrize("case", ["other-file", "later", "missing", "none"])
def test_dup_of_must_name_the_same_file(
    case: str,
    tmp_path: Path,
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """A dup_of naming another file, a later fd or none at all: refused naming the fd. As dumped,
    the dup shares its description's offset after the restore."""
    (tmp_path / "one").write_bytes(bytes(4096))
    (tmp_path / "two").write_bytes(bytes(4096))
    t = Target([sys.executable, "-c", DUPS, str(tmp_path / "one"), str(tmp_path / "two")])
    try:
        a, b, c = (int(x) for x in t.ready.split()[1:])
        layer = Path(str(dump(t.pid, tmp_path / "d", "--kill")["layer"]))
        killed(t)
    finally:
        t.close()
    if case == "none":
        r = restored(layer, "--detach", "--json")
        r.set_pid(json.loads(r.readline())["pid"])
        assert r.wait() == 0
        assert r.cmd("pos") == "7 7 0"
        assert r.cmd("seek") == "100 100 0"
        return
    raw = layer.read_bytes()
    meta = meta_of(raw)
    fds = {f["fd"]: f for f in meta["fds"]}
    assert fds[b]["dup_of"] == a and "dup_of" not in fds[c]
    bad, src = {"other-file": (c, a), "later": (a, b), "missing": (b, 1000)}[case]
    fds[bad]["dup_of"] = src
    layer.write_bytes(with_meta(raw, pack(meta)))
    r2 = run_ckpt("restore", str(layer))
    assert r2.returncode == 1 and r2.stderr.startswith("ckpt: ") and len(r2.stderr.splitlines()) == 1, (
        r2.stderr
    )
    assert f"fd {bad} (" in r2.stderr and f"a dup of fd {src}" in r2.stderr, r2.stderr


# ckpt dump run under a seccomp filter of its own: the kernel refuses it PTRACE_O_SUSPEND_SECCOMP.
_DUMP_UNDER_FILTER = r"""
import ctypes, os, sys

class Insn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)
    ]

class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

libc = ctypes.CDLL(None, use_errno=True)
allow = (Insn * 1)(Insn(0x06, 0, 0, 0x7FFF0000))  # BPF_RET|BPF_K SECCOMP_RET_ALLOW
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(Prog(1, allow)), 0, 0) == 0  # PR_SET_SECCOMP, FILTER
os.execv(sys.executable, [sys.executable, "-m", "ckpt", *sys.argv[1:]])
"""


@pytest.mark.parametrize("mode", ["strict", "filter"])
def test_seccomp_target_refused_when_seccomp_cannot_be_suspended(
    mode: str, tmp_path: Path, spawn: Callable[..., Target]
) -> None:
    """Its seccomp would meet the injected syscalls: the dump refuses, naming the mode, and the
    target goes on answering, untraced."""
    t = spawn("seccompmode", mode)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), NO_COLOR="1")
    cmd = [sys.executable, "-c", _DUMP_UNDER_FILTER, "dump", "--pid", str(t.pid), "-D", str(tmp_path / "d")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and r.stderr.startswith("ckpt: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"seccomp {mode} mode" in r.stderr, r.stderr
    assert t.tracer() == 0 and t.state() in ("S", "R")
    assert t.cmd("ping") == "pong"
    assert not list(tmp_path.glob("d/*.ckpt"))  # no layer, not even half a one


def test_many_thread_keyrings_are_one_refusal(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """70 threads with a keyring each: the dump still writes its layer (one refused entry, not 70
    past the 64 a layer keeps), and the restore refuses naming them."""
    t = spawn("keyrings", "70")
    layer = Path(str(dump(t.pid, tmp_path / "d")["layer"]))
    assert t.cmd("ping") == "pong"
    refused = meta_of(layer.read_bytes())["props"]["refused"]
    assert (
        len(refused) == 1
        and refused[0].startswith("a thread keyring in thread ")
        and "and 62 more" in refused[0]
    )
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "thread keyring" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("namespaces", [[]], "namespaces[0]: expected [type, inode]"),
        ("namespaces", [["uts"]], "namespaces[0]: expected [type, inode]"),
        ("refused", ["two\nlines"], "refused[0]: not a printable line"),
        ("refused", ["\x1b[2Jescape"], "refused[0]: not a printable line"),
    ],
)
def test_hostile_props_entries_are_rejected(tmp_path: Path, spawn: Callable[..., Target], key: str,
                                            value: object, words: str) -> None:  # fmt: skip
    t = spawn("manytimers", "1")
    layer = Path(str(dump(t.pid, tmp_path / "d")["layer"]))
    raw = layer.read_bytes()
    meta = meta_of(raw)
    meta["props"][key] = value
    layer.write_bytes(with_meta(raw, pack(meta)))
    r = run_ckpt("restore", str(layer))
    assert r.returncode != 0 and r.stderr.startswith("ckpt: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert words in r.stderr and "internal error" not in r.stderr, r.stderr
