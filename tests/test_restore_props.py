"""Process properties the kernel shows in /proc or through prctl: each restored, or the restore refuses
naming it (issue 12 (A)). Never restored silently different.

One C target (tests/targets/props.c) sets one property per run and checks it itself: `check` says
"ok" or names what differs. Each test dumps it (a full layer, then an incremental one with --kill),
restores the chain's top layer, and asks the restored process to check again.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_restore import Restored, dump, killed, restored  # noqa: F401 (a fixture)
from tests.util import Target, run_ckpt

# Properties restored as they were.
RESTORED = [
    "shm", "oom", "loginuid", "thp", "rseq", "membarrier", "mlock", "madvise", "guard", "growsdown",
    "filemode", "itimer", "ptimer", "flock", "posixlock", "vdso", "altstack", "robust", "tidaddr",
    "nice", "sched", "affinity", "timerslack", "pdeathsig", "subreaper", "coredump", "ioprio", "sigpending",
    "prctl",
]  # fmt: skip
# Properties the restore refuses, with the words its refusal must contain.
REFUSED: dict[str, str] = {"mseal": "sealed (mseal)", "lease": "a file lease on fd"}


def _props(spawn: Callable[..., Target], tmp_path: Path, prop: str) -> Target:
    f = tmp_path / "scratch.bin"
    f.write_bytes(bytes(range(256)) * 32)
    t = spawn("props", prop, str(f), stderr=subprocess.DEVNULL)
    assert t.cmd("check") == "ok"  # the property holds before any dump
    return t


def _chain(t: Target, d: Path, *, force: bool = False) -> Path:
    """A full dump, then an incremental one that ends the process: the chain's top layer. `force`:
    kill it even though its layer is not restorable (dump --kill refuses that by itself)."""
    dump(t.pid, d)
    assert t.cmd("check") == "ok"  # the dump left the process as it was
    out = dump(t.pid, d, "--incremental", "--kill", *(["--force"] if force else []))
    killed(t)
    return Path(str(out["layer"]))


def _restore(r: Restored) -> None:
    out = json.loads(r.readline())
    r.set_pid(out["pid"])
    assert r.wait() == 0


@pytest.mark.parametrize("prop", RESTORED)
def test_property_is_restored(
    prop: str, tmp_path: Path, spawn: Callable[..., Target], restored: Callable[..., Restored]  # noqa: F811
) -> None:
    t = _props(spawn, tmp_path, prop)
    if prop == "shm":
        assert t.cmd("zap") == "zapped"
    layer = _chain(t, tmp_path / "d")
    r = restored(layer, "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"
    if prop == "growsdown":
        assert r.cmd("grow") == "grew 1"  # it still grows when the page below it is touched
    assert r.cmd("check") == "ok"  # checking changed nothing


@pytest.mark.parametrize("prop", sorted(REFUSED))
def test_property_is_refused(prop: str, tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = _props(spawn, tmp_path, prop)
    layer = _chain(t, tmp_path / "d", force=True)
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1, r.stderr
    assert REFUSED[prop] in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_vdso_moved_between_layers(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """The process moves its [vdso] after the full dump: the incremental layer has it elsewhere."""
    t = _props(spawn, tmp_path, "")
    d = tmp_path / "d"
    dump(t.pid, d)
    assert t.cmd("movevdso") == "moved"
    assert t.cmd("check") == "ok"
    out = dump(t.pid, d, "--incremental", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"
    assert r.cmd("movevdso") == "moved"  # and its vdso is a vdso the kernel knows (mremap works)


@pytest.mark.parametrize("track", ["uffd-wp", "hash"])
def test_shared_page_zapped_between_layers(
    track: str,
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """A shared anonymous page leaves the page table after the full dump (its bytes stay in the
    object): the incremental layer must not call it absent."""
    t = _props(spawn, tmp_path, "shm")
    d = tmp_path / "d"
    dump(t.pid, d, "--track", track)
    assert t.cmd("zap") == "zapped"
    out = dump(t.pid, d, "--incremental", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"
