"""The fill's work made on the plan's thread, beside the helper's start (restore/memory.py
fill_work, restorer.restore_one): a corrupt chunk it reads (pages left to an unchanged file, whose
chunk is still checked) refuses the restore before any page is written, one line, no process
left; a chunk corrupt near the end of the fill refuses it likewise after most pages went in."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt.errors import RestoreError
from ckpt.image import Layer, open_layer
from ckpt.restore import memory, restore_process, restorer
from ckpt.restore.plan import make_plan
from tests.test_restore_fill import _damage
from tests.test_smalltable import small_max
from tests.util import Target, run_ckpt


def _children() -> set[int]:
    out: set[int] = set()
    for t in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            out |= {int(k) for k in Path(f"/proc/self/task/{t}/children").read_text().split()}
    return out


@pytest.fixture
def fills(monkeypatch: pytest.MonkeyPatch) -> list[memory.FillWork | None]:
    """The work each fill_pages of the test was given (a restore that calls none: refused before)."""
    seen: list[memory.FillWork | None] = []
    real = restorer.fill_pages

    def spy(remote: object, view: object, plan: object, work: memory.FillWork | None) -> memory.FillStats:
        seen.append(work)
        return real(remote, view, plan, work)  # type: ignore[arg-type]

    monkeypatch.setattr(restorer, "fill_pages", spy)
    return seen


def _layer(tmp_path: Path, spawn: Callable[..., Target], datafile: Path) -> tuple[Path, int]:
    t = spawn("rounds", "2048", str(datafile), stderr=subprocess.DEVNULL)
    assert t.cmd("mix") == "ok"
    d = tmp_path / "d"
    run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--kill", check=True)
    t.proc.wait(30)
    return d / "layer-0001.ckpt", t.pid


def _chunks(layer: Path) -> tuple[set[int], set[int]]:
    """The chunks of the pages a restore leaves to their file (checked, not written) and of those it
    writes (memory.page_work's answer on the layer's plan)."""
    with open_layer(layer) as view:
        plan = make_plan(view, check_data=False)
        rows, _, trusted = memory.page_work(plan, memory.FillStats())
        t = plan.table
        assert all(int(t.layer[j]) == 0 for j in [*rows, *trusted])
        top = view.layers[0]
        return {int(top.chunk_of(int(t.index[j]))) for j in trusted}, {
            int(top.chunk_of(int(t.index[j]))) for j in rows
        }


def _refused(layer: Path, before: set[int]) -> None:
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1 and "corrupt" in r.stderr and layer.name in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert _children() == before  # no helper handed to us (a subreaper) by the exiting ckpt


@pytest.mark.parametrize("small", [None, "0"], ids=["small", "numpy"])
def test_corrupt_file_pages_refused_before_any_page(
    tmp_path: Path,
    spawn: Callable[..., Target],
    subreaper: list[int],
    datafile: Path,
    fills: list[memory.FillWork | None],
    small: str | None,
) -> None:
    """A flipped byte in the chunk of a private file mapping's page that equals the file's (left to
    the page cache, its chunk checked all the same): refused by the work made beside the helper's
    start, before the fill (fill_pages never called), one line, nothing left; intact, the same
    layer restores with that work made ahead."""
    layer, dumped = _layer(tmp_path, spawn, datafile)
    trusted, _ = _chunks(layer)
    assert trusted  # (the C library's data pages that equal its file's, here)
    ci = min(trusted)  # (with pages to write beside them: the check comes first all the same)
    with Layer.open(layer) as lay:
        c = lay.pages.chunks[ci]
    intact = layer.read_bytes()
    _damage(layer, c.offset + c.clen // 2)
    before = _children()
    with small_max(small):
        with open_layer(layer) as view, pytest.raises(RestoreError, match="corrupt"):
            restore_process(view)
        assert fills == []
        assert _children() == before
        _refused(layer, before)
        layer.write_bytes(intact)
        with open_layer(layer) as view:
            rp = restore_process(view)
    subreaper.append(rp.pid)
    assert len(fills) == 1 and fills[0] is not None and fills[0].stats.skipped_file_pages > 0
    assert rp.pid == dumped or not rp.pid_kept
    os.kill(rp.pid, signal.SIGKILL)
    os.waitpid(rp.pid, 0)


def test_corrupt_last_chunk_refused_mid_fill(
    tmp_path: Path,
    spawn: Callable[..., Target],
    subreaper: list[int],
    datafile: Path,
    fills: list[memory.FillWork | None],
) -> None:
    """A flipped byte in the layer's last chunk: the fill has begun (fill_pages called with the
    work made ahead) and stops there; one line, the helper killed, nothing left running."""
    layer, _ = _layer(tmp_path, spawn, datafile)
    trusted, written = _chunks(layer)
    ci = max(written - trusted)  # the last chunk the fill writes (in address order: the pool's last)
    with Layer.open(layer) as lay:
        c = lay.pages.chunks[ci]
        assert ci > len(lay.pages.chunks) // 2 > 2
    _damage(layer, c.offset + c.clen // 2)
    before = _children()
    with open_layer(layer) as view, pytest.raises(RestoreError, match="corrupt"):
        restore_process(view)
    assert len(fills) == 1 and fills[0] is not None
    assert _children() == before
    _refused(layer, before)
