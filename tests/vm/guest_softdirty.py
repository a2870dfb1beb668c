"""Issue 6: ckpt's own soft-dirty tracking, run on a kernel that has soft-dirty.

tests/vm/test_softdirty_guest.py runs this script in the QEMU guest (Debian's 6.1 kernel:
soft-dirty, no PAGEMAP_SCAN) with `--track soft-dirty`, and on the host (no soft-dirty, uffd-wp
+ PAGEMAP_SCAN) with `--track uffd-wp`, then compares the two results page for page.

It drives tests/targets/memtarget.c (64-page region) through a fixed scenario and dumps it with
ckpt's own CLI code (`ckpt.cli.main`, in this process: every Python start costs ~3 s under TCG):

  full         `ckpt check`; mmap A (4 pages); `ckpt dump --track auto`, which must pick TRACK
  write        write region pages 3 17 40 63 (63 had never been touched: a hole), and rewrite
               page 5 with its own bytes (dirty but unchanged)
  idle         nothing
  new-mapping  mmap B (5 pages)
  remap        munmap A, mmap 4 pages: the kernel hands out A's place again
  expand       sbrk 20000: the heap grows in place
  each followed by `ckpt dump --incremental --track TRACK --leave-stopped`.

After each dump the stopped target's memory is read without disturbing it (pagemap, and
/proc/PID/mem for present pages only) and compared with the layer's merged view. On a soft-dirty
kernel pagemap bit 55 is also read just before each dump: every page the kernel calls dirty must
be in ckpt's answer.

soft-dirty.txt says new and expanded mappings are soft-dirty as a whole. The kernel keeps that
flag per VMA, and an anonymous mapping that lands next to a compatible one merges with it: the
whole merged VMA then reads dirty, the neighbour's pages too. That happens here (glibc leaves a
few small holes by libc's .bss and ld.so's TLS; B and A land in them), so the script checks the
exact rule: with soft-dirty every page of the VMA that holds a new or expanded mapping is
reported; with uffd-wp a registered VMA never merges with a new one, so only the new pages are.

Writes JSON to --out and exits 1 if any check failed (the failures are in the JSON and on stderr).
Standard library, numpy and ckpt only: it runs in the guest from the host's venv.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckpt.api import open_layer
from ckpt.cli import main as ckpt_main
from ckpt.image import MergedView
from ckpt.image.chain import STATE_ABSENT, STATE_DATA, STATE_ZERO
from ckpt.image.format import VmaRecord
from ckpt.memory import PM_PRESENT, PM_SOFT_DIRTY, read_pagemap
from ckpt.proc.maps import PAGE_SIZE, read_maps
from tests.util import LineChannel

PAGE = PAGE_SIZE
REGION_PAGES = 64  # memtarget: [0,16) random, [16,32) zeros, [32,48) text, [48,64) never touched
A_PAGES = 4
B_PAGES = 5
WRITE_PAGES = (3, 17, 40, 63)
SAME_PAGE = 5
SBRK_BYTES = 20000
# Pages outside the scenario's ranges that one step may report; each must also lie in one of the
# EXPLAINED places. Seen: at most 12 in the guest, 15 on the host (2 of them [vdso]); 17 since a
# dump asks its questions in one batch (ptrace/batch.py), whose results take ~0.6 KiB of the stack
# below the red zone instead of 64 bytes: one more stack page, now and then.
MAX_EXTRAS = 18
EXPLAINED = {
    "stack": "the main thread's stack: it parsed a command; ckpt's injected syscalls put their "
    "arguments below its stack pointer and put the bytes back after the tracker was re-armed",
    "tls": "a thread's TLS/TCB (the page at its fs_base, or next to it): the kernel rewrites the "
    "rseq area there whenever the thread is scheduled back in, and the freeze stops them all",
    "target data": "memtarget's .data/.bss: the spinning thread's counter, the random state",
    "libc data": "libc's or ld.so's data/.bss: stdout's FILE and lock, brk and mmap bookkeeping",
    "heap": "the heap: stdout's buffer",
    "vdso": "[vdso]: uffd-wp cannot register it, so ckpt dumps it whole each time",
    "read in": "a page of a read-only file mapping (libc's .rodata) the target first read in this step: "
    "absent before, present now; a newly faulted page carries no write-protect bit, so uffd-wp calls "
    "it written (which step reads it first depends on the target's threads' timing)",
}
TIMEOUT_S = 60.0


class Target:
    """memtarget, started through `setsid -f` so that it is not our child.

    This process ptraces it as `ckpt dump --pid` would; a dumper that is also the parent would also
    get the target's wait reports as its parent. Commands and answers go over pipes (tests/util.py).
    """

    def __init__(self, argv: Sequence[str]) -> None:
        setsid = shutil.which("setsid")
        if setsid is None:
            raise RuntimeError("setsid (util-linux) not found")
        self.proc = subprocess.Popen(
            [setsid, "-f", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.chan = LineChannel(self.proc, TIMEOUT_S)
        first = self.readline()
        if not first.startswith("ready "):
            raise RuntimeError(f"memtarget did not get ready: {first!r}")
        self.pid = int(first.split()[1])
        self.proc.wait(timeout=TIMEOUT_S)  # setsid's own process ends right after its fork

    def readline(self) -> str:
        return self.chan.readline()

    def cmd(self, line: str) -> str:
        return self.chan.cmd(line)

    def ok(self, line: str) -> None:
        ans = self.cmd(line)
        if ans != "ok":
            raise RuntimeError(f"memtarget: {line!r} -> {ans!r}")

    def addr(self, line: str) -> int:
        """A command that answers `addr 0x...`."""
        ans = self.cmd(line)
        if not ans.startswith("addr "):
            raise RuntimeError(f"memtarget: {line!r} -> {ans!r}")
        return int(ans.split()[1], 16)

    def close(self) -> None:
        # Not our child: wait for its death on a pidfd (readable once it has exited), not waitpid.
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            pidfd = -1
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if pidfd >= 0:
            select.select([pidfd], [], [], TIMEOUT_S)
            os.close(pidfd)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def ckpt(*argv: str) -> str:
    """`ckpt ARGV` through the CLI's own main(), in this process; its stdout. Raises on failure or
    on anything printed to stderr (ckpt's warnings go there; none is expected here)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = ckpt_main(list(argv))
    except SystemExit as e:  # argparse's refusal
        rc = e.code if isinstance(e.code, int) else 2
    if rc != 0 or err.getvalue().strip():
        raise RuntimeError(f"ckpt {' '.join(argv)} exited {rc}: {err.getvalue().strip()}")
    return out.getvalue()


def ckpt_json(*argv: str) -> dict[str, Any]:
    res: dict[str, Any] = json.loads(ckpt(*argv, "--json"))
    return res


@dataclass
class Snapshot:
    """A stopped target's memory: each dumped mapping's bytes, and which of its pages were present."""

    mem: dict[int, bytes] = field(default_factory=dict)
    present: dict[int, np.ndarray] = field(default_factory=dict)


def snapshot(pid: int, vmas: Sequence[VmaRecord]) -> Snapshot:
    """The stopped target's bytes for every mapping the layer dumped, read without disturbing it.

    Reading a non-present page through /proc/PID/mem would fault it in (and on a soft-dirty
    kernel could change what the next dump sees), so such pages are taken by the kernel's rule
    instead: anonymous ones read as zeros, those of a private file mapping as the file. [vdso] is
    read whole (its pages are kernel text).
    """
    snap = Snapshot()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for v in vmas:
            if not v.dumped:
                continue
            n = (v.end - v.start) // PAGE
            if v.path == "[vdso]":
                snap.mem[v.start] = os.pread(fd, v.end - v.start, v.start)
                snap.present[v.start] = np.ones(n, bool)
                continue
            buf = bytearray(v.end - v.start)
            if v.inode and v.path.startswith("/"):
                buf[:] = _file_bytes(v)
            present = (read_pagemap(pid, v.start, v.end) & np.uint64(PM_PRESENT)) != 0
            for i in np.nonzero(present)[0]:
                o = int(i) * PAGE
                buf[o : o + PAGE] = os.pread(fd, PAGE, v.start + o)
            snap.mem[v.start] = bytes(buf)
            snap.present[v.start] = present
    finally:
        os.close(fd)
    return snap


def _file_bytes(v: VmaRecord) -> bytes:
    """What a private file mapping shows where it has no page of its own: the file (zeros past its end)."""
    with open(v.path, "rb") as f:
        return os.pread(f.fileno(), v.end - v.start, v.offset).ljust(v.end - v.start, b"\0")


@dataclass
class _Table:
    addr: np.ndarray
    state: np.ndarray
    layer: np.ndarray


def _present(view: MergedView) -> set[int]:
    """The pages the merged view holds (data or zero)."""
    pt = view.page_table()
    return {int(a) for a, st in zip(pt.addr, pt.state, strict=True) if st in (STATE_DATA, STATE_ZERO)}


def _dense(view: MergedView, dumped: list[VmaRecord]) -> _Table:
    """The page table with a row for every page of the dumped mappings (the view's own lists only the
    pages some layer names; the rest are absent): these targets are small."""
    pt = view.page_table()
    addr = np.concatenate(
        [np.arange(v.start, v.end, PAGE, dtype=np.uint64) for v in dumped] or [np.empty(0, np.uint64)]
    )
    row, _ = pt.lookup(addr)
    listed = row >= 0
    state = np.full(len(addr), STATE_ABSENT, dtype=np.uint8)
    state[listed] = pt.state[row[listed]]
    layer = np.full(len(addr), -1, dtype=np.int32)
    layer[listed] = pt.layer[row[listed]]
    return _Table(addr, state, layer)


def view_mismatch(view: MergedView, snap: Snapshot) -> str | None:
    """None if the merged view holds exactly the snapshot's bytes, else the first difference.

    Done on ckpt's page table rather than with MergedView.read, which walks page by page and opens
    the file again for each page a file mapping did not dump: ~2 s a layer under TCG over 9p.
    Data pages are read (and their digests checked) through Layer.read_page; zero pages and
    anonymous absent ones must be zeros in memory; a file mapping's absent page must be the file's.
    """
    dumped = [v for v in view.top.vmas if v.dumped]
    if [v.start for v in dumped] != list(snap.mem):
        return f"mappings differ: view {[hex(v.start) for v in dumped]}, memory {list(map(hex, snap.mem))}"
    pt = _dense(view, dumped)
    mem = np.frombuffer(b"".join(snap.mem.values()), np.uint8).reshape(-1, PAGE)
    present = np.concatenate(list(snap.present.values()))
    anon = np.concatenate([np.full(v.npages, v.anonymous) for v in dumped])
    zeros = (pt.state == STATE_ZERO) | ((pt.state == STATE_ABSENT) & anon)
    bad = zeros & mem.any(axis=1)
    for j in np.nonzero(pt.state == STATE_DATA)[0]:
        if view.layers[int(pt.layer[j])].read_page(int(pt.addr[j])) != mem[j].tobytes():
            bad[j] = True
    # Non-present pages of a file mapping came from the file in the snapshot too; a present one
    # the view calls absent must hold the file's bytes.
    for j in np.nonzero((pt.state == STATE_ABSENT) & ~anon & present)[0]:
        v = next(v for v in dumped if v.start <= int(pt.addr[j]) < v.end)
        o = int(pt.addr[j]) - v.start
        if _file_bytes(v)[o : o + PAGE] != mem[j].tobytes():
            bad[j] = True
    if bad.any():
        k = int(np.nonzero(bad)[0][0])
        addr = int(pt.addr[k])
        v = next(v for v in dumped if v.start <= addr < v.end)
        what = ("absent", "zero", "data")[int(pt.state[k])]
        return f"page {addr:#x} of {v.path or 'anon'} ({what} in the view) differs; {int(bad.sum())} differ"
    return None


def _set(a: np.ndarray | Iterable[int]) -> set[int]:
    return {int(x) for x in a}


def _rel(pages: set[int], lo: int, hi: int) -> list[int]:
    """Pages of [lo, hi) as sorted page indices relative to lo."""
    return sorted((p - lo) // PAGE for p in pages if lo <= p < hi)


def _pages(lo: int, hi: int) -> set[int]:
    return set(range(lo, hi, PAGE))


class Layout:
    """Where a page lies, in terms that survive ASLR, and which EXPLAINED place that is."""

    def __init__(self, vmas: Sequence[VmaRecord], threads: Sequence[dict[str, int]], target: str) -> None:
        self.vmas = sorted(vmas, key=lambda v: v.start)
        self.tls_pages = {r["fs_base"] - r["fs_base"] % PAGE for r in threads}
        self.target = target

    def vma(self, addr: int) -> VmaRecord | None:
        return next((v for v in self.vmas if v.start <= addr < v.end), None)

    def where(self, addr: int) -> dict[str, Any]:
        v = self.vma(addr)
        if v is None:
            return {"vma": "unmapped", "page": 0, "kind": None}
        i = self.vmas.index(v)
        below = self.vmas[i - 1] if i else None
        page = (addr - v.start) // PAGE
        near = [(addr - addr % PAGE - t) // PAGE for t in self.tls_pages]
        tls = next((d for d in sorted(near, key=abs) if abs(d) <= 1), None)
        name = os.path.basename(v.path) if v.path.startswith("/") else v.path or "anon"
        kind: str | None = None
        if tls is not None:
            name, page, kind = f"{name} (TLS of a thread)", tls, "tls"
        elif v.path == "[stack]":
            page, kind = -((v.end - addr) // PAGE), "stack"  # from the top: ASLR moves the start
        elif v.path == "[heap]":
            kind = "heap"
        elif v.path == "[vdso]":
            kind = "vdso"
        elif v.path.startswith("/"):
            page = (v.offset + addr - v.start) // PAGE  # the page of the file
            if v.perms.startswith("rw"):
                kind = "target data" if name == self.target else "libc data"
        elif below and below.end == v.start and below.path.startswith("/") and below.perms.startswith("rw"):
            # anonymous right after a file's rw mapping: that file's .bss
            base = os.path.basename(below.path)
            name = f"{base} .bss"
            kind = "target data" if base == self.target else "libc data"
        return {"vma": f"{name} {v.perms}", "page": page, "kind": kind}


def _kernel_dirty(pid: int, vmas: Sequence[Any]) -> set[int]:
    """Every page with pagemap bit 55, read while the target sits in read(); reading changes no bit."""
    out: set[int] = set()
    for v in vmas:
        if not v.readable or v.path in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
            continue
        ents = read_pagemap(pid, v.start, v.end)
        out |= {v.start + int(i) * PAGE for i in np.nonzero(ents & np.uint64(PM_SOFT_DIRTY))[0]}
    return out


PR_SET_THP_DISABLE = 41


def disable_thp() -> None:
    """No transparent huge pages for this process and every process it starts.

    The guest's Debian kernel has THP `always` and khugepaged's `max_ptes_none` is 511: once
    khugepaged gets to the target, it collapses any 2 MiB-aligned range lying whole inside an
    anonymous VMA with one page written since the last clear_refs (it skips ranges whose PTEs are
    all write-protected), filling the holes with zeros. The huge page is mapped with
    pmd_mkdirty(), which sets soft-dirty, so all 512 pages read dirty though the target wrote one
    (shown in the guest: docs/vm.md). glibc's 8 MiB thread stacks merge with the region mapped
    above them, and for some ASLR layouts (the top of that VMA less than ~70 pages past a 2 MiB
    boundary) such a range holds region or TLS pages; khugepaged wakes every 10 s, so only a slow
    (loaded) run met it: a range of the region and ~500 stack pages reported in one step. The
    flag is inherited by fork() and kept across execve(), so memtarget (through setsid) has it:
    its pages change only when it or ckpt writes them, which is what the scenario counts.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_THP_DISABLE): {os.strerror(err)}")


def _thp_state(pid: int) -> dict[str, int]:
    """The target's THP switch (/proc/PID/status THP_enabled) and huge pages (kB, smaps_rollup),
    and the kernel's THP counters (/proc/vmstat, for the record)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("THP_enabled:"):
                out["thp_enabled"] = int(line.split()[1])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                out["anon_huge_kb"] = int(line.split()[1])
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in ("thp_fault_alloc", "thp_collapse_alloc", "thp_split_pmd"):
                out[k] = int(v)
    return out


class Scenario:
    def __init__(self, memtarget: Path, workdir: Path, track: str, expect_auto: str) -> None:
        self.memtarget = memtarget
        self.dir = workdir / "dump"
        self.track = track
        self.expect_auto = expect_auto
        self.failures: list[str] = []
        self.steps: list[dict[str, Any]] = []
        self.present: set[int] = set()  # the pages present in the chain's last layer's merged view
        self.result: dict[str, Any] = {
            "track": track,
            "kernel": os.uname().release,
            "steps": self.steps,
            "explained": EXPLAINED,
        }
        self.soft_dirty_kernel = False

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def expect_eq(self, got: object, want: object, what: str) -> None:
        self.expect(got == want, f"{what}: got {got}, want {want}")

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        rep = ckpt_json("check")
        self.result["check"] = rep
        self.result["check_s"] = round(time.monotonic() - t0, 2)
        self.expect_eq(rep["auto_tracker"], self.expect_auto, "ckpt check: the tracker --track auto picks")
        feats = {k: bool(v["ok"]) for k, v in rep["features"].items()}
        have = (
            feats["soft-dirty"]
            if self.track == "soft-dirty"
            else feats["uffd-wp-async"] and feats["pagemap-scan"]
        )
        self.expect(have, f"ckpt check: no {self.track} here: {rep['features']}")
        # Pagemap bit 55 means something only where the tracker is soft-dirty (it clears the bits).
        self.soft_dirty_kernel = self.track == "soft-dirty" and bool(rep["features"]["soft-dirty"]["ok"])

        disable_thp()  # before the target starts: see disable_thp
        t = Target([str(self.memtarget), str(REGION_PAGES)])
        try:
            self.region = int(t.cmd("info").split()[1], 16)
            self.a = t.addr(f"mmap {A_PAGES}")
            self.b: int | None = None
            self._step(t, "full", [f"mmap {A_PAGES} -> A"])

            t.ok(f"write {' '.join(map(str, WRITE_PAGES))}")
            t.ok(f"same {SAME_PAGE}")
            self._step(t, "write", [f"write {' '.join(map(str, WRITE_PAGES))}", f"same {SAME_PAGE}"])

            self._step(t, "idle", [])

            self.b = t.addr(f"mmap {B_PAGES}")
            self._step(t, "new-mapping", [f"mmap {B_PAGES} -> B"], new=(self.b, self.b + B_PAGES * PAGE))

            t.ok(f"munmap {self.a:#x} {A_PAGES}")
            again = t.addr(f"mmap {A_PAGES}")
            self.expect_eq(hex(again), hex(self.a), "remap: the new mapping lands where A was")
            self._step(
                t, "remap", ["munmap A", f"mmap {A_PAGES} -> A"], new=(self.a, self.a + A_PAGES * PAGE)
            )

            heap0 = self._heap(t.pid)
            ans = t.cmd(f"sbrk {SBRK_BYTES}")
            self.expect(ans.startswith("brk "), f"sbrk -> {ans!r}")
            heap1 = self._heap(t.pid)
            self.expect_eq(heap1[0], heap0[0], "expand: the heap grows in place")
            self._step(t, "expand", [f"sbrk {SBRK_BYTES}"], new=(heap0[1], heap1[1]))
        finally:
            t.close()
        # A dump holds a process's memory: the directory and every layer are the owner's alone.
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [self.dir, *sorted(self.dir.iterdir())]}
        self.result["modes"] = modes
        want = {p.name: oct(0o700 if p.is_dir() else 0o600) for p in [self.dir, *sorted(self.dir.iterdir())]}
        self.expect_eq(modes, want, "modes of the dump directory and its layers")
        t1 = time.monotonic()
        ver = ckpt("verify", str(self.dir)).splitlines()  # every checksum of every layer
        self.expect_eq(len(ver), len(self.steps), "ckpt verify: layers checked")
        self.result["verify_s"] = round(time.monotonic() - t1, 2)
        self.result["total_s"] = round(time.monotonic() - t0, 2)
        return self.result

    @staticmethod
    def _heap(pid: int) -> tuple[int, int]:
        """[heap] as one range (with uffd-wp a grown heap is two VMAs: a registered one does not merge)."""
        hv = [v for v in read_maps(pid) if v.path == "[heap]"]
        if not hv:
            raise RuntimeError("memtarget has no [heap]")
        return min(v.start for v in hv), max(v.end for v in hv)

    def _step(self, t: Target, name: str, did: list[str], *, new: tuple[int, int] | None = None) -> None:
        """Dump (full for "full", else incremental), snapshot, and check what the layer holds."""
        full = name == "full"
        step: dict[str, Any] = {"step": name, "did": did}
        kernel: set[int] | None = None
        if self.soft_dirty_kernel and not full:
            kernel = _kernel_dirty(t.pid, read_maps(t.pid))
        args = ["dump", "--pid", str(t.pid), "-D", str(self.dir), "--leave-stopped"]
        args += ["--track", "auto"] if full else ["--incremental", "--track", self.track]
        t0 = time.monotonic()
        try:
            out = ckpt_json(*args)
            t1 = time.monotonic()
            with open_layer(out["layer"]) as view:
                snap = snapshot(t.pid, view.top.vmas)
                with open(f"/proc/{t.pid}/maps") as f:
                    step["maps"] = f.read().splitlines()
                step["thp"] = thp = _thp_state(t.pid)
                off = (thp.get("thp_enabled"), thp.get("anon_huge_kb"))
                self.expect_eq(off, (0, 0), f"{name}: the target's THP switch and huge pages (kB)")
                t2 = time.monotonic()
                os.kill(t.pid, signal.SIGCONT)
                bad = view_mismatch(view, snap)
                self.expect(bad is None, f"{name}: the merged view differs from the target's memory: {bad}")
                before, self.present = self.present, _present(view)
                if not full:
                    self._check(step, view, new, kernel, before)
        finally:
            os.kill(t.pid, signal.SIGCONT)  # --leave-stopped left it in a group-stop
        step["timing_s"] = {
            "dump": round(t1 - t0, 2),
            "snapshot": round(t2 - t1, 2),
            "check": round(time.monotonic() - t2, 2),
        }
        self.expect_eq(out["tracker"], self.track, f"{name}: the layer's tracker")
        self.expect_eq(out["incremental"], not full, f"{name}: incremental")
        step["layer"] = os.path.basename(out["layer"])
        for k in (
            "pages_total",
            "pages_dumped",
            "pages_zero",
            "pages_dirty",
            "pages_dirty_unchanged",
            "pages_absent",
            "freeze_ms",
        ):
            step[k] = out[k]
        self.steps.append(step)

    def _check(
        self,
        step: dict[str, Any],
        view: MergedView,
        new: tuple[int, int] | None,
        kernel: set[int] | None,
        before: set[int],
    ) -> None:
        name = step["step"]
        pg = view.top.pages
        data, zero, unch, absent = _set(pg.data), _set(pg.zero), _set(pg.unchanged), _set(pg.absent)
        reported = data | zero | unch | absent  # all the tracker called dirty (+ new mappings)
        fresh = {p for a, b in pg.fresh for p in range(int(a), int(b), PAGE)}
        ranges = {
            "region": (self.region, self.region + REGION_PAGES * PAGE),
            "A": (self.a, self.a + A_PAGES * PAGE),
        }
        if self.b is not None:
            ranges["B"] = (self.b, self.b + B_PAGES * PAGE)
        if new is not None and name == "expand":
            ranges["heap+"] = new  # the grown part of the heap
        step["pages"] = {
            rn: {
                "reported": _rel(reported, lo, hi),
                "stored": _rel(data, lo, hi),
                "zero": _rel(zero, lo, hi),
                "unchanged": _rel(unch, lo, hi),
                "absent": _rel(absent, lo, hi),
                "fresh": _rel(fresh, lo, hi),
                "merged": [],  # pages of the range that are dirty only as part of a new VMA (below)
            }
            for rn, (lo, hi) in ranges.items()
        }
        pages = step["pages"]

        # soft-dirty.txt: a new or expanded mapping is soft-dirty as a whole. The kernel keeps that
        # flag per VMA, so it takes in whatever the new mapping merged with ("wide" below). With
        # uffd-wp a registered VMA never merges with an unregistered one, so wide is the new range.
        vmas = view.top.vmas
        wide: set[int] = set()
        if new is not None:
            holding = [v for v in vmas if v.start < new[1] and new[0] < v.end]
            step["new_vma"] = [[v.start - new[0], v.end - new[0], v.perms, v.path] for v in holding]
            wide = set().union(*(_pages(v.start, v.end) for v in holding))
            step["merged_neighbour_pages"] = len(wide - _pages(*new))
            for rn, (lo, hi) in ranges.items():
                pages[rn]["merged"] = _rel(wide - _pages(*new), lo, hi)
            if self.track != "soft-dirty":
                self.expect_eq(
                    step["merged_neighbour_pages"], 0, f"{name}: uffd-wp: pages the new mapping merged with"
                )

        # The rule every tracker must follow exactly: reported = what the target wrote (or mapped
        # anew) in the step, plus the VMA-wide pages.
        touched = {
            "write": {"region": {*WRITE_PAGES, SAME_PAGE}},
            "remap": {"A": set(range(A_PAGES))},
            "new-mapping": {"B": set(range(B_PAGES))},
            "expand": {"heap+": set(range(len(range(*new, PAGE))) if new else set())},
        }.get(name, {})
        for rn, (lo, hi) in ranges.items():
            want = sorted(touched.get(rn, set()) | set(_rel(wide, lo, hi)))
            self.expect_eq(pages[rn]["reported"], want, f"{name}: {rn}: pages reported")
        # Stored: new bytes only. Pages rewritten with their own bytes and pages that are dirty only
        # because their VMA is, are "unchanged"; a fresh range (nothing to inherit) is stored whole.
        new_bytes = dict(touched)
        if name == "write":
            new_bytes["region"] = set(WRITE_PAGES)
        elif name == "remap":
            new_bytes = {}  # memtarget fills a new mapping the same way each time: A's old bytes
        for rn in ranges:
            fresh_here = set(pages[rn]["fresh"])
            want = sorted(new_bytes.get(rn, set()) | fresh_here)
            self.expect_eq(pages[rn]["stored"], want, f"{name}: {rn}: pages stored")
            self.expect_eq(pages[rn]["zero"], [], f"{name}: {rn}: zero pages")
        if name == "write":
            got = sorted(set(pages["region"]["unchanged"]) - set(_rel(wide, *ranges["region"])))
            self.expect_eq(got, [SAME_PAGE], f"{name}: region: pages dirty but unchanged")
        for rn in ("B", "heap+"):
            if rn in touched:
                self.expect_eq(
                    pages[rn]["fresh"], sorted(touched[rn]), f"{name}: {rn}: fresh (nothing to inherit)"
                )
        if name == "expand":
            self.expect(bool(touched["heap+"]), f"{name}: the heap did not grow")
        if name == "remap":
            # soft-dirty: the same bytes came back at the same place: "dirty but unchanged";
            # uffd-wp: a VMA that is not registered, dumped whole as fresh.
            got = sorted(pages["A"]["stored"] + pages["A"]["unchanged"])
            self.expect_eq(got, list(range(A_PAGES)), f"{name}: A: pages stored or unchanged")

        # Everything else the tracker reported must be explained, and few.
        inside = set().union(*(_pages(lo, hi) for lo, hi in ranges.values()))
        if self.track == "soft-dirty":
            inside |= wide
        threads = [tr.regs for tr in view.top.threads]
        lay = Layout(vmas, threads, os.path.basename(self.memtarget))
        extras = []
        for p in sorted(reported - inside):
            w = lay.where(p)
            v = next((v for v in vmas if v.start <= p < v.end), None)
            if w["kind"] is None and v is not None and v.path.startswith("/") and "w" not in v.perms:
                w["kind"] = "read in" if p not in before else None
            w["as"] = (
                "stored" if p in data else "zero" if p in zero else "unchanged" if p in unch else "absent"
            )
            extras.append(w)
        step["extras"] = extras
        self.expect(
            len(extras) <= MAX_EXTRAS,
            f"{name}: {len(extras)} pages reported besides the scenario's: {extras}",
        )
        odd = [e for e in extras if e["kind"] is None]
        self.expect(not odd, f"{name}: pages reported in unexplained places: {odd}")
        if self.track == "soft-dirty":
            self.expect(not any(e["kind"] == "vdso" for e in extras), f"{name}: soft-dirty reported [vdso]")

        # On a soft-dirty kernel: every page that had bit 55 just before the dump is in ckpt's answer
        # (bits only accumulate until ckpt reads and clears them in the freeze).
        if kernel is not None:
            dumped = set().union(*(_pages(v.start, v.end) for v in vmas if v.dumped))
            missed = sorted(hex(p) for p in (kernel & dumped) - reported)
            self.expect(not missed, f"{name}: pages with bit 55 that ckpt did not report: {missed}")
            step["kernel_soft_dirty"] = len(kernel & dumped)
            # Written in the window between that read and the freeze (TLS rseq, the spinner's counter).
            step["reported_not_in_kernel_read"] = [lay.where(p) for p in sorted(reported - kernel - fresh)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ckpt's soft-dirty scenario (issue 6); see the module docstring")
    p.add_argument("--memtarget", type=Path, required=True, help="compiled tests/targets/memtarget.c")
    p.add_argument("--track", required=True, choices=("soft-dirty", "uffd-wp"))
    p.add_argument("--expect-auto", required=True, help="the tracker `--track auto` must pick here")
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where the dump directory goes (default: a temp dir)"
    )
    ns = p.parse_args(argv)
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = ns.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ckpt-sd-")))
        sc = Scenario(ns.memtarget, workdir, ns.track, ns.expect_auto)
        try:
            res = sc.run()
        except Exception:
            # Keep what was seen so far; the traceback is the failure.
            res = sc.result
            sc.failures.append(traceback.format_exc())
    res["failures"] = sc.failures
    res["script_s"] = round(time.monotonic() - t0, 2)
    tmp = ns.out.with_name(ns.out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.rename(ns.out)
    for f in sc.failures:
        print(f"FAIL: {f}", file=sys.stderr)
    print(f"{len(sc.failures)} failure(s), {len(sc.steps)} dumps, {res['script_s']} s", file=sys.stderr)
    return 1 if sc.failures else 0


if __name__ == "__main__":
    sys.exit(main())
