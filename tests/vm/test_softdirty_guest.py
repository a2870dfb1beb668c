"""Issue 6: ckpt's soft-dirty tracker, proven on a kernel that has soft-dirty.

One guest boot runs tests/vm/guest_softdirty.py under Debian's 6.1 kernel (soft-dirty, no
PAGEMAP_SCAN, no uffd-wp async) with `--track soft-dirty`; the same script runs on the host with
`--track uffd-wp`. The script checks each side on its own (exact pages per step, merged views
equal to memory, `--track auto`'s choice); these tests check that it did, then hold the two
trackers' page sets against each other. See docs/vm.md, "ckpt's soft-dirty tracker in the guest".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckpt.track import available
from tests.util import build_c

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("guest_softdirty.py")
STEPS = ["full", "write", "idle", "new-mapping", "remap", "expand"]
RANGES = ("region", "A", "B", "heap+")

Result = dict[str, Any]


def _failures(side: str, res: Result, output: str = "") -> str:
    return (
        f"{side}: {len(res.get('failures', []))} failure(s):\n" + "\n".join(res.get("failures", [])) + output
    )


@pytest.fixture(scope="module")
def memtarget() -> Path:
    # Built on the host into tests/targets/bin/, which the guest sees through the read-only root.
    return build_c("memtarget")


@pytest.fixture(scope="module")
def guest(guest_softdirty: dict[str, Any], vm_session: Result) -> Result:
    # Run in the session's one guest boot, beside the host's tests (tests/vm/session.py), with the
    # pytest process's own python (/tmp/v here, <repo>/.venv in CI: the guest sees the host's root).
    out = Path(guest_softdirty["dir"]) / "guest.json"
    res = guest_softdirty
    assert out.exists(), f"the guest script left no result (exit {res['exit_status']}):\n{res['output']}"
    data: Result = json.loads(out.read_text())
    data["exit_status"] = guest_softdirty["exit_status"]
    data["output"] = guest_softdirty["output"]
    data["boot_and_script_s"] = guest_softdirty["script_s"]
    data["kernel_release"] = vm_session["kernel_release"]
    return data


@pytest.fixture(scope="module")
def host(memtarget: Path, tmp_path_factory: pytest.TempPathFactory) -> Result:
    ok, why = available()["uffd-wp"]
    if not ok:
        pytest.skip(f"no uffd-wp tracker on this host to compare with: {why}")
    # The host's `auto` choice: uffd-wp on the project's machines, which lack soft-dirty.
    auto = "soft-dirty" if available()["soft-dirty"][0] else "uffd-wp"
    d = tmp_path_factory.mktemp("softdirty-host")
    argv = [sys.executable, str(SCRIPT), "--memtarget", str(memtarget), "--track", "uffd-wp"]
    argv += ["--expect-auto", auto, "--out", str(d / "host.json"), "--workdir", str(d)]
    p = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )
    assert (d / "host.json").exists(), f"the host run left no result ({p.returncode}):\n{p.stderr}"
    data: Result = json.loads((d / "host.json").read_text())
    data["exit_status"] = p.returncode
    data["output"] = p.stderr
    return data


def _step(res: Result, name: str) -> Result:
    step: Result = next(s for s in res["steps"] if s["step"] == name)
    return step


def summary(guest: Result, host: Result) -> str:
    """Page sets per step and range (page indices within the range), soft-dirty in the guest
    against uffd-wp on the host; "merged" pages are dirty only because a new mapping joined their
    VMA. Printed by the comparison test (pytest -s / -rA) and shown when it fails."""

    def fmt(p: Result) -> str:
        parts = [f"{k}={p[k]}" for k in ("stored", "unchanged", "absent") if p[k]]
        return " ".join(parts + ([f"(merged: {p['merged']})"] if p["merged"] else [])) or "-"

    lines = [f"{'step':12} {'range':7} {'soft-dirty (guest)':44} uffd-wp (host)"]
    for name in STEPS[1:]:
        g, h = _step(guest, name), _step(host, name)
        for rn in RANGES:
            if rn in g["pages"] and (g["pages"][rn]["reported"] or h["pages"][rn]["reported"]):
                lines.append(f"{name:12} {rn:7} {fmt(g['pages'][rn]):44} {fmt(h['pages'][rn])}")
        gx = f"{len(g['extras'])} + {g.get('merged_neighbour_pages', 0)} merged"
        kinds = ", ".join(sorted({e["kind"] for e in h["extras"]}))
        lines.append(f"{name:12} {'others':7} {gx:44} {len(h['extras'])}  ({kinds})")
    return "\n".join(lines)


@pytest.mark.vm
def test_guest_soft_dirty_scenario(guest: Result) -> None:
    assert guest["exit_status"] == 0 and not guest["failures"], _failures("guest", guest, guest["output"])
    assert guest["kernel"] == guest["kernel_release"]  # it really ran under Debian's kernel
    feats = {k: v["ok"] for k, v in guest["check"]["features"].items()}
    # `ckpt check` in the guest: soft-dirty works, the 6.7+ mechanisms are absent, auto picks soft-dirty.
    want = {"ptrace": True, "soft-dirty": True, "uffd-wp-async": False, "pagemap-scan": False}
    assert {k: feats.get(k) for k in want} == want, guest["check"]
    assert guest["check"]["auto_tracker"] == "soft-dirty"
    assert [s["step"] for s in guest["steps"]] == STEPS
    # ckpt's answer is the kernel's: each incremental reported exactly the pages that had bit 55
    # just before it (plus none written in between, here).
    for s in guest["steps"][1:]:
        assert s["pages_dirty"] == s["kernel_soft_dirty"], s
        assert s["reported_not_in_kernel_read"] == [], s
    # soft-dirty.txt, as ckpt sees it: the new mapping is dirty as a whole; the region unmapped and
    # mapped again at the same place reads dirty (same bytes: stored as "dirty but unchanged"); the
    # grown heap is dirty as a whole, old pages too (the ones never touched come out absent).
    new = _step(guest, "new-mapping")["pages"]["B"]
    assert (new["reported"], new["stored"]) == (list(range(5)), list(range(5)))
    remap = _step(guest, "remap")["pages"]["A"]
    assert (remap["reported"], remap["unchanged"], remap["fresh"]) == (list(range(4)), list(range(4)), [])
    expand = _step(guest, "expand")
    heap_vma = expand["new_vma"]  # [start, end, perms, path], relative to where the heap grew from
    assert len(heap_vma) == 1 and heap_vma[0][3] == "[heap]"
    assert expand["merged_neighbour_pages"] == -heap_vma[0][0] // 4096 > 0  # all of the old heap


def test_host_uffd_wp_scenario(host: Result) -> None:
    assert host["exit_status"] == 0 and not host["failures"], _failures("host", host, host["output"])
    assert [s["step"] for s in host["steps"]] == STEPS
    # uffd-wp never merges a new mapping into a registered VMA: nothing is dirty "by association".
    assert all(s.get("merged_neighbour_pages", 0) == 0 for s in host["steps"])


@pytest.mark.vm
def test_same_pages_on_both_trackers(guest: Result, host: Result) -> None:
    """What the target did is reported alike by both; soft-dirty adds only merged-VMA pages."""
    assert not guest["failures"] and not host["failures"], _failures("guest", guest) + _failures("host", host)
    table = summary(guest, host)
    print(table)
    for name in STEPS[1:]:
        g, h = _step(guest, name), _step(host, name)
        assert set(g["pages"]) == set(h["pages"]), name
        for rn, gp in g["pages"].items():
            hp = h["pages"][rn]
            assert hp["merged"] == [], (name, rn)
            where = f"{name}/{rn}\n{table}"
            # Reported dirty: the same pages, but for those soft-dirty adds because the new mapping
            # joined their VMA.
            assert sorted(set(gp["reported"]) - set(gp["merged"])) == hp["reported"], where
            # Stored bytes: the same. For the remapped A both find the same bytes back: soft-dirty
            # because A's old VMA goes on (inode 0, same place), uffd-wp because an unregistered
            # mapping that continues its parent's is compared page by page (its pages are "whole"
            # candidates, not fresh), so the digest check keeps them out ("unchanged").
            assert gp["stored"] == hp["stored"], where
            assert sorted(set(gp["unchanged"]) - set(gp["merged"])) == hp["unchanged"], where
    # Pages outside the scenario's ranges: both trackers find them in the same kinds of places
    # (the main stack, every thread's TLS, memtarget's and libc's data, the heap), but for [vdso],
    # which only uffd-wp stores (it cannot register it), and the heap once it grew, which soft-dirty
    # counts as part of the expanded VMA instead. A page of a read-only file mapping first read in
    # the step ("read in") is uffd-wp's alone too: a newly faulted page carries no write-protect bit,
    # while a read fault sets no soft-dirty bit; whether libc touches such a page in a step is up to
    # the target's timing, so the kind may appear on either run and is left out of the comparison.
    for name in STEPS[1:]:
        gk = {e["kind"] for e in _step(guest, name)["extras"]} - {"read in"}
        hk = (
            {e["kind"] for e in _step(host, name)["extras"]}
            - {"vdso", "read in"}
            - ({"heap"} if name == "expand" else set())
        )
        assert gk == hk, (name, gk, hk)
        assert any(e["kind"] == "vdso" for e in _step(host, name)["extras"]), name


def test_view_check_sees_differences(memtarget: Path, tmp_path: Path) -> None:
    """The scenario's "merged view equals memory" check fails where it should (no VM needed)."""
    import signal

    import numpy as np

    from ckpt.api import open_layer

    from . import guest_softdirty as gs

    t = gs.Target([str(memtarget), "64"])
    try:
        region = int(t.cmd("info").split()[1], 16)
        out = gs.ckpt_json(
            "dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--leave-stopped", "--track", "hash"
        )
        try:
            with open_layer(out["layer"]) as view:
                snap = gs.snapshot(t.pid, view.top.vmas)
        finally:
            os.kill(t.pid, signal.SIGCONT)
    finally:
        t.close()
    with open_layer(out["layer"]) as view:
        assert gs.view_mismatch(view, snap) is None
        for page, what in ((3, "data"), (20, "zero"), (50, "absent")):  # random, zeros, never touched
            mem = dict(snap.mem)
            vstart = next(s for s in mem if s <= region < s + len(mem[s]))
            buf = bytearray(mem[vstart])
            buf[region - vstart + page * gs.PAGE + 100] ^= 0x5A
            mem[vstart] = bytes(buf)
            bad = gs.view_mismatch(view, gs.Snapshot(mem, snap.present))
            assert bad == f"page {region + page * gs.PAGE:#x} of anon ({what} in the view) differs; 1 differ"
        assert not np.any(snap.present[vstart][48:64])  # page 50 really was a hole
