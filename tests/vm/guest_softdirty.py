"""Issue 6: ckpt's own soft-dirty tracking, run on a kernel that has soft-dirty.

tests/vm/test_softdirty_guest.py runs this script in the QEMU guest (Debian's 6.1 kernel:
soft-dirty, no PAGEMAP_SCAN) with `--track soft-dirty`, and on the host (no soft-dirty, uffd-wp
+ PAGEMAP_SCAN) with `--track uffd-wp`, then compares the two results page for page.

It drives tests/targets/memtarget.c through a fixed scenario and dumps it after each step with
ckpt's own CLI code (`ckpt.cli.main`, in this process: every Python start costs ~2 s under TCG):

  full        `ckpt check`; mmap A (4 pages) and a 1-page PROT_NONE spacer S below it;
              `ckpt dump --track auto` must pick TRACK
  write       write region pages 3 17 40 63 (63 was never touched: a hole), rewrite page 5
              with its own bytes (dirty but unchanged)
  idle        nothing
  new-mapping mmap B (5 pages)
  remap       munmap A, mmap 4 pages again: the kernel hands out A's place again
  expand      sbrk 20000: the heap grows in place
  ... each followed by `ckpt dump --incremental --track TRACK --leave-stopped`

After each dump the stopped target's memory is read without disturbing it (pagemap + /proc/PID/mem
of present pages only) and compared with the layer's merged view. Where the kernel has soft-dirty,
pagemap bit 55 is also read just before each dump, to compare ckpt's answer with the kernel's.

The spacer S and the order of the steps keep A and B from merging with a neighbouring mapping: on
a soft-dirty kernel a merge marks the whole merged VMA dirty (the VMA-wide flag of an "expanded"
mapping), which would add the neighbour's pages; with uffd-wp a registered VMA never merges with
a new one. The script checks that A and B are VMAs of their own, so a libc that lays memory out
differently fails loudly instead of skewing the comparison.

Writes JSON to --out and exits 1 if any check failed (the failures are in the JSON and on stderr).
Standard library, numpy and ckpt only: it runs in the guest from the host's venv.
"""

from __future__ import annotations

import argparse
import contextlib
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
from pathlib import Path
from typing import Any

import numpy as np

from ckpt.cli import main as ckpt_main
from ckpt.image import MergedView
from ckpt.memory import PM_PRESENT, PM_SOFT_DIRTY, read_pagemap
from ckpt.proc.maps import PAGE_SIZE, Vma, read_maps

PAGE = PAGE_SIZE
REGION_PAGES = 64  # memtarget: [0,16) random, [16,32) zeros, [32,48) text, [48,64) never touched
A_PAGES = 4
B_PAGES = 5
WRITE_PAGES = (3, 17, 40, 63)
SAME_PAGE = 5
SBRK_BYTES = 20000
# Pages outside the scenario's own ranges that may be reported dirty in one step: the main
# thread's stack (it parsed a command; ckpt's injected syscalls put their arguments below its stack
# pointer and put the bytes back, after the tracker was re-armed), memtarget's .data/.bss (the
# spinning thread's counter, the random generator's state), libc's stdout FILE and its buffer in
# the heap. The same bound as tests/test_incremental.py.
MAX_EXTRAS = 12
TIMEOUT_S = 60.0


