"""Files opened with a dumped process's rights, many in one thread (ckpt/openas.py open_many_as,
restore/fillsmall.py FileFds): a restore's page work opens each private file mapping's file once,
all of them in one thread, and a file the process could not read is refused where it is needed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ckpt.errors import RestoreError
from ckpt.image.format import TaskRecord
from ckpt.openas import open_as, open_many_as
from ckpt.restore.fillsmall import FileFds

UID = 1001  # no passwd entry needed
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


def _task(uid: int) -> TaskRecord:
    return TaskRecord(uid=(uid,) * 4, gid=(uid,) * 4)


def _files(d: Path) -> tuple[Path, Path, Path]:
    shown, secret = d / "shown.bin", d / "secret.bin"
    shown.write_bytes(b"shown" * 100)
    shown.chmod(0o644)
    secret.write_bytes(b"secret")
    secret.chmod(0o600)  # root's alone
    return shown, secret, d / "missing"


class _Counting(threading.Thread):
    started: list[str] = []

    def start(self) -> None:
        _Counting.started.append(self.name)
        super().start()


def _own_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_many_in_one_thread_each_with_its_answer(public_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four paths (one twice), one thread: an fd for the readable file (its bytes), the errors
    os.open gives uid 1001 for the others; the caller's own credentials untouched."""
    import ckpt.openas

    shown, secret, missing = _files(public_dir)
    _Counting.started = []
    monkeypatch.setattr(ckpt.openas.threading, "Thread", _Counting)
    before = _own_fds()
    got = open_many_as(_task(UID), [str(shown), str(secret), str(missing), str(shown)], os.O_RDONLY)
    assert _Counting.started == ["ckpt-open-as"]
    assert isinstance(got[0], int) and isinstance(got[3], int) and got[0] != got[3]
    assert isinstance(got[1], PermissionError) and got[1].filename == str(secret)
    assert isinstance(got[2], FileNotFoundError) and got[2].filename == str(missing)
    for fd in (got[0], got[3]):
        assert os.pread(fd, 5, 0) == b"shown"
        assert not os.get_inheritable(fd)  # O_CLOEXEC
        assert os.stat(f"/proc/self/fd/{fd}").st_ino == shown.stat().st_ino
        os.close(fd)
    assert _own_fds() == before
    assert os.geteuid() == 0 and os.getegid() == 0
    status = Path("/proc/thread-self/status").read_text()
    assert "\nUid:\t0\t0\t0\t0\n" in status and "\nGid:\t0\t0\t0\t0\n" in status
    # As root the same paths all open but the missing one: the rights are the task's, not ckpt's.
    fd = open_as(_task(0), str(secret), os.O_RDONLY)
    assert os.read(fd, 6) == b"secret"
    os.close(fd)


def test_open_as_keeps_its_answers(public_dir: Path) -> None:
    """open_as (now one open_many_as): the fd, or the error raised."""
    shown, secret, _ = _files(public_dir)
    fd = open_as(_task(UID), str(shown), os.O_RDONLY)
    try:
        assert os.read(fd, 5) == b"shown"
    finally:
        os.close(fd)
    with pytest.raises(PermissionError):
        open_as(_task(UID), str(secret), os.O_RDONLY)


def test_file_fds_refuse_where_asked(public_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FileFds.open_all opens every file in one thread; get() of a file uid 1001 cannot read is
    the restore's one line, get() of a readable one its fd (the same each time); close() leaves
    no descriptor."""
    import ckpt.openas

    shown, secret, missing = _files(public_dir)
    _Counting.started = []
    monkeypatch.setattr(ckpt.openas.threading, "Thread", _Counting)
    before = _own_fds()
    files = FileFds(_task(UID))
    try:
        files.open_all([str(shown), str(secret), str(shown), str(missing)])
        assert len(_Counting.started) == 1
        fd = files.get(str(shown))
        assert files.get(str(shown)) == fd and os.pread(fd, 5, 0) == b"shown"
        with pytest.raises(RestoreError, match=f"^cannot read {secret}: Permission denied$"):
            files.get(str(secret))
        with pytest.raises(RestoreError, match=f"^cannot read {missing}: No such file or directory$"):
            files.get(str(missing))
        files.open_all([str(shown)])  # nothing new: no thread
        assert len(_Counting.started) == 1
        other = public_dir / "later.bin"
        other.write_bytes(b"later")
        other.chmod(0o644)
        assert os.pread(files.get(str(other)), 5, 0) == b"later"  # not opened before: opened now
        assert len(_Counting.started) == 2
    finally:
        files.close()
    assert _own_fds() == before
