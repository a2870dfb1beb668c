"""ckpt/restore/helperstart.py: the plan made beside the helper's start, and no helper left behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ckpt.errors import RestoreError, Unsupported
from ckpt.restore.helper import kill_helper
from ckpt.restore.helperstart import plan_beside_helper


def _children() -> set[int]:
    out: set[int] = set()
    for t in Path("/proc/self/task").iterdir():
        try:
            out |= {int(x) for x in (t / "children").read_text().split()}
        except FileNotFoundError:
            continue  # a thread that ended between the listing and the read (an earlier test's tracer thread)
    return out


def test_plan_and_a_seized_helper() -> None:
    before = _children()
    planned_on: list[str] = []

    def make() -> str:
        planned_on.append(threading.current_thread().name)
        return "the plan"

    plan, helper = plan_beside_helper(make, os.getpid())  # type: ignore[arg-type]
    try:
        assert plan == "the plan"
        assert planned_on and planned_on[0] != threading.current_thread().name
        assert helper.pid in _children() - before
        # Seized by this thread and stopped: its tracer is us.
        status = Path(f"/proc/{helper.pid}/status").read_text()
        assert f"TracerPid:\t{os.getpid()}" in status
        assert "(tracing stop)" in status or "t (" in status
    finally:
        kill_helper(helper.pid)
    assert not _children() - before  # (an earlier test's child may go meanwhile: no matter)


def test_a_refused_plan_leaves_no_helper() -> None:
    before = _children()

    def refuse() -> str:
        raise Unsupported("cannot restore: a thing ckpt does not restore")

    with pytest.raises(Unsupported, match="a thing ckpt does not restore"):
        plan_beside_helper(refuse, os.getpid())  # type: ignore[arg-type]
    assert not _children() - before  # (an earlier test's child may go meanwhile: no matter)


def test_the_plans_refusal_comes_before_the_helpers_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import ckpt.restore.helperstart as hs

    def no_helper(want: int | None) -> None:
        raise RestoreError("cannot start the restore helper: test")

    monkeypatch.setattr(hs, "spawn_helper", no_helper)

    def refuse() -> str:
        raise Unsupported("cannot restore: refused")

    with pytest.raises(Unsupported, match="refused"):
        plan_beside_helper(refuse, os.getpid())  # type: ignore[arg-type]
    with pytest.raises(RestoreError, match="cannot start the restore helper"):
        plan_beside_helper(lambda: "plan", os.getpid())  # type: ignore[arg-type,return-value]