class Target:
    """memtarget, started through `setsid -f` so that it is not our child.

    This process ptraces it as `ckpt dump --pid` would; a dumper that is also the parent would get
    the target's wait reports through a second door. Commands and answers go over pipes, as in
    tests/util.py.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        setsid = shutil.which("setsid")
        if setsid is None:
            raise RuntimeError("setsid (util-linux) not found")
        self.proc = subprocess.Popen(
            [setsid, "-f", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self._buf = b""
        first = self.readline()
        if not first.startswith("ready "):
            raise RuntimeError(f"memtarget did not get ready: {first!r}")
        self.pid = int(first.split()[1])
        self.proc.wait(timeout=TIMEOUT_S)  # setsid's own process ends right after its fork

    def readline(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            r, _, _ = select.select([fd], [], [], TIMEOUT_S)
            if not r:
                raise TimeoutError(f"memtarget did not answer within {TIMEOUT_S} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("memtarget closed its stdout")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        return self.readline()

    def addr(self, line: str) -> int:
        """A command that answers `addr 0x...`."""
        ans = self.cmd(line)
        if not ans.startswith("addr "):
            raise RuntimeError(f"{line!r} -> {ans!r}")
        return int(ans.split()[1], 16)

    def close(self) -> None:
        # Not our child: wait for its exit on a pidfd (readable once it is dead), not with waitpid.
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
    """`ckpt ARGV` through the CLI's own main(), in this process; its stdout. Raises on failure."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = ckpt_main(list(argv))
    except SystemExit as e:  # argparse's refusal
        rc = e.code if isinstance(e.code, int) else 2
    if rc != 0 or err.getvalue().strip():
        # ckpt prints warnings on stderr; none is expected in this scenario.
        raise RuntimeError(f"ckpt {' '.join(argv)} exited {rc}: {err.getvalue().strip()}")
    return out.getvalue()


def ckpt_json(*argv: str) -> dict[str, Any]:
    res: dict[str, Any] = json.loads(ckpt(*argv, "--json"))
    return res


def snapshot(pid: int, view: MergedView) -> dict[int, bytes]:
    """The stopped target's bytes for every mapping the layer dumped, read without disturbing it.

    Reading a non-present page through /proc/PID/mem would fault it in (and, on a soft-dirty kernel,
    could change what the next dump sees), so such pages are taken by the kernel's rule instead:
    anonymous ones read as zeros, those of a private file mapping as the file. [vdso] is read whole.
    """
    out: dict[int, bytes] = {}
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for v in view.top.vmas:
            if not v.dumped:
                continue
            if v.path == "[vdso]":
                out[v.start] = os.pread(fd, v.end - v.start, v.start)
                continue
            buf = bytearray(v.end - v.start)
            if v.inode and v.path.startswith("/"):
                with open(v.path, "rb") as f:
                    f.seek(v.offset)
                    got = f.read(len(buf))
                buf[: len(got)] = got
            ents = read_pagemap(pid, v.start, v.end)
            for i in np.nonzero(ents & np.uint64(PM_PRESENT))[0]:
                o = int(i) * PAGE
                buf[o : o + PAGE] = os.pread(fd, PAGE, v.start + o)
            out[v.start] = bytes(buf)
    finally:
        os.close(fd)
    return out


def view_mismatch(view: MergedView, snap: dict[int, bytes]) -> str | None:
    """None if the merged view holds exactly the snapshot's bytes, else the first difference."""
    dumped = {v.start: v for v in view.top.vmas if v.dumped}
    if set(dumped) != set(snap):
        return f"mappings differ: view {sorted(map(hex, dumped))}, memory {sorted(map(hex, snap))}"
    for start, want in snap.items():
        got = view.read(start, len(want))
        if got != want:
            bad = next(i for i in range(0, len(want), PAGE) if got[i : i + PAGE] != want[i : i + PAGE])
            return f"page {start + bad:#x} of {dumped[start].path or 'anon'} differs"
    return None


def _set(a: np.ndarray | Iterable[int]) -> set[int]:
    return {int(x) for x in a}


