"""Incremental dumps with real dirty tracking (issue 3), run for every tracker this machine has."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ckpt.image import open_layer
from ckpt.memory import PM_PRESENT, read_pagemap
from ckpt.track import available
from tests.util import PAGE, Target, run_ckpt

Spawn = Callable[..., Target]


def _trackers() -> list[object]:
    out: list[object] = []
    for name in ("soft-dirty", "uffd-wp", "hash"):
        ok, why = available()[name]
        marks = [] if ok else [pytest.mark.skip(reason=f"{name} tracker unavailable on this kernel: {why}")]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


TRACKERS = _trackers()


def _dump(pid: int, d: Path, *extra: str) -> dict:
    r = run_ckpt("dump", "--pid", str(pid), "-D", str(d), "--json", *extra, check=True)
    return json.loads(r.stdout)


def _snapshot(pid: int, layer: str) -> dict[int, bytes]:
    """The stopped target's bytes for every mapping the layer dumped, observed without disturbing it.

    Reading a non-present page through /proc/PID/mem would fault it in and change what the next
    dump sees, so those pages are taken by the kernel's rule instead: anonymous ones read as zeros,
    those of a private file mapping as the file. [vdso] is read whole (its pages are kernel text).
    """
    view = open_layer(layer)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    out = {}
    try:
        for v in view.layers[0].meta.vmas:
            if v.status != "dumped":
                continue
            if v.path == "[vdso]":
                out[v.start] = os.pread(fd, v.end - v.start, v.start)
                continue
            ents = read_pagemap(pid, v.start, v.end)
            buf = bytearray(v.end - v.start)
            if v.inode and v.path.startswith("/"):
                with open(v.path, "rb") as f:
                    f.seek(v.offset)
                    got = f.read(len(buf))
                buf[: len(got)] = got
            for i in np.nonzero(ents & np.uint64(PM_PRESENT))[0]:
                a = v.start + int(i) * PAGE
                buf[int(i) * PAGE : (int(i) + 1) * PAGE] = os.pread(fd, PAGE, a)
            out[v.start] = bytes(buf)
    finally:
        os.close(fd)
    return out


def _dump_stopped(t: Target, d: Path, *extra: str) -> tuple[dict, dict[int, bytes]]:
    """Dump leaving the target stopped, take its memory as it is at the dump, and let it run on."""
    out = _dump(t.pid, d, "--leave-stopped", *extra)
    try:
        snap = _snapshot(t.pid, out["layer"])
    finally:
        os.kill(t.pid, signal.SIGCONT)
    return out, snap


def _assert_view_equals(layer: str, snap: dict[int, bytes]) -> None:
    view = open_layer(layer)
    vm = {v.start: v for v in view.layers[0].meta.vmas if v.status == "dumped"}
    assert set(vm) == set(snap)
    for start, want in snap.items():
        got = view.read(start, len(want))
        if got != want:
            bad = next(i for i in range(0, len(want), PAGE) if got[i : i + PAGE] != want[i : i + PAGE])
            raise AssertionError(f"{layer}: page {start + bad:#x} of {vm[start].path or 'anon'} differs")


def _stored_in(layer: str, lo: int, hi: int) -> set[int]:
    pg = open_layer(layer).layers[0].meta.pages
    return {int(a) for a in pg.data if lo <= a < hi}


@pytest.mark.parametrize("tracker", TRACKERS)
def test_exact_pages_and_merged_views(spawn: Spawn, tmp_path: Path, tracker: str) -> None:
    t = spawn("memtarget", "256")
    info = t.info()
    lo, hi = info["region"], info["region"] + 256 * PAGE
    d = tmp_path / "d"
    full, snap0 = _dump_stopped(t, d, "--track", tracker)
    assert full["tracker"] == tracker
    layers = [(full["layer"], snap0)]
    writes = [[3, 70, 150], [3], [200, 201, 202, 255], [], [10, 11]]
    for w in writes:
        if w:
            assert t.cmd("write " + " ".join(map(str, w))) == "ok"
        out, snap = _dump_stopped(t, d, "--incremental")
        assert out["parent"] == layers[-1][0] and out["tracker"] == tracker
        # exactly the written pages of the region: not one more, not one less
        assert _stored_in(out["layer"], lo, hi) == {lo + i * PAGE for i in w}
        # Outside the region the target itself writes a few pages between dumps: the stack page of the
        # main thread (it parsed the command), libc's stdout buffer and FILE state, the spinning thread's
        # counter in .bss. ckpt's own injected syscall arguments also land below the stack pointer.
        assert out["pages_dumped"] - len(w) <= 12, out
        layers.append((out["layer"], snap))
    # every layer's merged view is the memory at its moment, also after newer layers were added
    for layer, snap in layers:
        _assert_view_equals(layer, snap)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_mapping_changes_and_dirty_unchanged(spawn: Spawn, tmp_path: Path, tracker: str) -> None:
    t = spawn("memtarget", "64")
    info = t.info()
    region = info["region"]
    d = tmp_path / "d"
    a = int(t.cmd("mmap 8").split()[1], 16)
    b = int(t.cmd("mmap 4").split()[1], 16)
    c = int(t.cmd("mmap 6").split()[1], 16)
    _dump_stopped(t, d, "--track", tracker)

    new = int(t.cmd("mmap 5").split()[1], 16)  # a new mapping
    assert t.cmd(f"munmap {b:#x} 4") == "ok"  # a removed one
    moved = int(t.cmd(f"mremap {a:#x} 8 16").split()[1], 16)  # grown, maybe moved
    assert t.cmd(f"mprotect {c:#x} 6 r") == "ok"  # re-protected
    assert t.cmd("sbrk 20000").startswith("brk")  # the heap grows
    assert t.cmd("same 5") == "ok"  # written with its own bytes
    assert t.cmd("write 9") == "ok"
    out, snap = _dump_stopped(t, d, "--incremental")
    _assert_view_equals(out["layer"], snap)
    view = open_layer(out["layer"])
    starts = {v.start: v for v in view.layers[0].meta.vmas}
    assert new in starts and moved in starts and b not in starts
    assert starts[c].perms.startswith("r--")
    stored = _stored_in(out["layer"], region, region + 64 * PAGE)
    assert stored == {region + 9 * PAGE}
    if tracker == "hash":
        assert out["pages_dirty_unchanged"] == 0  # hashing sees content only: page 5 was never "dirty"
    else:
        assert out["pages_dirty_unchanged"] >= 1
        unchanged = view.layers[0].meta.pages.unchanged
        assert region + 5 * PAGE in {int(x) for x in unchanged}


@pytest.mark.parametrize("tracker", TRACKERS)
def test_chain_of_ten(spawn: Spawn, tmp_path: Path, tracker: str) -> None:
    t = spawn("memtarget", "128")
    d = tmp_path / "d"
    rng = np.random.default_rng(7)
    snaps = [_dump_stopped(t, d, "--track", tracker)]
    for i in range(10):
        pages = sorted({int(x) for x in rng.integers(0, 128, size=int(rng.integers(1, 12)))})
        assert t.cmd("write " + " ".join(map(str, pages))) == "ok"
        if i % 3 == 1:
            t.cmd("mmap 3")
        snaps.append(_dump_stopped(t, d, "--incremental"))
    assert len(open_layer(snaps[-1][0]["layer"]).layers) == 11
    for out, snap in snaps:
        _assert_view_equals(out["layer"], snap)
    assert run_ckpt("verify", snaps[-1][0]["layer"]).returncode == 0


@pytest.mark.parametrize("tracker", TRACKERS)
def test_python3_five_incrementals(tmp_path: Path, tracker: str) -> None:
    code = (
        "import ctypes, sys, os\n"
        "buf = ctypes.create_string_buffer(64 * 4096)\n"
        "print('ready', ctypes.addressof(buf), flush=True)\n"
        "for line in sys.stdin:\n"
        "    i = int(line)\n"
        "    buf[i * 4096:(i + 1) * 4096] = os.urandom(4096)\n"
        "    print('ok', flush=True)\n"
    )
    t = Target([sys.executable, "-c", code])
    try:
        addr = int(t.ready.split()[1])
        d = tmp_path / "py"
        outs = [_dump(t.pid, d, "--track", tracker)]
        contents = [t.read_mem(addr, 64 * 4096)]
        for i in range(5):
            assert t.cmd(str(i * 9)) == "ok"
            contents.append(t.read_mem(addr, 64 * 4096))
            outs.append(_dump(t.pid, d, "--incremental"))
            assert (addr + i * 9 * PAGE) & ~(PAGE - 1) in {
                int(x) for x in open_layer(outs[-1]["layer"]).layers[0].meta.pages.data
            }
        for out, want in zip(outs, contents, strict=True):
            assert open_layer(out["layer"]).read(addr, len(want)) == want
    finally:
        t.close()


def _err(p: object, words: str) -> None:
    assert p.returncode != 0, p.stdout  # type: ignore[attr-defined]
    lines = p.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and words in lines[0], p.stderr  # type: ignore[attr-defined]


def test_refusals(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "32")
    other = spawn("memtarget", "16")
    d = tmp_path / "d"
    _err(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--incremental"), "no earlier layer")
    _dump(t.pid, d, "--track", "hash")
    _err(run_ckpt("dump", "--pid", str(other.pid), "-D", str(d), "--incremental"), "another process")
    _err(
        run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--incremental", "--track", "uffd-wp"), "differs"
    )
    nt = tmp_path / "nt"
    _dump(t.pid, nt, "--track", "none")
    _err(run_ckpt("dump", "--pid", str(t.pid), "-D", str(nt), "--incremental"), "without dirty tracking")


@pytest.mark.skipif(not available()["uffd-wp"][0], reason="uffd-wp unavailable on this kernel")
def test_uffd_lost_fallback_and_untrack(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "32")
    d = tmp_path / "d"
    full = _dump(t.pid, d, "--track", "uffd-wp")
    fd = open_layer(full["layer"]).layers[0].meta.inventory.tracker_state["fd"]
    assert os.readlink(f"/proc/{t.pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    # the injected fd is not part of the process's own fd table in the image
    assert fd not in {f.fd for f in open_layer(full["layer"]).layers[0].meta.fds}
    assert t.cmd(f"close {fd}") == "ok"  # the process closes it behind ckpt's back
    _err(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--incremental"), "was lost")
    fb = run_ckpt(
        "dump", "--pid", str(t.pid), "-D", str(d), "--incremental", "--fallback-full", "--json", check=True
    )
    out = json.loads(fb.stdout)
    assert out["parent"] is None and out["fallback_full"] and "fallback-full" in fb.stderr
    # untrack takes the new tracker out again: no userfaultfd is left in the fd table
    run_ckpt("untrack", "--pid", str(t.pid), check=True)
    links = [os.readlink(f"/proc/{t.pid}/fd/{n}") for n in os.listdir(f"/proc/{t.pid}/fd")]
    assert "anon_inode:[userfaultfd]" not in links
    _err(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--incremental"), "was lost")
    # a final dump removes the tracking itself
    _dump(t.pid, d)
    fin = _dump(t.pid, d, "--incremental", "--final")
    assert fin["parent"] is not None
    links = [os.readlink(f"/proc/{t.pid}/fd/{n}") for n in os.listdir(f"/proc/{t.pid}/fd")]
    assert "anon_inode:[userfaultfd]" not in links
    assert t.sum()


def test_broken_chain_is_named(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "32")
    d = tmp_path / "d"
    first = _dump(t.pid, d, "--track", "hash")
    t.cmd("write 1")
    second = _dump(t.pid, d, "--incremental")
    t.cmd("write 2")
    third = _dump(t.pid, d, "--incremental")
    assert run_ckpt("verify", third["layer"]).returncode == 0
    # a parent replaced by another layer (same name, other content): its digest no longer matches
    other = tmp_path / "other"
    _dump(t.pid, other, "--track", "hash")
    os.replace(other / "layer-0001.ckpt", first["layer"])
    for cmd in (
        ["show", third["layer"]],
        ["verify", third["layer"]],
        ["read", third["layer"], "--addr", "0", "--size", "1"],
    ):
        p = run_ckpt(*cmd)
        _err(p, "layer-0001.ckpt")
        assert "match" in p.stderr
    # a missing parent
    os.unlink(second["layer"])
    p = run_ckpt("show", third["layer"])
    _err(p, "layer-0002.ckpt")
    assert "missing" in p.stderr


@pytest.mark.skipif(not available()["uffd-wp"][0], reason="uffd-wp unavailable on this kernel")
def test_two_uffd_chains_on_one_process_lose_nothing(spawn: Spawn, tmp_path: Path) -> None:
    """A second chain cannot share the first chain's write-protect bits: the mappings the first
    chain's userfaultfd holds are dumped whole by the second, never scanned (which would consume
    the first chain's dirty bits)."""
    t = spawn("memtarget", "64")
    region = t.info()["region"]
    d1, d2 = tmp_path / "one", tmp_path / "two"
    _dump(t.pid, d1)
    second = run_ckpt("dump", "--pid", str(t.pid), "-D", str(d2), "--json", check=True)
    assert "tracked by another userfaultfd" in second.stderr
    assert t.cmd("write 3") == "ok"
    out2, snap2 = _dump_stopped(t, d2, "--incremental")
    out1, snap1 = _dump_stopped(t, d1, "--incremental")
    assert region + 3 * PAGE in _stored_in(out1["layer"], region, region + 64 * PAGE)
    assert region + 3 * PAGE in _stored_in(out2["layer"], region, region + 64 * PAGE)
    _assert_view_equals(out1["layer"], snap1)
    _assert_view_equals(out2["layer"], snap2)
    # the first chain is still exact: one more write, one more page
    assert t.cmd("write 7") == "ok"
    out1b, _ = _dump_stopped(t, d1, "--incremental")
    assert _stored_in(out1b["layer"], region, region + 64 * PAGE) == {region + 7 * PAGE}
