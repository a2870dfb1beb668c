"""The VmFlags skip (ckpt/proc/flagwatch.py, ckpt/proc/ptcache.py): an incremental dump that keeps
the last smaps reading because the flag counters say nothing changed records exactly what a fresh
smaps read shows, whatever the target did between two dumps; and it does keep it when nothing did.

A real target (tests/targets/flagchange.c) changes flags on command: madvise from its main thread,
from a new thread, from a thread that was counted since the last dump (and from one that exits
afterwards), mlock, mprotect, mmap, munmap, stack growth, guard regions, a userfaultfd of its own.
After each change, an incremental dump with the same PageTablesCache: its layer's VmFlags and guard
regions must equal what /proc/PID/smaps and PAGEMAP_SCAN show now (the target is idle meanwhile)."""

from __future__ import annotations

import importlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from ckpt.dump import dump
from ckpt.image import open_layer
from ckpt.proc import flagwatch, ptcache
from ckpt.proc.flagwatch import FlagWatch, Unavailable
from ckpt.proc.maps import read_maps
from ckpt.proc.props import read_guards, read_vmflags
from ckpt.proc.ptcache import PageTablesCache
from ckpt.ptrace import sigchld
from ckpt.track.uffdwp import UffdWpTracker
from tests.util import HYPOTHESIS_SEED, Target, assert_view_equals_memory, build_c, run_ckpt

dump_mod = importlib.import_module("ckpt.dump")  # (ckpt.dump, the attribute, is the function)

PAGES = 64
MADV = {
    "NORMAL": 0, "RANDOM": 1, "SEQUENTIAL": 2, "DONTNEED": 4, "DONTFORK": 10, "DOFORK": 11,
    "HUGEPAGE": 14, "NOHUGEPAGE": 15, "DONTDUMP": 16, "DODUMP": 17, "WIPEONFORK": 18,
    "KEEPONFORK": 19, "COLD": 20, "GUARD_INSTALL": 102, "GUARD_REMOVE": 103,
}  # fmt: skip
PAGES_ONLY = {"DONTNEED", "COLD"}  # advice that leaves every flag as it was


def _watch_works() -> bool:
    try:
        FlagWatch(os.getpid(), [os.getpid()]).close()
    except (Unavailable, OSError):
        return False
    return True


pytestmark = pytest.mark.skipif(not _watch_works(), reason="no syscall tracepoint counters here")


class Dumper:
    """A chain of one target, every dump sharing one PageTablesCache (as a migration's rounds do)."""

    def __init__(self, t: Target, d: Path) -> None:
        self.t, self.d, self.cache = t, d, PageTablesCache()
        self.layers = 0

    def dump(self) -> Any:
        with sigchld.blocked():
            r = dump(
                self.t.pid,
                self.d,
                incremental=self.layers > 0,
                track="uffd-wp",
                walks_cache=self.cache,
                leave_stopped=True,
            )
        self.layers += 1
        self.checked(r.layer)
        return r

    def checked(self, layer: str | Path) -> None:
        """check() of the target held where the dump left it (stopped, as --leave-stopped does:
        no instruction of it ran since): a command's answer read just before the freeze (a change
        made in its window) does not wait for the rest of that command's stdio bookkeeping, which
        the freeze may catch half done; then it runs on."""
        try:
            self.check(layer)
        finally:
            os.kill(self.t.pid, signal.SIGCONT)

    def check(self, layer: str | Path) -> None:
        """The layer's VmFlags and guard regions are what the kernel shows now (the target idles),
        and the chain's pages its memory (a freeze that took the registrations from the kept flags,
        uffdwp.begin_dirty(flags=...), lost no write)."""
        meta = open_layer(layer).layers[0].meta  # the newest
        pid = self.t.pid
        assert_view_equals_memory(pid, layer)
        assert {v.start: v.flags for v in meta.vmas} == read_vmflags(pid), self.cache.why
        assert meta.props is not None
        assert [list(g) for g in meta.props.guards] == read_guards(pid, read_maps(pid)), self.cache.why

    def skipped(self) -> bool:
        return self.cache.why is None