def _in(pages: set[int], lo: int, hi: int) -> list[int]:
    """Pages of [lo, hi) as sorted page indices relative to lo."""
    return sorted((p - lo) // PAGE for p in pages if lo <= p < hi)


def _label(vmas: Sequence[Any], addr: int) -> tuple[str, int]:
    """Where a page lies, in terms that are the same from run to run (ASLR moves everything).

    File mappings: the file's name and the page's offset in the file. [stack]: pages below the
    top. Anonymous mappings: the first file mapping below them names them (ld.so and libc put their
    anonymous .bss/TLS right after their own mappings), and the page's index from their start.
    """
    prev = "?"
    for v in sorted(vmas, key=lambda v: v.start):
        if v.start <= addr < v.end:
            if v.path == "[stack]":
                return "[stack]", -((v.end - addr) // PAGE)
            if v.path.startswith("/"):
                return f"{os.path.basename(v.path)} {v.perms}", (v.offset + addr - v.start) // PAGE
            if v.path:
                return v.path, (addr - v.start) // PAGE
            return f"anon {v.perms} after {prev}", (addr - v.start) // PAGE
        if v.path.startswith("/"):
            prev = os.path.basename(v.path)
    return "unmapped", 0


def _extra_kind(label: str, target_name: str) -> str | None:
    """Which of the expected sources of extra dirty pages a label belongs to (None: unexplained)."""
    if label == "[stack]":
        return "main thread stack"
    if label.startswith(target_name) or label == f"anon rw-p after {target_name}":
        return "memtarget .data/.bss"
    if label == "[heap]":
        return "heap (stdout buffer)"
    if label.startswith("libc.so") or label == "anon rw-p after libc.so.6":
        return "libc data (stdout FILE, locks)"
    if label.startswith("ld-linux") or label.startswith("anon rw-p after ld-linux"):
        return "ld.so data / TLS"
    return None


def _kernel_soft_dirty(pid: int, ranges: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Pagemap bit 55 over the named ranges, read while the target sits in read(): the kernel's own
    answer, to hold ckpt's against. Reading pagemap changes no bit."""
    out = {}
    for name, (lo, hi) in ranges.items():
        ents = read_pagemap(pid, lo, hi)
        out[name] = [int(i) for i in np.nonzero(ents & np.uint64(PM_SOFT_DIRTY))[0]]
    return out


class Scenario:
    def __init__(self, memtarget: Path, workdir: Path, track: str, expect_auto: str) -> None:
        self.memtarget = memtarget
        self.dir = workdir / "dump"
        self.track = track
        self.expect_auto = expect_auto
        self.failures: list[str] = []
        self.steps: list[dict[str, Any]] = []
        self.layers: list[tuple[str, dict[int, bytes]]] = []
        self.result: dict[str, Any] = {"track": track, "kernel": os.uname().release, "steps": self.steps}

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def expect_eq(self, got: object, want: object, what: str) -> None:
        self.expect(got == want, f"{what}: got {got}, want {want}")

    # ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        rep = ckpt_json("check")
        self.result["check"] = rep
        self.result["check_s"] = round(time.monotonic() - t0, 2)
        sd = rep["features"]["soft-dirty"]["ok"]
        self.expect_eq(rep["auto_tracker"], self.expect_auto, "ckpt check: tracker picked by --track auto")
        self.expect_eq(sd, self.track == "soft-dirty", "ckpt check: soft-dirty reported available")
        self.soft_dirty_kernel = bool(sd)

        t = Target([str(self.memtarget), str(REGION_PAGES)])
        try:
            self._steps(t)
        finally:
            t.close()
        # Every layer's merged view is still its own moment, now that newer layers sit on top.
        for layer, snap in self.layers:
            bad = view_mismatch(_open(layer), snap)
            self.expect(bad is None, f"{os.path.basename(layer)}: merged view differs from memory at its dump: {bad}")
        t1 = time.monotonic()
        ver = ckpt("verify", self.layers[-1][0]).splitlines()
        self.expect_eq(len(ver), len(self.layers), "ckpt verify: layers checked")
        self.result["verify"] = ver
        self.result["verify_s"] = round(time.monotonic() - t1, 2)
        self.result["total_s"] = round(time.monotonic() - t0, 2)
        self.result["failures"] = self.failures
        return self.result

    def _steps(self, t: Target) -> None:
        info = t.cmd("info").split()
        self.region = int(info[1], 16)
        self.target_name = os.path.basename(self.memtarget)
        self.a = t.addr(f"mmap {A_PAGES}")
        s = t.addr("mmap 1")
        self.expect(t.cmd(f"mprotect {s:#x} 1 none") == "ok", "mprotect of the spacer")
        self.b: int | None = None
        self.heap_before: tuple[int, int] | None = None

        self._dump(t, "full", [], full=True)
        self._dump(t, "write", [f"write {' '.join(map(str, WRITE_PAGES))}", f"same {SAME_PAGE}"])
        self._dump(t, "idle", [])
        self.b = t.addr(f"mmap {B_PAGES}")
        self._dump(t, "new-mapping", [f"mmap {B_PAGES}"], done=True)
        self.expect(t.cmd(f"munmap {self.a:#x} {A_PAGES}") == "ok", "munmap A")
        again = t.addr(f"mmap {A_PAGES}")
        self.expect_eq(hex(again), hex(self.a), "remap: the new mapping lands where A was")
        self._dump(t, "remap", [f"munmap A {A_PAGES}", f"mmap {A_PAGES}"], done=True)
        self.heap_before = self._heap(t.pid)
        ans = t.cmd(f"sbrk {SBRK_BYTES}")
        self.expect(ans.startswith("brk "), f"sbrk -> {ans!r}")
        self._dump(t, "expand", [f"sbrk {SBRK_BYTES}"], done=True)

    @staticmethod
    def _heap(pid: int) -> tuple[int, int]:
        """[heap] as one range; with uffd-wp a grown heap is two VMAs (a registered VMA does not merge)."""
        hv = [v for v in read_maps(pid) if v.path == "[heap]"]
        if not hv:
            raise RuntimeError("memtarget has no [heap]")
        return min(v.start for v in hv), max(v.end for v in hv)

    def _ranges(self, pid: int) -> dict[str, tuple[int, int]]:
        r = {"region": (self.region, self.region + REGION_PAGES * PAGE), "A": (self.a, self.a + A_PAGES * PAGE)}
        if self.b is not None:
            r["B"] = (self.b, self.b + B_PAGES * PAGE)
        r["heap"] = self._heap(pid)
        return r

    def _dump(self, t: Target, name: str, commands: list[str], *, full: bool = False, done: bool = False) -> None:
        """Run the step's commands (unless `done`), dump, snapshot, and record what the layer holds."""
        if not done:
            for c in commands:
                ans = t.cmd(c)
                self.expect_eq(ans, "ok", f"{name}: {c}")
        ranges = self._ranges(t.pid)
        step: dict[str, Any] = {"step": name, "commands": commands}
        if self.soft_dirty_kernel and not full:
            step["kernel_soft_dirty"] = _kernel_soft_dirty(t.pid, ranges)
        args = ["dump", "--pid", str(t.pid), "-D", str(self.dir), "--leave-stopped"]
        args += ["--track", "auto"] if full else ["--incremental", "--track", self.track]
        t0 = time.monotonic()
        try:
            out = ckpt_json(*args)
            step["dump_s"] = round(time.monotonic() - t0, 2)
            view = _open(out["layer"])
            snap = snapshot(t.pid, view)
        finally:
            os.kill(t.pid, signal.SIGCONT)  # --leave-stopped left it in a group-stop
        self.layers.append((out["layer"], snap))
        self.expect_eq(out["tracker"], self.track, f"{name}: tracker of the layer")
        self.expect_eq(out["incremental"], not full, f"{name}: incremental")
        for k in ("pages_total", "pages_dumped", "pages_zero", "pages_dirty", "pages_dirty_unchanged",
                  "pages_absent", "freeze_ms"):
            step[k] = out[k]
        step["layer"] = os.path.basename(out["layer"])
        bad = view_mismatch(view, snap)
        self.expect(bad is None, f"{name}: merged view differs from the target's memory: {bad}")
        if not full:
            self._record(step, view, ranges)
        self.steps.append(step)

    def _record(self, step: dict[str, Any], view: MergedView, ranges: dict[str, tuple[int, int]]) -> None:
        name = step["step"]
        pg = view.top.pages
        data, zero, unch, absent = _set(pg.data), _set(pg.zero), _set(pg.unchanged), _set(pg.absent)
        reported = data | zero | unch | absent
        fresh = [(int(a), int(b)) for a, b in pg.fresh]
        step["fresh"] = [[a, b] for a, b in fresh]
        pages: dict[str, dict[str, list[int]]] = {}
        for rn, (lo, hi) in ranges.items():
            pages[rn] = {
                "reported": _in(reported, lo, hi),
                "stored": _in(data, lo, hi),
                "zero": _in(zero, lo, hi),
                "unchanged": _in(unch, lo, hi),
                "absent": _in(absent, lo, hi),
                "fresh": _in({p for a, b in fresh for p in range(a, b, PAGE)}, lo, hi),
                "npages": [(hi - lo) // PAGE],
            }
        step["pages"] = pages
        inside = {p for lo, hi in ranges.values() for p in range(lo, hi, PAGE)}
        vmas = view.top.vmas
        extras = []
        for p in sorted(reported - inside):
            label, idx = _label(vmas, p)
            kind = "data" if p in data else "zero" if p in zero else "unchanged" if p in unch else "absent"
            extras.append({"where": label, "page": idx, "as": kind, "why": _extra_kind(label, self.target_name)})
        step["extras"] = extras

        # What every tracker must report, from what the target did.
        rg = pages["region"]
        want_region = sorted({*WRITE_PAGES, SAME_PAGE}) if name == "write" else []
        self.expect_eq(rg["reported"], want_region, f"{name}: region pages reported dirty")
        self.expect_eq(rg["stored"], sorted(WRITE_PAGES) if name == "write" else [], f"{name}: region pages stored")
        if name == "write":
            self.expect_eq(rg["unchanged"], [SAME_PAGE], f"{name}: region pages dirty but unchanged")
        everything_a = list(range(A_PAGES))
        self.expect_eq(pages["A"]["reported"], everything_a if name == "remap" else [], f"{name}: pages of A reported")
        if "B" in pages:
            everything_b = list(range(B_PAGES))
            want_b = everything_b if name == "new-mapping" else []
            self.expect_eq(pages["B"]["reported"], want_b, f"{name}: pages of B reported")
            if name == "new-mapping":
                self.expect_eq(pages["B"]["stored"], everything_b, f"{name}: pages of B stored")
                self.expect_eq(pages["B"]["fresh"], everything_b, f"{name}: B is a fresh range")
        if name == "expand":
            assert self.heap_before is not None
            lo, hi = ranges["heap"]
            grown = list(range((self.heap_before[1] - lo) // PAGE, (hi - lo) // PAGE))
            self.expect(bool(grown), f"{name}: the heap did not grow ({self.heap_before} -> {ranges['heap']})")
            got = set(pages["heap"]["reported"])
            self.expect(set(grown) <= got, f"{name}: grown heap pages {grown} not all reported ({sorted(got)})")
            if self.track == "soft-dirty":
                # soft-dirty.txt: an expanded mapping is soft-dirty as a whole, written or not.
                self.expect_eq(sorted(got), list(range((hi - lo) // PAGE)), f"{name}: whole heap reported")
        if len(extras) > MAX_EXTRAS:
            self.failures.append(f"{name}: {len(extras)} extra pages reported outside the scenario: {extras}")
        unexplained = [e for e in extras if e["why"] is None]
        self.expect(not unexplained, f"{name}: extra pages in unexpected places: {unexplained}")

        # On a soft-dirty kernel ckpt must say what pagemap bit 55 said just before the dump.
        ksd = step.get("kernel_soft_dirty")
        if ksd is not None:
            for rn in ranges:
                self.expect_eq(pages[rn]["reported"], ksd[rn], f"{name}: {rn}: ckpt's pages vs pagemap bit 55")


def _open(layer: str) -> MergedView:
    from ckpt.api import open_layer

    return open_layer(layer)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--memtarget", type=Path, required=True, help="compiled tests/targets/memtarget.c")
    p.add_argument("--track", required=True, choices=("soft-dirty", "uffd-wp"))
    p.add_argument("--expect-auto", required=True, help="the tracker `--track auto` must pick here")
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    p.add_argument("--workdir", type=Path, default=None, help="dump directory parent (default: a temp dir)")
    ns = p.parse_args(argv)
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = ns.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ckpt-sd-")))
        sc = Scenario(ns.memtarget, workdir, ns.track, ns.expect_auto)
        try:
            res = sc.run()
        except (Exception, SystemExit):
            # Report what was seen so far; the traceback is the failure.
            res = sc.result
            res["failures"] = [*sc.failures, traceback.format_exc()]
    res["script_s"] = round(time.monotonic() - t0, 2)
    tmp = ns.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.rename(ns.out)
    for f in res["failures"]:
        print(f"FAIL: {f}", file=sys.stderr)
    print(f"{len(res['failures'])} failure(s); {len(sc.steps)} dumps; {res['script_s']} s", file=sys.stderr)
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
