"""Frozen.prepare(): freeze()'s checks run before the seize, while the process runs (issue 9, part 2).

A dump calls it before it starts the freeze's clock. Prepared and never frozen, the process must be
untouched and the tracer's SIGCHLD mask as it was; prepared then frozen, everything as freeze() alone.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import pytest

from ckpt.errors import FreezeError
from ckpt.ptrace import Frozen
from tests.test_freeze_safety import settled, sigstate
from tests.util import Target

Spawn = Callable[..., Target]


def sigchld_blocked() -> bool:
    return signal.SIGCHLD in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_prepared_never_frozen_leaves_process_and_mask_as_they_were(spawn: Spawn) -> None:
    t = spawn("sigstate")
    before = settled(t)
    was_blocked = sigchld_blocked()
    fz = Frozen(t.pid)
    fz.prepare()
    assert t.tracer() == 0 and sigstate(t.pid) == before  # nothing of the process was touched
    assert t.cmd("ping") == "pong"
    fz.thaw()
    fz.thaw()  # idempotent
    assert sigchld_blocked() == was_blocked
    assert not fz.frozen and settled(t) == before


def test_prepared_then_frozen_is_a_freeze(spawn: Spawn) -> None:
    t = spawn("sigstate")
    before = settled(t)
    fz = Frozen(t.pid)
    fz.prepare()
    fz.prepare()  # twice: one set-up
    fz.freeze()
    try:
        assert fz.frozen and fz.tids == [t.pid] and t.tracer() > 0
        assert t.state() == "t"
    finally:
        fz.thaw()
    assert settled(t) == before and t.tracer() == 0
    assert t.cmd("ping") == "pong"


def test_freeze_or_thaw_from_another_thread_than_prepare_is_refused(spawn: Spawn) -> None:
    t = spawn("sigstate")
    fz = Frozen(t.pid)
    fz.prepare()
    errs: list[BaseException] = []

    def other() -> None:
        for step in (fz.freeze, fz.thaw):
            try:
                step()
            except FreezeError as e:
                errs.append(e)

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert len(errs) == 2 and all("thread that prepared" in str(e) for e in errs)
    assert t.tracer() == 0
    fz.thaw()
    assert t.cmd("ping") == "pong"


def test_prepare_refuses_what_freeze_refused(spawn: Spawn) -> None:
    t = spawn("sigstate")
    assert t.cmd(f"pend {int(signal.SIGSEGV)}") == f"pending {int(signal.SIGSEGV)}"
    before = settled(t)
    was_blocked = sigchld_blocked()
    with pytest.raises(FreezeError, match="SIGSEGV pending and blocked"):
        Frozen(t.pid).prepare()
    assert sigchld_blocked() == was_blocked and sigstate(t.pid) == before