@contextmanager
def target(tmp_path: Path) -> Iterator[tuple[Target, int, Dumper]]:
    t = Target([str(build_c("flagchange"))])
    try:
        base = int(t.ready.split()[2], 16)
        yield t, base, Dumper(t, tmp_path)
    finally:
        t.close()


def ok(t: Target, line: str) -> str:
    got = t.cmd(line)
    assert got.startswith("ok"), (line, got)
    return got


def registrations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """Per incremental freeze: whether begin_dirty took the registrations from the kept flags, and
    whether recheck() then asked the kernel after all."""
    out: list[tuple[bool, bool]] = []
    begin, recheck = UffdWpTracker.begin_dirty, UffdWpTracker.recheck

    def begin_noted(self: UffdWpTracker, *a: Any, **kw: Any) -> Any:
        b = begin(self, *a, **kw)
        out.append((b.assumed, False))
        return b

    def recheck_noted(self: UffdWpTracker, frozen: Any, b: Any, vmas: Any) -> None:
        if b.assumed:
            out[-1] = (True, True)
        recheck(self, frozen, b, vmas)

    monkeypatch.setattr(UffdWpTracker, "begin_dirty", begin_noted)
    monkeypatch.setattr(UffdWpTracker, "recheck", recheck_noted)
    return out


def walks_in_freeze(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the VmFlags/guards walks a dump starts in its freeze (dump.PageTableReads): a count,
    where a bound on the phase's milliseconds was missed on a loaded machine without any walk."""
    n = [0]
    real = dump_mod.PageTableReads

    class Counted(real):  # type: ignore[misc,valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            n[0] += 1
            super().__init__(*a, **kw)

    monkeypatch.setattr(dump_mod, "PageTableReads", Counted)
    return n


def test_idle_keeps_the_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with target(tmp_path) as (t, _base, dm):
        dm.dump()
        walks = walks_in_freeze(monkeypatch)
        for _ in range(3):
            ok(t, "write 5")  # pages only
            ok(t, f"madv {MADV['DONTNEED']} 0 {PAGES}")
            dm.dump()
            assert dm.skipped()
            assert walks == [0]  # the reading kept: no walk in the freeze
        assert dm.cache.skips == 3


@pytest.mark.parametrize(
    "change",
    [
        f"madv {MADV['DONTFORK']} 0 {PAGES}",
        f"madv {MADV['WIPEONFORK']} 0 {PAGES}",
        f"madv {MADV['HUGEPAGE']} 0 {PAGES}",
        f"madv {MADV['NOHUGEPAGE']} 0 {PAGES}",
        f"madv {MADV['DONTDUMP']} 0 {PAGES}",
        f"madv {MADV['RANDOM']} 0 {PAGES}",
        f"madv {MADV['GUARD_INSTALL']} 3 2",
        f"tmadv {MADV['DONTFORK']} 0 {PAGES}",
        f"lmadv {MADV['DONTFORK']} 0 {PAGES}",
        f"xmadv {MADV['DONTFORK']} 0 {PAGES}",
        f"mlock 0 {PAGES}",
        f"mprot 1 0 {PAGES}",
    ],
)
def test_a_change_the_maps_do_not_show_is_counted(tmp_path: Path, change: str) -> None:
    """Over the whole region (or a guard, which maps never shows) the maps lines stay the same: only
    the counters can tell. The counted thread that exits (xmadv) still counts."""
    with target(tmp_path) as (t, _base, dm):
        dm.dump()
        before = Path(f"/proc/{t.pid}/maps").read_text()
        ok(t, change)
        if not change.startswith(("tmadv", "xmadv")):  # (a thread's stack comes and goes)
            assert Path(f"/proc/{t.pid}/maps").read_text().count("\n") == before.count("\n")
        dm.dump()
        assert not dm.skipped()
        dm.dump()  # and the reading taken then is kept by the next dump
        assert dm.skipped(), dm.cache.why


def test_mappings_and_stack(tmp_path: Path) -> None:
    with target(tmp_path) as (t, _base, dm):
        dm.dump()
        addr = int(ok(t, "map 8").split()[1], 16)
        dm.dump()
        assert not dm.skipped()
        ok(t, f"unmap {addr} 8")
        dm.dump()
        assert not dm.skipped()
        ok(t, "grow 512")  # the [stack] mapping's start moves, with no syscall at all
        dm.dump()
        assert not dm.skipped() and dm.cache.why == "the mappings changed"
        dm.dump()
        assert dm.skipped()


@pytest.mark.parametrize("scan_thread", [False, True])
def test_own_userfaultfd_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scan_thread: bool) -> None:
    """Another userfaultfd could be handed to a process that registers ranges from outside. The
    counters saw nothing; the fd table, as the freeze's grab read it (looked at beside the batch's
    run, or with ``scan_thread`` once the dirty scans have started on their thread: dump.py
    _Early), tells: the walks are read in that freeze after all (and the layer's flags are the
    kernel's: Dumper.check), and the next freeze does not vouch either."""
    if scan_thread:  # (as for a big process: its scans on a thread, the fd records after their start)
        monkeypatch.setattr(dump_mod, "PAGETABLES_BACKGROUND", 0)
    with target(tmp_path) as (t, _base, dm):
        dm.dump()
        ok(t, "write 5")
        dm.dump()
        assert dm.skipped()  # (nothing changed: the walks kept)
        walks = walks_in_freeze(monkeypatch)
        begun = registrations(monkeypatch)
        ok(t, "write 7")
        dm.dump()
        assert dm.skipped() and begun == [(True, False)]  # (registrations from the kept flags)
        ok(t, "uffd")
        dm.dump()
        assert dm.cache.why is not None and "userfaultfd" in dm.cache.why
        assert walks[0] == 1
        # The flags were taken, then the fd check (before the scans) failed: the kernel's scan after all.
        assert begun[1:] == [(True, True)]
        dm.dump()
        assert dm.cache.why is not None and "userfaultfd" in dm.cache.why and walks[0] == 2


