"""One guest session for the workers of an xdist run (tests/vm/session.py start_or_join, end_shared):
the worker that comes second joins the first one's session and waits for its end by pidfd; the
controller ends one still running and removes the directories. A stand-in process plays the
session (its command line names the work directory, as the session's does); no QEMU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .session import RESULT, Joined, end_shared, start_or_join

# Ends at EOF with exit status 0. It says when it runs: right after the exec its command line may
# still read empty (the kernel sets it after the parent of a vfork goes on), and end_shared reads it.
READ = "import sys; print('ready', flush=True); sys.stdin.buffer.read()"


def _started(argv: list[str]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    p.stdout.close()
    return p


def _stand_in(shared: Path, workdir: Path) -> subprocess.Popen[bytes]:
    """A process noted as the session in `shared`: it ends when its stdin is closed."""
    p = _started([sys.executable, "-c", READ, str(workdir)])
    note = {"pid": p.pid, "workdir": str(workdir), "bound_s": 60}
    (shared / "session").write_text(json.dumps(note))
    return p


def test_the_second_worker_joins_and_waits_for_the_end(tmp_path: Path) -> None:
    shared, workdir = tmp_path / "shared", tmp_path / "work"
    shared.mkdir()
    workdir.mkdir()
    p = _stand_in(shared, workdir)
    joined = start_or_join(shared, ["smoke"], False)  # noted already: joined, nothing started
    assert isinstance(joined, Joined) and joined.workdir == workdir
    (workdir / RESULT).write_text(json.dumps({"scenarios": {"smoke": {"exit_status": 0}}}))
    assert p.stdin is not None
    p.stdin.close()  # the session ends: the pidfd becomes readable
    assert joined.result()["scenarios"]["smoke"]["exit_status"] == 0
    assert p.wait(30) == 0
    end_shared(shared)
    assert not shared.exists() and not workdir.exists()


def test_the_controller_ends_a_session_still_running(tmp_path: Path) -> None:
    shared, workdir = tmp_path / "shared", tmp_path / "work"
    shared.mkdir()
    workdir.mkdir()
    p = _stand_in(shared, workdir)
    try:
        end_shared(shared)  # (-x or ^C: the guest tests never asked for it)
        assert p.wait(30) < 0  # SIGTERM
    finally:
        p.kill()
        p.wait()
        if p.stdin is not None:
            p.stdin.close()
    assert not shared.exists() and not workdir.exists()


def test_a_noted_pid_now_another_process_is_left_alone(tmp_path: Path) -> None:
    """The session ended and its pid went to another process: the note's work directory is not in
    that one's command line, so it is not signalled."""
    shared, workdir = tmp_path / "shared", tmp_path / "work"
    shared.mkdir()
    workdir.mkdir()
    other = _started([sys.executable, "-c", READ])
    try:
        note = {"pid": other.pid, "workdir": str(workdir), "bound_s": 60}
        (shared / "session").write_text(json.dumps(note))
        end_shared(shared)
        assert other.poll() is None
    finally:
        assert other.stdin is not None
        other.stdin.close()
        assert other.wait(30) == 0
