"""Shared memory and files that are not plain (issue 12 (B) 4): memfds, deleted files still open or
mapped, a deleted working directory, POSIX and SysV shared memory, shared anonymous huge pages,
O_PATH fds and symlinks, namespace handles.

One C target (tests/targets/objects.c) keeps one kind per run and checks it itself. Each test dumps
it (a full layer; the objects changed; an incremental one with --kill), restores the chain's top
layer, and asks the restored process to check again.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.image import Layer
from ckpt.image.format import FdRecord
from ckpt.restore.plan import _Checker
from tests.test_migrate import Server, migrate, server  # noqa: F401 (a fixture)
from tests.test_restore import Restored, dump, killed, restored  # noqa: F401 (a fixture)
from tests.util import STARTED, LineChannel, Target, run_ckpt

KINDS = [
    "memfd",
    "ghost",
    "cwdgone",
    "posixshm",
    "sysv",
    "sysvrm",
    "hugeshm",
    "opath",
    "nsfd",
    "tcplisten",
    "udp",
]
_libc = ctypes.CDLL(None, use_errno=True)


def _segments(attached: bool = True) -> dict[int, int]:
    """shmid -> key of this IPC namespace's SysV segments (`attached=False`: those attached by none)."""
    out = {}
    with open("/proc/sysvipc/shm") as f:
        next(f)
        for ln in f:
            w = ln.split()
            if attached or w[6] == "0":
                out[int(w[1])] = int(w[0]) & 0xFFFFFFFF
    return out


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """SysV segments with the target's keys and /dev/shm files it made outlive it: removed. Only
    those no live process holds, and files only of targets this test run started: another test run
    on this machine may be using its own (between a `dump --kill` and its restore, no process does)."""
    before = set(_segments())
    yield
    for shmid, key in _segments(attached=False).items():
        if shmid not in before and (key >> 16) == 0x5CE0 and key & 0xFFFF in {p & 0xFFFF for p in STARTED}:
            _libc.shmctl(shmid, 0, None)  # IPC_RMID
    for p in Path("/dev/shm").glob("ckpt-test-*"):
        pid = p.name.rpartition("-")[2]
        if not pid.isdigit() or int(pid) not in STARTED or Path(f"/proc/{pid}").exists():
            continue  # another run's, or still in use (ours is gone by now: the test killed it)
        with contextlib.suppress(OSError):
            p.unlink()


def _objects(spawn: Callable[..., Target], tmp_path: Path, kinds: str) -> Target:
    d = tmp_path / "scratch"
    d.mkdir()
    t = spawn("objects", kinds, str(d), stderr=subprocess.DEVNULL)
    assert t.cmd("check") == "ok"
    return t