# -- sequences of changes, generated -----------------------------------------------------------------

SPANS = st.one_of(st.just((0, PAGES)), st.tuples(st.integers(0, PAGES - 1), st.integers(1, 8)))


@st.composite
def changes(draw: Callable[..., Any]) -> str:
    kind = draw(st.sampled_from(["madv", "tmadv", "lmadv", "mlock", "munlock", "mprot", "write", "grow"]))
    off, n = draw(SPANS)
    n = min(n, PAGES - off)
    if kind in ("madv", "tmadv", "lmadv"):
        return f"{kind} {MADV[draw(st.sampled_from(sorted(MADV)))]} {off} {n}"
    if kind == "mprot":
        return f"mprot {draw(st.sampled_from([1, 3]))} {off} {n}"
    if kind == "write":
        return f"write {off}"
    if kind == "grow":
        return f"grow {draw(st.sampled_from([64, 256]))}"
    return f"{kind} {off} {n}"


@seed(HYPOTHESIS_SEED)
@settings(
    max_examples=int(12 * float(os.environ.get("CKPT_HYPOTHESIS_SCALE", "1"))),
    deadline=None,
    database=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.generate]
    + ([Phase.shrink] if os.environ.get("CKPT_HYPOTHESIS_SHRINK") else []),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(st.lists(changes(), max_size=3), min_size=1, max_size=5))
