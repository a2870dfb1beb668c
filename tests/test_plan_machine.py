"""make_plan's facts of this machine and of ckpt (ckpt/restore/plan.py, Machine): read once each,
and a plan given a Machine read earlier (a migration's warm restore reads one at SYNC, before the
final round) reads none of them again and checks the image against those very facts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import dump
from ckpt.errors import RestoreError
from ckpt.image import open_layer
from ckpt.restore import plan as plan_mod
from ckpt.restore.plan import Machine, make_plan
from tests.util import Target

READERS = ("_read_int", "_has_cap", "_own_caps", "_meminfo_available", "_timer_ids_supported")


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every read of a machine fact, by the name of its reader."""
    reads: list[str] = []
    for name in READERS:
        real = getattr(plan_mod, name)

        def counted(*a: Any, _real: Callable[..., Any] = real, _name: str = name) -> Any:
            reads.append(_name)
            return _real(*a)

        monkeypatch.setattr(plan_mod, name, counted)
    return reads


def _layer(tmp_path: Path, spawn: Callable[..., Target]) -> Path:
    t = spawn("rounds", "16")
    return Path(dump(t.pid, tmp_path / "d").layer)


def test_a_machine_read_before_is_not_read_again(
    tmp_path: Path, spawn: Callable[..., Target], monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = _layer(tmp_path, spawn)
    reads = _count_reads(monkeypatch)
    m = Machine().prefetch()
    # 4 sysctls, 2 capabilities, ckpt's own sets, the memory, the timer ids: each once.
    once = ["_own_caps", "_meminfo_available", "_timer_ids_supported"]
    assert sorted(reads) == sorted(["_read_int"] * 4 + ["_has_cap"] * 2 + once)
    assert m.prefetch() is m and len(reads) == 9  # kept: not read again
    view = open_layer(layer)
    try:
        before = len(reads)
        warm = make_plan(view, check_data=False, machine=m)
        assert len(reads) == before  # the plan asked the Machine only
        fresh = make_plan(view, check_data=False)
        assert len(reads) > before  # (without one, it reads them now)
        assert warm.warnings == fresh.warnings
        assert [(p.vma.start, p.kind) for p in warm.vmas] == [(p.vma.start, p.kind) for p in fresh.vmas]
    finally:
        view.close()


def test_the_plan_checks_against_the_machine_it_is_given(
    tmp_path: Path, spawn: Callable[..., Target]
) -> None:
    layer = _layer(tmp_path, spawn)
    m = Machine().prefetch()
    m._got["vm/max_map_count"] = 3  # a machine whose limit the image's mappings exceed
    view = open_layer(layer)
    try:
        with pytest.raises(RestoreError, match=r"vm\.max_map_count \(3\)"):
            make_plan(view, check_data=False, machine=m)
        make_plan(view, check_data=False, machine=Machine())  # this machine's own limit: fine
    finally:
        view.close()
