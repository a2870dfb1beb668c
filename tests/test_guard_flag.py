"""Guard regions looked for only where smaps says they may be (props.guard_flag, read_guards).

A kernel with VM_MAYBE_GUARD marks every mapping that may hold a guard region "gu" in smaps'
VmFlags (set by MADV_GUARD_INSTALL, kept through MADV_GUARD_REMOVE, splits and merges); a
mapping without it holds none. A dump then scans only the marked mappings, where it walked every
page table of the process in its freeze before. Each case compares with that whole walk, on a
real process whose guards are installed and removed on command (tests/targets/flagchange.c).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import dump
from ckpt.image import open_layer
from ckpt.memory import PagemapScanner
from ckpt.proc.maps import read_maps
from ckpt.proc.props import guard_flag, read_guards, read_vmflags
from tests.util import Target, build_c

PAGE = 4096
INSTALL, REMOVE = 102, 103


@pytest.fixture
def target() -> Iterator[tuple[Target, int]]:
    t = Target([str(build_c("flagchange"))])
    try:
        yield t, int(t.ready.split()[2], 16)
    finally:
        t.close()


def _scans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The spans read_guards scans from here on."""
    spans: list[tuple[int, int]] = []
    real = PagemapScanner.regions

    def regions(self: PagemapScanner, start: int, end: int, **kw: Any) -> Any:
        spans.append((start, end))
        return real(self, start, end, **kw)

    monkeypatch.setattr(PagemapScanner, "regions", regions)
    return spans


def _both(pid: int) -> tuple[list[list[int]], list[list[int]], dict[int, str]]:
    vmas, flags = read_maps(pid), read_vmflags(pid)
    return read_guards(pid, vmas, flags), read_guards(pid, vmas), flags


def test_the_probe_answers_what_the_kernel_shows() -> None:
    kind = guard_flag()
    assert kind in ("gu", "scan", "none")
    assert guard_flag() is kind  # once per process


def test_only_marked_mappings_are_scanned(
    target: tuple[Target, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    t, base = target
    if guard_flag() != "gu":
        pytest.skip(f"this kernel does not mark guard mappings in smaps (guard_flag: {guard_flag()})")
    spans = _scans(monkeypatch)
    flagged, whole, flags = _both(t.pid)
    assert flagged == whole == []
    assert not any("gu" in f.split() for f in flags.values())
    assert len(spans) == 1, spans  # the whole walk only: none for the flagged reading

    assert t.cmd(f"madv {INSTALL} 3 2").startswith("ok")
    assert t.cmd(f"madv {INSTALL} 40 1").startswith("ok")
    spans.clear()
    flagged, whole, flags = _both(t.pid)
    assert flagged == whole == [[base + 3 * PAGE, base + 5 * PAGE], [base + 40 * PAGE, base + 41 * PAGE]]
    marked = [a for a, f in flags.items() if "gu" in f.split()]
    assert marked == [base]  # the region alone, though the install touched two spots of it
    assert spans[0] == (base, base + 64 * PAGE)

    # Over the whole region, then split in three (MADV_NOHUGEPAGE in its middle): the mark goes
    # with each part, and the parts' runs come back as one, as the whole walk reports them.
    assert t.cmd(f"madv {INSTALL} 0 64").startswith("ok")
    assert t.cmd("madv 15 33 4").startswith("ok")
    flagged, whole, flags = _both(t.pid)
    assert flagged == whole == [[base, base + 64 * PAGE]]
    assert [a for a, f in flags.items() if "gu" in f.split()] == [base, base + 33 * PAGE, base + 37 * PAGE]

    # Removed, the guards are gone and the mark stays (sticky): scanned, nothing found.
    assert t.cmd(f"madv {REMOVE} 0 64").startswith("ok")
    flagged, whole, flags = _both(t.pid)
    assert flagged == whole == []
    assert all("gu" in flags[a].split() for a in (base, base + 33 * PAGE, base + 37 * PAGE))


def test_a_dump_records_the_guards(target: tuple[Target, int], tmp_path: Path) -> None:
    """A full dump, then an incremental one after more guards: each layer holds what the whole
    walk finds (the flagged reading, in the freeze)."""
    t, base = target
    at = [base + 7 * PAGE, base + 8 * PAGE]
    assert t.cmd(f"madv {INSTALL} 7 1").startswith("ok")
    layers = [dump(t.pid, tmp_path).layer]
    assert t.cmd(f"madv {INSTALL} 20 2").startswith("ok")
    layers.append(dump(t.pid, tmp_path, incremental=True).layer)
    none = guard_flag() == "none"
    for layer, want in zip(layers, ([at], [at, [base + 20 * PAGE, base + 22 * PAGE]]), strict=True):
        meta = open_layer(layer).layers[0].meta
        assert meta.props is not None
        assert [list(g) for g in meta.props.guards] == ([] if none else want)
    assert read_guards(t.pid, read_maps(t.pid)) == ([] if none else want)
    assert t.cmd("noop").startswith("ok")