def test_generated_changes(tmp_path_factory: pytest.TempPathFactory, steps: list[list[str]]) -> None:
    """Between two dumps, a few changes (none too); after each dump the layer equals a fresh read.
    A dump after no change at all keeps the reading."""
    with target(tmp_path_factory.mktemp("fw")) as (t, _base, dm):
        dm.dump()
        for group in steps:
            for line in group:
                got = t.cmd(line)  # mlock/mprotect over a guard may fail: the flags stay as they are
                assert got.startswith(("ok", "err")), (line, got)
            dm.dump()
            if all(_quiet(c) for c in group):
                assert dm.skipped(), (group, dm.cache.why)


def _quiet(change: str) -> bool:
    """A change that no counter counts: pages only, from a thread counted since the last dump."""
    w = change.split()
    return w[0] == "write" or (w[0] in ("madv", "lmadv") and int(w[1]) in {MADV[a] for a in PAGES_ONLY})


def test_without_counters_every_dump_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracepoints (no tracefs, no permission): nothing is kept, and the flags are still right."""
    import ckpt.proc.flagwatch as fw

    def none() -> tuple[int, ...]:
        raise fw.Unavailable("no syscall tracepoints in tracefs")

    monkeypatch.setattr(fw, "_tracepoint_ids", none)
    with target(tmp_path) as (t, _base, dm):
        dm.dump()
        dm.dump()
        assert dm.cache.why == "no syscall tracepoints in tracefs" and dm.cache.skips == 0
        ok(t, f"madv {MADV['DONTFORK']} 0 {PAGES}")
        dm.dump()
        assert not dm.skipped()


@pytest.mark.parametrize("change", [None, f"madv {MADV['WIPEONFORK']} 0 {PAGES}", "map 4"])
def test_rounds_then_final(tmp_path: Path, change: str | None) -> None:
    """As `ckpt migrate` runs them: pre-dumps (their walk read after the thaw) sharing one cache with
    the final dump, which keeps the last round's walk only if nothing changed since that round."""
    with target(tmp_path) as (t, _base, dm):
        with sigchld.blocked():
            for i in range(3):
                dump(t.pid, tmp_path, incremental=i > 0, pre_dump=True, track="uffd-wp", walks_cache=dm.cache)
            if change:
                ok(t, change)
            r = dump(t.pid, tmp_path, incremental=True, track="uffd-wp", walks_cache=dm.cache)
        dm.check(r.layer)
        assert dm.skipped() == (change is None), dm.cache.why


def test_a_32_bit_call_is_counted(tmp_path: Path) -> None:
    """int 0x80 from a 64-bit process: the per-syscall tracepoints skip it, the i386 number counts."""
    with target(tmp_path) as (t, _base, dm):
        low = int(ok(t, "low").split()[1], 16)
        assert low < 1 << 32
        dm.dump()
        maps = Path(f"/proc/{t.pid}/maps").read_text()
        assert ok(t, f"i386 376 {low} {16 * 4096} 0").split()[1] == "0"  # mlock2(low, 16 pages, 0)
        assert Path(f"/proc/{t.pid}/maps").read_text() == maps  # only the counters can tell
        dm.dump()
        assert dm.cache.why is not None and "call(s)" in dm.cache.why
        assert "lo" in read_vmflags(t.pid)[low].split()


def test_a_32_bit_madvise_beside_a_restarted_sleep(tmp_path: Path) -> None:
    """The i386 madvise is restart_syscall's number natively. A thread interrupted in
    clock_nanosleep by every freeze makes one restart_syscall after each thaw: the reading is still
    kept; one more call of that number (a 32-bit madvise) is counted."""
    with target(tmp_path) as (t, _base, dm):
        low = int(ok(t, "low").split()[1], 16)
        ok(t, "sleeper")
        dm.dump()
        dm.dump()  # (the new thread's stack: read again)
        for _ in range(2):
            dm.dump()
            assert dm.skipped(), dm.cache.why
        assert ok(t, f"i386 219 {low} {16 * 4096} {MADV['DONTFORK']}").split()[1] == "0"
        dm.dump()
        assert dm.cache.why is not None and "call(s)" in dm.cache.why
        assert "dc" in read_vmflags(t.pid)[low].split()


