"""uffd-wp in an incremental dump's freeze (issue 9 part 2): the mappings made since the last dump are
registered in the same injected run as the dump's questions, the dirty and hole scans go over the
followed span at once, and every page count stays exact."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.dump import dump
from ckpt.image import open_layer
from ckpt.memory import PAGE_IS_WPALLOWED, PagemapScanner
from ckpt.track import available
from tests.util import PAGE, Target, assert_view_equals_memory

Spawn = Callable[..., Target]

pytestmark = pytest.mark.skipif(
    not available()["uffd-wp"][0], reason="uffd-wp tracking unavailable on this kernel"
)


def _registered(pid: int, start: int, end: int) -> bool:
    with PagemapScanner(pid) as sc:
        r = sc.scan(start, end, category_anyof_mask=PAGE_IS_WPALLOWED, return_mask=PAGE_IS_WPALLOWED)
    return [(x.start, x.end) for x in r] == [(start, end)]


def _stored_in(layer: str, lo: int, hi: int) -> set[int]:
    return {int(a) for a in open_layer(layer).layers[0].meta.pages.data if lo <= a < hi}


def _dump(t: Target, d: Path, **kw: object) -> str:
    r = dump(t.pid, d, leave_stopped=True, precopy=False, **kw)  # type: ignore[arg-type]
    try:
        assert_view_equals_memory(t.pid, r.layer)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("info").startswith("region")
    return r.layer


def test_new_mappings_registered_in_the_dumps_batch(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "64")
    region = t.info()["region"]
    d = tmp_path / "d"
    _dump(t, d, track="uffd-wp")
    new = [int(t.cmd(f"mmap {n}").split()[1], 16) for n in (3, 17)]
    assert not any(_registered(t.pid, a, a + PAGE) for a in new)
    layer = _dump(t, d, incremental=True)
    # Made since the parent: stored whole by this layer, registered in its freeze.
    assert _stored_in(layer, new[0], new[0] + 3 * PAGE) == {new[0] + i * PAGE for i in range(3)}
    assert _registered(t.pid, new[0], new[0] + 3 * PAGE)
    assert _registered(t.pid, new[1], new[1] + 17 * PAGE)
    state = open_layer(layer).layers[0].meta.inventory.tracker_state or {}
    assert not [r for r in state.get("refused", []) if r[0] in new]
    # From now on only what is written there counts: nothing, and page 5 of the region.
    assert t.cmd("write 5") == "ok"
    layer = _dump(t, d, incremental=True)
    assert _stored_in(layer, new[1], new[1] + 17 * PAGE) == set()
    assert _stored_in(layer, region, region + 64 * PAGE) == {region + 5 * PAGE}