def _restore(r: Restored) -> None:
    out = json.loads(r.readline())
    r.set_pid(out["pid"])
    assert r.wait() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_kind_is_restored(
    kind: str,
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t = _objects(spawn, tmp_path, kind)
    d = tmp_path / "d"
    dump(t.pid, d)
    assert t.cmd("check") == "ok"  # the dump left the process as it was
    assert t.cmd("write") == "written"  # the objects change: the incremental layer must carry them
    out = dump(t.pid, d, "--incremental", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"
    assert r.cmd("check") == "ok"  # checking changed nothing


def test_all_kinds_together_from_a_merged_layer(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t = _objects(spawn, tmp_path, ",".join(k for k in KINDS if k != "sysvrm"))
    d = tmp_path / "d"
    dump(t.pid, d)
    out = dump(t.pid, d, "--incremental", "--kill")
    killed(t)
    merged = tmp_path / "merged.ckpt"
    run_ckpt("merge", str(out["layer"]), "-o", str(merged), check=True)
    with Layer.open(merged) as lay:
        kinds = sorted(o.kind for o in lay.meta.objects)
    assert kinds == ["ghost", "memfd", "memfd", "sysv"]
    r = restored(merged, "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"


def test_memfd_contents_are_stored_sparse(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """Only the pages a memfd holds are stored: its holes stay holes."""
    t = _objects(spawn, tmp_path, "memfd")
    out = dump(t.pid, tmp_path / "d")
    with Layer.open(Path(str(out["layer"]))) as lay:
        (m,) = [o for o in lay.meta.objects if o.name == "ckpt-memfd"]
    assert m.size == 64 * 4096 and m.seals == 0x6  # F_SEAL_SHRINK | F_SEAL_GROW
    assert [(e.offset, e.length) for e in m.extents] == [(0, 4096), (2 * 4096, 2 * 4096)]


def test_deleted_file_above_the_limit_is_refused(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = _objects(spawn, tmp_path, "ghost")
    out = dump(t.pid, tmp_path / "d", "--ghost-limit", "4K")
    assert t.cmd("check") == "ok"
    r = run_ckpt("restore", str(out["layer"]))
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert f"deleted file {tmp_path}/scratch/ghost.bin of 8192 bytes" in err, err
    assert "more than the limit of 4096 bytes of data (--ghost-limit)" in err, err


def test_namespace_handle_of_another_namespace_is_refused(
    tmp_path: Path, spawn: Callable[..., Target]
) -> None:
    """A handle on a namespace that is not ckpt restore's own is named, not called a deleted file."""
    t = _objects(spawn, tmp_path, "nsfd")
    out = dump(t.pid, tmp_path / "d")
    with Layer.open(Path(str(out["layer"]))) as lay:
        meta = lay.meta
    (f,) = [f for f in meta.fds if f.path.startswith("net:")]
    assert f.kind == "nsfs"
    other = dict(f.to_dict(), path="net:[1]")
    c = _Checker(meta)
    c.check_fds([FdRecord.from_dict(other, "fd")])
    assert c.unsupported == [
        f"fd {f.fd} (net:[1]) (a handle on a net namespace other than ckpt restore's: "
        "namespaces are not restored)"
    ]


def test_memfd_restores_after_migration_layers_change(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """Three layers, the memfd written between each: the top layer's contents win."""
    t = _objects(spawn, tmp_path, "memfd")
    d = tmp_path / "d"
    dump(t.pid, d)
    dump(t.pid, d, "--incremental")
    assert t.cmd("write") == "written"
    out = dump(t.pid, d, "--incremental", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"


def test_restored_memfd_process_dumps_again(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t = _objects(spawn, tmp_path, "memfd,ghost")
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"
    out2 = dump(r.pid, tmp_path / "d2")
    assert out2["restorable"] is True, out2
    assert r.cmd("check") == "ok"
    os.kill(r.pid, 9)


def test_objects_after_migrate(
    tmp_path: Path,
    spawn: Callable[..., Target],
    server: Callable[..., Server],  # noqa: F811
) -> None:
    """A live migration (loopback): the memfd and the deleted file change between rounds; the
    destination's process has them as they were at the final freeze."""
    t = _objects(spawn, tmp_path, "memfd,ghost,cwdgone,posixshm,hugeshm,opath,nsfd")
    assert t.cmd("write") == "written"
    s = server()
    rc, _, err = migrate(t.pid, s.addr, "--policy", "rounds:2")
    assert rc == 0, err
    s.done()
    assert t.proc.wait(30) == -9
    mig = LineChannel(s.proc, 60)
    assert mig.cmd("check") == "ok"


def _send_q(port: int) -> int:
    """The backlog of the socket listening on `port`, as `ss` shows it (Send-Q of a listener)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True)
    (line,) = out.stdout.splitlines()
    return int(line.split()[2])


def test_listening_sockets_keep_their_backlog(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    t = _objects(spawn, tmp_path, "tcplisten")
    p4, p6 = map(int, t.cmd("ports").split())
    assert (_send_q(p4), _send_q(p6)) == (7, 3)
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    _restore(r)
    assert r.cmd("ports") == f"{p4} {p6}"
    assert (_send_q(p4), _send_q(p6)) == (7, 3)
    assert r.cmd("check") == "ok"


def test_listening_socket_with_waiting_connections_is_refused(
    tmp_path: Path, spawn: Callable[..., Target]
) -> None:
    """A connection in the accept queue at dump time would be lost: refused, named."""
    import socket

    t = _objects(spawn, tmp_path, "tcplisten")
    _, p6 = map(int, t.cmd("ports").split())
    with socket.create_connection(("::1", p6)):
        out = dump(t.pid, tmp_path / "d")
        assert out["restorable"] is False
        assert any(
            f"listening on [::1]:{p6} with 1 connection(s) not yet accepted" in x
            for x in out["not_restorable"]
        ), out  # type: ignore[attr-defined]


@pytest.mark.parametrize("track", ["uffd-wp", "hash"])
def test_memfd_written_through_its_fd_between_layers(
    track: str, tmp_path: Path, spawn: Callable[..., Target]
) -> None:
    """A write through the fd reaches the mapping's pages but no tracker: the incremental layer
    compares memfd mappings whole, so its merged view (ckpt read) has the new bytes."""
    t = _objects(spawn, tmp_path, "memfd")
    d = tmp_path / "d"
    dump(t.pid, d, "--track", track)
    word, addr = t.cmd("fdwrite").split()
    assert word == "written"
    out = dump(t.pid, d, "--incremental")
    r = run_ckpt(
        "read", str(out["layer"]), "--addr", hex(int(addr, 16) + 3 * 4096 + 16), "--size", "9", "--raw"
    )
    assert r.returncode == 0 and r.stdout == "fdwritten", r


def _obj(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"kind": "ghost", "dev": 1, "ino": 2, "name": "/tmp/x", "size": 8192,
                               "mode": 0o100600, "uid": 0, "gid": 0, "extents": []}  # fmt: skip
    return {**base, **kw}


@pytest.mark.parametrize(
    ("rec", "words"),
    [
        (_obj(kind="pipe"), "is not one of memfd, ghost, sysv"),
        (_obj(extents=[{"offset": 4096, "length": 8192, "data": b""}]), "ends past the object's size"),
        (
            _obj(
                extents=[{"offset": 0, "length": 4096, "data": b""}, {"offset": 0, "length": 1, "data": b""}]
            ),
            "overlaps the one before it",
        ),
        (_obj(extents=[{"offset": 0, "length": 5 << 20, "data": b""}]), "length"),
        (_obj(size=1 << 50), "size"),
        (_obj(name="/tmp/x\0y"), "NUL"),
    ],
)
def test_hostile_object_records_are_refused(rec: dict[str, object], words: str) -> None:
    from ckpt.image.objects import objects_from
    from ckpt.image.validate import MetaError

    with pytest.raises(MetaError, match=words):
        objects_from([rec])


def test_extent_that_does_not_decompress_to_its_length() -> None:
    from ckpt.image.objects import Extent, compress_extent
    from ckpt.image.validate import MetaError

    good = compress_extent(0, b"a" * 100)
    assert good.bytes() == b"a" * 100
    with pytest.raises(MetaError, match="extent at 0"):
        Extent(0, 99, good.data).bytes()


@pytest.mark.parametrize("name", ["tmp/x", "/tmp/../etc/x", "/tmp//x", "/tmp/x/"])
def test_ghost_names_a_restore_would_not_create(name: str) -> None:
    from ckpt.image.objects import ObjectRecord
    from ckpt.restore.planobjects import _sane

    class C:
        problems: list[str] = []

    c = C()
    assert not _sane(c, ObjectRecord.from_dict(_obj(name=name), "o"))
    assert c.problems and "not a name a restore can create" in c.problems[0]


def test_sysv_key_taken_by_another_size_is_refused(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = _objects(spawn, tmp_path, "sysv")
    key = 0x5CE00000 | (t.pid & 0xFFFF)
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    (old,) = [i for i, k in _segments().items() if k == key]
    assert _libc.shmctl(old, 0, None) == 0  # IPC_RMID: the dead process's segment goes
    other = _libc.shmget(key, 4096, 0o1000 | 0o600)  # IPC_CREAT, one page instead of three
    assert other >= 0
    r = run_ckpt("restore", str(out["layer"]))
    assert r.returncode == 1, r.stderr
    assert (
        f"SysV shared memory segment {old} (key {key:#x}): the key is in use by a segment of 4096 bytes"
        in r.stderr
    )


def test_unchanged_objects_are_not_stored_again(
    tmp_path: Path,
    spawn: Callable[..., Target],
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """An incremental layer names an unchanged object's contents by digest (`inherited`); the
    restore and merge take them from the older layer."""
    t = _objects(spawn, tmp_path, "memfd,ghost,sysv")
    d = tmp_path / "d"
    dump(t.pid, d)
    out = dump(t.pid, d, "--incremental", "--kill")
    killed(t)
    with Layer.open(Path(str(out["layer"]))) as lay:
        objs = lay.meta.objects
    assert len(objs) == 4 and all(o.inherited and not o.extents and o.digest for o in objs)
    merged = tmp_path / "merged.ckpt"
    run_ckpt("merge", str(out["layer"]), "-o", str(merged), check=True)
    with Layer.open(merged) as lay:
        assert all(not o.inherited and o.stored for o in lay.meta.objects)
        assert sum(len(o.extents) for o in lay.meta.objects) >= 5
    r = restored(Path(str(out["layer"])), "--detach", "--json")
    _restore(r)
    assert r.cmd("check") == "ok"


def test_object_contents_that_do_not_match_their_digest(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """A layer whose checksums are right but whose object bytes are not the digested ones (a buggy
    or hostile writer): verify says so, restore refuses before starting anything."""
    from ckpt.image.objects import compress_extent
    from tests.test_image import meta_dict, reassemble

    t = _objects(spawn, tmp_path, "memfd")
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    path = Path(str(out["layer"]))
    d = meta_dict(path)
    (m,) = [o for o in d["objects"] if o["name"] == "ckpt-memfd"]
    m["extents"][0] = compress_extent(0, b"\x07" * 4096).to_dict()
    reassemble(path, d)
    v = run_ckpt("verify", str(path))
    assert v.returncode != 0 and "memfd 'ckpt-memfd': its contents do not match their digest" in v.stderr, v
    r = run_ckpt("restore", str(path))
    assert r.returncode == 1 and "its contents do not match their digest" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_udp_socket_with_unread_datagrams_is_refused(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = _objects(spawn, tmp_path, "udp")
    assert t.cmd("udppend") == "sent"
    out = dump(t.pid, tmp_path / "d")
    assert out["restorable"] is False
    assert any(
        "the UDP socket 127.0.0.1:" in x and "bytes of datagrams not yet read" in x
        for x in out["not_restorable"]
    ), out  # type: ignore[attr-defined]