class NoCache(Dumper):
    """Each dump as `ckpt dump` makes it from the shell: no cache kept from one dump to the next."""

    def dump(self) -> Any:
        with sigchld.blocked():
            r = dump(self.t.pid, self.d, incremental=self.layers > 0, track="uffd-wp", leave_stopped=True)
        self.layers += 1
        self.checked(r.layer)
        return r


@pytest.mark.parametrize(
    "window",
    [
        None,
        f"madv {MADV['DONTFORK']} 0 {PAGES}",
        f"xmadv {MADV['HUGEPAGE']} 0 {PAGES}",
        f"tmadv {MADV['NOHUGEPAGE']} 0 {PAGES}",
    ],
)
def test_a_dump_of_its_own_reads_before_the_freeze(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: str | None
) -> None:
    """Without a cache, an incremental reads the walk while the target runs, counters opened first;
    the freeze keeps it, unless a change fell between that reading and the freeze (made here, in the
    window, by the test: from the main thread, from a counted thread that then exits, from a new
    thread)."""
    seen: list[PageTablesCache] = []
    live = PageTablesCache.baseline_live

    def baseline_then_change(self: PageTablesCache, pid: int) -> None:
        live(self, pid)
        seen.append(self)
        if window:
            ok(t, window)

    monkeypatch.setattr(PageTablesCache, "baseline_live", baseline_then_change)
    monkeypatch.setattr(ptcache, "LIVE_WALK_MIN", 0)  # (the target is small)
    with target(tmp_path) as (t, _base, _dm):
        dm = NoCache(t, tmp_path)
        dm.dump()
        ok(t, f"madv {MADV['WIPEONFORK']} 0 {PAGES}")  # before the reading: it sees it
        walks = walks_in_freeze(monkeypatch)
        dm.dump()
        assert len(seen) == 1
        assert (seen[0].why is None) == (window is None), seen[0].why
        assert window or walks == [0]  # nothing changed: the live reading kept, no walk frozen


def test_a_small_process_keeps_its_walk_in_the_freeze(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live: list[int] = []
    real = ptcache.read_vmflags
    monkeypatch.setattr(ptcache, "read_vmflags", lambda pid: live.append(pid) or real(pid))
    with target(tmp_path) as (_t, _base, _dm):
        dm = NoCache(_t, tmp_path)
        dm.dump()
        walks = walks_in_freeze(monkeypatch)
        r = dm.dump()
        # Asked for a live reading, which does not walk a process this small; the freeze does.
        assert "smaps (before the freeze)" in r.phases_ms and live == [] and walks == [1]


def test_the_cli_dump(tmp_path: Path) -> None:
    """`ckpt dump --incremental` as a user runs it: the layer's flags are the process's."""
    with target(tmp_path) as (t, _base, dm):
        d = str(tmp_path / "chain")
        assert run_ckpt("dump", "--pid", str(t.pid), "-D", d, "--track", "uffd-wp").returncode == 0
        for change in (f"madv {MADV['DONTDUMP']} 0 {PAGES}", "write 3"):
            ok(t, change)
            out = run_ckpt("dump", "--pid", str(t.pid), "-D", d, "--incremental", "--json", check=True)
            dm.check(json.loads(out.stdout)["layer"])


def test_the_ids_are_got_before_the_seize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new ckpt process (no ids cached): the tracepoint ids, which may cost a child in a private
    mount namespace (no tracefs mounted), are got before the "seize" note, so never in a freeze."""
    monkeypatch.setattr(flagwatch, "_ids_cache", [])
    seen: list[tuple[str, bool]] = []

    def progress(phase: str, done: int, total: int) -> None:
        seen.append((phase, bool(flagwatch._ids_cache)))

    with target(tmp_path) as (t, _base, dm):
        with sigchld.blocked():
            dump(t.pid, tmp_path, track="uffd-wp", walks_cache=dm.cache, progress=progress)
        assert ("seize", True) in seen and ("seize", False) not in seen
