"""Findings of the review of the merged tree, each on a real process: restore exactly or refuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
