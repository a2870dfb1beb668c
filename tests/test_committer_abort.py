"""The source's committer (ckpt/migrate/source.py _Committer) once the migration is abandoned: its
before-READY step (the TCP records' stash, migrate/tcpmove.py) is not run.

The committer is held at its "final-footer" point (migrate/testhold.py, CKPT_MIGRATE_TEST_PAUSE),
after it was released and before that step; the migration is abandoned there (stop(), as the main
thread does on a failure or Ctrl-C), then the committer goes on. Real thread, real socket pair as
the migration's connection."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from ckpt.migrate import wire
from ckpt.migrate.source import _Committer

WAIT = 30.0


@pytest.fixture
def paused(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """(the fd the committer says its point on, the fd that lets it go on)."""
    said_r, said_w = os.pipe()
    go_r, go_w = os.pipe()
    monkeypatch.setenv("CKPT_MIGRATE_TEST_PAUSE", "final-footer")
    monkeypatch.setenv("CKPT_MIGRATE_TEST_HOLD_FD", str(said_w))
    monkeypatch.setenv("CKPT_MIGRATE_TEST_PAUSE_FD", str(go_r))
    yield said_r, go_w
    for fd in (said_r, said_w, go_r, go_w):
        os.close(fd)


def _run(paused: tuple[int, int], abandon: bool) -> list[str]:
    said, go = paused
    ours, theirs = socket.socketpair()
    stashed: list[str] = []
    c = _Committer(wire.Channel(ours), before_ready=lambda: stashed.append("stash"))
    try:
        c.start()
        c.release()  # (END is out)
        assert select.select([said], [], [], WAIT)[0], "the committer did not reach final-footer"
        assert os.read(said, 64) == b"final-footer\n"
        if abandon:
            assert c.stop() is False  # (no COMMIT sent)
        os.write(go, b"x")
        if not abandon:
            theirs.close()  # no READY comes: it ends with the connection lost
        c.join(WAIT)
        assert not c.is_alive()
    finally:
        ours.close()
        theirs.close()
    return stashed


def test_abandoned_migration_does_not_stash(paused: tuple[int, int]) -> None:
    assert _run(paused, abandon=True) == []


def test_migration_going_on_stashes(paused: tuple[int, int]) -> None:
    """The same point without the abandon: the stash is made (the test above tests what it says)."""
    assert _run(paused, abandon=False) == ["stash"]
