"""Full dumps of real processes under real ptrace (issue 2)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckpt.dump import dump
from ckpt.errors import TargetExited
from ckpt.image import Layer, find_layers, open_layer
from tests.util import PAGE, Target, build_c, run_ckpt, subreaper_on, subreaper_restore

Spawn = Callable[..., Target]


def _no_temp_files(d: Path) -> bool:
    return not d.exists() or not [p for p in os.listdir(d) if ".tmp" in p]


def _fnv(data: bytes) -> str:
    """memtarget's own checksum (FNV-1a 64)."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _running_untraced(t: Target) -> None:
    assert t.state() in ("S", "R"), t.state()
    assert t.tracer() == 0
    for tid in os.listdir(f"/proc/{t.pid}/task"):
        with open(f"/proc/{t.pid}/task/{tid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()


def test_full_dump_every_page_equals_memory(spawn: Spawn, datafile: Path, tmp_path: Path) -> None:
    """With --leave-stopped the target cannot change after the dump: every byte of every dumped
    mapping, as `read` gives it, must equal the stopped target's memory."""
    t = spawn("memtarget", "256", str(datafile))
    before = t.sum()
    d = tmp_path / "dump"
    r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--json", "--leave-stopped", check=True)
    out = json.loads(r.stdout)
    try:
        assert t.stopped_state() == "T" and t.tracer() == 0
        for k in (
            "layer",
            "parent",
            "pid",
            "tracker",
            "pages_dumped",
            "pages_total",
            "bytes_written",
            "freeze_ms",
            "held_ms",
            "elapsed_ms",
        ):
            assert k in out
        # held: the seize to the thaw's end, so never less than the freeze (the seize to its start)
        assert out["held_ms"] >= out["freeze_ms"] > 0
        assert out["parent"] is None and out["pid"] == t.pid
        view = open_layer(out["layer"])
        fd = os.open(f"/proc/{t.pid}/mem", os.O_RDONLY)
        try:
            checked = 0
            for v in view.layers[0].meta.vmas:
                if v.status != "dumped":
                    continue
                got = view.read(v.start, v.end - v.start)
                want = os.pread(fd, v.end - v.start, v.start)
                assert got == want, f"mapping {v.start:#x}-{v.end:#x} {v.path} differs"
                checked += v.end - v.start
        finally:
            os.close(fd)
        assert checked > 256 * PAGE
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert t.sum() == before


def test_full_dump_contents_counts_and_target_runs_on(spawn: Spawn, datafile: Path, tmp_path: Path) -> None:
    t = spawn("memtarget", "256", str(datafile))
    info = t.info()
    d = tmp_path / "dump"
    out = json.loads(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--json", check=True).stdout)
    _running_untraced(t)
    # Read only now (the target's `sum` and /proc/PID/mem reads would map its never-touched pages):
    # the target's own checksum after the dump equals the checksum of the layer's bytes.
    region = t.read_mem(info["region"], 256 * PAGE)
    fmap = t.read_mem(info["file"], 16 * PAGE)

    layer = Path(out["layer"])
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(layer.stat().st_mode) == 0o600
    assert _no_temp_files(d)

    view = open_layer(layer)
    assert view.read(info["region"], 256 * PAGE) == region
    assert view.read(info["file"], 16 * PAGE) == fmap
    assert t.sum() == _fnv(view.read(info["region"], 256 * PAGE) + view.read(info["file"], 16 * PAGE))

    # Page accounting in the region: 64 random + 64 text pages stored, 64 zero-filled pages recorded
    # as zero (stored as nothing), 64 never-touched pages absent.
    pg = view.layers[0].meta.pages
    lo, hi = info["region"], info["region"] + 256 * PAGE
    data, zeros = np.asarray(pg.data), np.asarray(pg.zero)  # a small layer's are array('Q')s
    stored = data[(data >= lo) & (data < hi)]
    zero = zeros[(zeros >= lo) & (zeros < hi)]
    assert len(stored) == 128
    assert len(zero) == 64
    q = 64 * PAGE
    assert int(zero.min()) == lo + q and int(zero.max()) == lo + 2 * q - PAGE
    assert out["pages_dumped"] == len(pg.data)

    # Threads: all three, and the two blocked in read() are recorded inside the syscall (orig_rax 0).
    threads = view.layers[0].meta.threads
    assert sorted(th.tid for th in threads) == sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
    main = next(th for th in threads if th.tid == t.pid)
    assert main.regs["orig_rax"] == 0  # SYS_read
    assert all(th.regs["rip"] and len(th.xsave) >= 512 for th in threads)
    assert (
        sum(th.regs["orig_rax"] == 0 for th in threads) == 2
    )  # main + the pipe reader; the spinner is not in one


def test_read_cli_hex_and_raw(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "64")
    info = t.info()
    d = tmp_path / "d"
    out = json.loads(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--json", check=True).stdout)
    want = t.read_mem(info["region"] + 3, 40)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    raw = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckpt",
            "read",
            out["layer"],
            "--addr",
            hex(info["region"] + 3),
            "--size",
            "40",
            "--raw",
        ],
        capture_output=True,
        env=env,
        check=True,
    )
    assert raw.stdout == want
    hx = run_ckpt("read", out["layer"], "--addr", str(info["region"] + 3), "--size", "40", check=True).stdout
    assert hx.splitlines()[0].startswith(f"{info['region'] + 3:016x}  {want[0]:02x} {want[1]:02x}")
    bad = run_ckpt("read", out["layer"], "--addr", "0x10", "--size", "16")
    assert bad.returncode != 0 and "not mapped" in bad.stderr and "Traceback" not in bad.stderr


def test_python3_target(tmp_path: Path) -> None:
    payload = os.urandom(3000) + b"ckpt-python-marker"
    code = (
        "import ctypes, sys\n"
        f"buf = ctypes.create_string_buffer({payload!r}, {len(payload)})\n"
        "print('ready', ctypes.addressof(buf), flush=True)\n"
        "sys.stdin.readline()\n"
    )
    t = Target([sys.executable, "-c", code])
    try:
        addr = int(t.ready.split()[1])
        d = tmp_path / "py"
        out = json.loads(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--json", check=True).stdout)
        view = open_layer(out["layer"])
        assert len(view.layers[0].meta.vmas) > 20  # dozens of mappings: interpreter, libraries, arenas
        assert view.read(addr, len(payload)) == payload
        acts = {a.sig: a for a in view.layers[0].meta.sigactions}
        assert acts[signal.SIGINT].handler > 1  # python3 catches SIGINT with its own C handler
        assert acts[signal.SIGUSR2].handler == 0  # SIG_DFL
        _running_untraced(t)
    finally:
        t.close()


def _expect_clean_error(p: subprocess.CompletedProcess[str], words: str) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ckpt: ") and words in lines[0], lines[0]
    assert "Traceback" not in p.stderr


def test_bad_pids(tmp_path: Path) -> None:
    d = tmp_path / "d"
    # a pid that no longer exists: a child we started and reaped
    c = subprocess.Popen(["true"])
    c.wait()
    _expect_clean_error(run_ckpt("dump", "--pid", str(c.pid), "-D", str(d)), "no process")
    _expect_clean_error(run_ckpt("dump", "--pid", "2", "-D", str(d)), "kernel thread")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    own = subprocess.run(
        ["sh", "-c", f"exec {sys.executable} -m ckpt dump --pid $$ -D {d}"],
        capture_output=True,
        text=True,
        env=env,
    )
    _expect_clean_error(own, "ckpt itself")
    _expect_clean_error(run_ckpt("dump", "--pid", "abc", "-D", str(d)), "not a process id")
    assert not d.exists() or find_layers(d) == []


def test_zombie(tmp_path: Path) -> None:
    z = subprocess.Popen(["true"])
    os.waitid(os.P_PID, z.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        _expect_clean_error(run_ckpt("dump", "--pid", str(z.pid), "-D", str(tmp_path / "d")), "zombie")
    finally:
        z.wait()


def test_unwritable_directory(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "16")
    f = tmp_path / "file"
    f.write_text("x")
    _expect_clean_error(
        run_ckpt("dump", "--pid", str(t.pid), "-D", str(f / "sub")), "cannot create dump directory"
    )
    _running_untraced(t)


def test_target_exits_during_dump(spawn: Spawn, tmp_path: Path) -> None:
    """The target is killed while frozen, in the middle of the copy: a clear error, no layer, no temp file."""
    t = spawn("memtarget", "64")
    d = tmp_path / "d"

    def killer(phase: str, done: int, total: int) -> None:
        if phase == "copy":
            os.kill(t.pid, signal.SIGKILL)

    with pytest.raises(TargetExited, match="exited"):
        dump(t.pid, d, progress=killer)
    assert find_layers(d) == [] and _no_temp_files(d)


def test_interrupt_while_frozen_leaves_target_untouched(spawn: Spawn, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the dumper) while the target is frozen: the dump stops, the injected tracker is
    taken out again, the target runs on untraced, no layer is left."""
    t = spawn("memtarget", "64")
    before = t.sum()
    d = tmp_path / "d"

    def interrupt(phase: str, done: int, total: int) -> None:
        if phase == "copy":
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        dump(t.pid, d, progress=interrupt)
    assert find_layers(d) == [] and _no_temp_files(d)
    _running_untraced(t)
    fds = [os.readlink(f"/proc/{t.pid}/fd/{n}") for n in os.listdir(f"/proc/{t.pid}/fd")]
    assert "anon_inode:[userfaultfd]" not in fds
    assert t.sum() == before


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_corrupted_layer(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "64")
    info = t.info()
    d = tmp_path / "d"
    out = json.loads(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--json", check=True).stdout)
    layer = Path(out["layer"])
    lay = Layer.open(layer)
    # a byte inside the chunk that holds the region's first page
    pg = lay.meta.pages
    i = int(np.searchsorted(pg.data, info["region"]))
    first = pg.chunk_first()
    c = int(np.searchsorted(first, i, side="right") - 1)
    chunk = pg.chunks[c]
    lay.close()
    _flip(layer, chunk.offset + chunk.clen // 2)
    _expect_clean_error(run_ckpt("verify", str(layer)), "chunk")
    _expect_clean_error(run_ckpt("read", str(layer), "--addr", hex(info["region"]), "--size", "16"), "chunk")
    # metadata: the byte before the 48-byte footer
    _flip(layer, chunk.offset + chunk.clen // 2)  # undo
    assert run_ckpt("verify", str(layer)).returncode == 0
    _flip(layer, layer.stat().st_size - 49)
    for cmd in (["verify", str(layer)], ["show", str(layer)]):
        _expect_clean_error(run_ckpt(*cmd), "metadata")


def test_unknown_version(spawn: Spawn, tmp_path: Path) -> None:
    import struct

    import xxhash

    from ckpt.image import READ_VERSIONS

    UNREAD = max(READ_VERSIONS) + 1

    t = spawn("memtarget", "16")
    d = tmp_path / "d"
    out = json.loads(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--json", check=True).stdout)
    layer = Path(out["layer"])
    with open(layer, "r+b") as f:
        hdr = bytearray(f.read(64))
        struct.pack_into("<I", hdr, 8, UNREAD)  # (the first version this ckpt does not read)
        struct.pack_into("<Q", hdr, 56, xxhash.xxh3_64_intdigest(bytes(hdr[:56])))
        f.seek(0)
        f.write(hdr)
    p = run_ckpt("show", str(layer))
    _expect_clean_error(p, f"version {UNREAD}")
    assert "reads version 1 or 2 or 3" in p.stderr
    _expect_clean_error(run_ckpt("show", str(tmp_path / "nope.ckpt")), "no layer")


def test_leave_stopped_and_kill(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "16")
    run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "a"), "--leave-stopped", check=True)
    assert t.stopped_state() == "T" and t.tracer() == 0
    os.kill(t.pid, signal.SIGCONT)
    assert t.sum()
    out = json.loads(
        run_ckpt(
            "dump", "--pid", str(t.pid), "-D", str(tmp_path / "b"), "--kill", "--force", "--json", check=True
        ).stdout
    )
    assert out["restorable"] is False  # threads, pipes: --kill alone would have refused
    t.proc.wait(timeout=30)
    assert t.proc.returncode == -signal.SIGKILL
    assert run_ckpt("verify", out["layer"]).returncode == 0


def test_show_and_check(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "32")
    out = json.loads(
        run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--json", check=True).stdout
    )
    s = run_ckpt("show", out["layer"], check=True).stdout
    for word in ("mappings", "threads", "file descriptors", "tracker", str(t.pid)):
        assert word in s
    js = json.loads(run_ckpt("show", out["layer"], "--json", check=True).stdout)
    assert js["inventory"]["pid"] == t.pid and len(js["threads"]) == 3
    assert js["task"]["uid"] == [0, 0, 0, 0] and js["task"]["children"] == []  # the target runs as root
    assert "credentials" in s
    assert any(v["path"] == "[stack]" and v["status"] == "dumped" for v in js["vmas"])
    # [vvar] reads give EIO: recorded, never read
    assert all(v["status"] == "skipped" for v in js["vmas"] if v["path"] in ("[vvar]", "[vvar_vclock]"))
    ck = json.loads(run_ckpt("check", "--json", check=True).stdout)
    assert set(ck["features"]) >= {
        "ptrace",
        "proc-mem",
        "process-vm-readv",
        "soft-dirty",
        "uffd-wp-async",
        "pagemap-scan",
        "idle-poll",
    }
    assert ck["auto_tracker"] in ("soft-dirty", "uffd-wp", "hash")
    assert ck["features"]["ptrace"]["ok"]
    # (root here, with /dev/cpu_dma_latency: ckpt/idlepoll.py's request is taken, read back, let go)
    assert ck["features"]["idle-poll"]["ok"] == os.path.exists("/dev/cpu_dma_latency")


def test_disk_full(spawn: Spawn, tmp_path: Path) -> None:
    """ENOSPC while the layer is written (after the thaw): one clear line, no temp file, the target
    runs on untraced, and the tracker armed for the failed layer is taken out again."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(small)], check=True)
    try:
        t = spawn("memtarget", "512")  # 1 MiB of random and text pages: far more than fits
        before = t.sum()
        p = run_ckpt("dump", "--pid", str(t.pid), "-D", str(small / "d"))
        _expect_clean_error(p, "No space left on device")
        assert _no_temp_files(small / "d") and find_layers(small / "d") == []
        _running_untraced(t)
        links = [os.readlink(f"/proc/{t.pid}/fd/{n}") for n in os.listdir(f"/proc/{t.pid}/fd")]
        assert "anon_inode:[userfaultfd]" not in links
        assert t.sum() == before
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_disk_full_incremental_loses_tracking_loudly(spawn: Spawn, tmp_path: Path) -> None:
    """An incremental dump that fails after reading (and so resetting) the dirty set must not let a
    later incremental on the same chain silently miss those writes: it refuses instead."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(small)], check=True)
    try:
        t = spawn("memtarget", "512")
        d = small / "d"
        run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), check=True)
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        (small / "filler").write_bytes(b"\0" * max(0, free - 64 * 1024))
        assert t.cmd("write " + " ".join(str(i) for i in range(0, 512, 2))) == "ok"  # 1 MiB of random pages
        _expect_clean_error(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--incremental"), "No space")
        (small / "filler").unlink()
        _expect_clean_error(run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--incremental"), "lost")
        _running_untraced(t)
        # a full dump re-arms, and incrementals work again
        run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), check=True)
        run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--incremental", check=True)
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- mappings the process cannot read --------------------------------------------------------------
def _dump_json(pid: int, d: Path, *extra: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        run_ckpt("dump", "--pid", str(pid), "-D", str(d), "--json", *extra, check=True).stdout
    )
    return out


def _read_raw(layer: str, addr: int, size: int) -> bytes:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    argv = [sys.executable, "-m", "ckpt", "read", layer, "--addr", hex(addr), "--size", str(size), "--raw"]
    return subprocess.run(argv, capture_output=True, env=env, check=True).stdout


@pytest.mark.parametrize("track", ["auto", "hash"])
def test_prot_none_pages_are_dumped(spawn: Spawn, tmp_path: Path, track: str) -> None:
    """Pages written and then mprotect(PROT_NONE)ed are the process's data: process_vm_readv
    refuses them, the dump reads them through /proc/PID/mem. No tracker follows such a mapping;
    every incremental compares its present pages instead, so a change made once it is readable
    again is seen, and unchanged pages are not stored twice."""
    t = spawn("memtarget", "64")
    a = t.info()["region"] + 10 * PAGE
    assert t.cmd("write 10 11") == "ok"
    want = t.read_mem(a, 2 * PAGE)
    assert t.cmd(f"mprotect {a:#x} 2 none") == "ok"
    d = tmp_path / "d"
    full = _dump_json(t.pid, d, "--track", track)
    layer = Layer.open(full["layer"])
    v = next(v for v in layer.vmas if v.start == a)
    assert (v.end, v.perms, v.status) == (a + 2 * PAGE, "---p", "dumped")
    assert {int(x) for x in layer.pages.data if a <= x < a + 2 * PAGE} == {a, a + PAGE}
    assert _read_raw(full["layer"], a, 2 * PAGE) == want
    # The kernel's own mappings are still not read.
    special = {v.path: v.status for v in layer.vmas if v.path in ("[vvar]", "[vvar_vclock]", "[vsyscall]")}
    assert "[vvar]" in special and set(special.values()) == {"skipped"}

    # Nothing written since: the PROT_NONE pages are compared, found unchanged, not stored again.
    inc = _dump_json(t.pid, d, "--incremental")
    assert not [x for x in Layer.open(inc["layer"]).pages.data if a <= x < a + 2 * PAGE]
    assert _read_raw(inc["layer"], a, 2 * PAGE) == want

    # Readable again and one page rewritten: the next incremental has the new bytes.
    assert t.cmd(f"mprotect {a:#x} 2 rw") == "ok"
    assert t.cmd("write 10") == "ok"
    want2 = t.read_mem(a, 2 * PAGE)
    assert want2[:PAGE] != want[:PAGE] and want2[PAGE:] == want[PAGE:]
    inc2 = _dump_json(t.pid, d, "--incremental")
    assert [int(x) for x in Layer.open(inc2["layer"]).pages.data if a <= x < a + 2 * PAGE] == [a]
    assert _read_raw(inc2["layer"], a, 2 * PAGE) == want2

    # Written, then taken away again: the new bytes are in the next layer.
    assert t.cmd("write 11") == "ok"
    want3 = t.read_mem(a, 2 * PAGE)
    assert t.cmd(f"mprotect {a:#x} 2 none") == "ok"
    inc3 = _dump_json(t.pid, d, "--incremental")
    assert [int(x) for x in Layer.open(inc3["layer"]).pages.data if a <= x < a + 2 * PAGE] == [a + PAGE]
    assert _read_raw(inc3["layer"], a, 2 * PAGE) == want3
    assert run_ckpt("verify", inc3["layer"]).returncode == 0
    _running_untraced(t)


_RESERVE = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.mmap.restype = ctypes.c_void_p\n"
    "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,"
    " ctypes.c_long]\n"
    "big = libc.mmap(None, 1 << 30, 0, 0x22 | 0x4000, -1, 0)  # PROT_NONE, private anonymous, noreserve\n"
    "print('ready', big, flush=True)\n"
    "sys.stdin.readline()\n"
)


def _vm_pte_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmPTE:"))


def test_huge_prot_none_reservation_costs_nothing(tmp_path: Path) -> None:
    """A 1 GiB PROT_NONE reservation nothing touched: no page of it is read or stored, arming the
    tracker puts nothing under it (uffd-wp write-protect markers in 1 GiB of holes would take 2 MiB
    of page tables in the target), and, holding no page, it is not "dumped": page tables built from
    the layer (restore, diff, the next incremental's parent) do not list its 262144 pages."""
    t = Target([sys.executable, "-c", _RESERVE])
    try:
        big = int(t.ready.split()[1])
        before = _vm_pte_kb(t.pid)
        d = tmp_path / "d"
        full = _dump_json(t.pid, d)
        inc = _dump_json(t.pid, d, "--incremental")
        assert _vm_pte_kb(t.pid) - before < 512
        for out in (full, inc):
            view = open_layer(out["layer"])
            v = next(v for v in view.vmas if v.start == big)
            assert (v.end - v.start, v.perms, v.status) == (1 << 30, "---p", "unreadable")
            pg = view.top.pages
            for col in (pg.data, pg.zero, pg.absent, pg.unchanged):
                arr = np.asarray(col, dtype=np.uint64)
                assert not ((arr >= big) & (arr < big + (1 << 30))).any()
            assert view.page_table().total == sum(v.npages for v in view.vmas if v.dumped) < 1 << 18
        _running_untraced(t)
    finally:
        t.close()


# -- the task record -------------------------------------------------------------------------------
ADDR_NO_RANDOMIZE = 0x0040000


def _as_nobody() -> None:
    """preexec_fn: an ordinary user with a changed umask, limits, groups and personality."""
    import ctypes
    import resource

    os.umask(0o027)
    resource.setrlimit(resource.RLIMIT_NOFILE, (123, 4000))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 1 << 20))
    ctypes.CDLL(None).personality(ADDR_NO_RANDOMIZE)
    os.setgroups([100, 65533])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


def _children_by_ppid(pid: int) -> list[int]:
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(int(name))
    return sorted(out)


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """Orphans of the block's processes become ours to reap (PID 1 here does not reap them)."""
    was_subreaper = subreaper_on()
    try:
        yield
    finally:
        subreaper_restore(was_subreaper)


def test_task_record(tmp_path: Path) -> None:
    """Credentials, groups, umask, limits, personality and children, as the kernel has them."""
    rounds = str(build_c("rounds"))
    with _subreaper():
        # sh forks the child, then becomes rounds: rounds has a child it did not start itself.
        t = Target(["sh", "-c", 'sleep 1000 & exec "$0" 16', rounds], preexec_fn=_as_nobody, cwd="/",
                   stderr=subprocess.DEVNULL)  # fmt: skip
        kids = _children_by_ppid(t.pid)
        try:
            out = _dump_json(t.pid, tmp_path / "d")
            task = Layer.open(out["layer"]).task
            assert task.uid == (65534, 65534, 65534, 65534) and task.gid == (65534, 65534, 65534, 65534)
            assert task.groups == [100, 65533]
            assert task.umask == 0o027
            assert task.personality == ADDR_NO_RANDOMIZE
            assert task.dumpable is True
            assert len(kids) == 1 and task.children == kids
            assert task.pending == []
            assert task.rlimits["nofile"] == (123, 4000)
            assert task.rlimits["core"] == (0, 1 << 20)
            assert set(task.rlimits) == {
                "cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile", "memlock", "as", "locks",
                "sigpending", "msgqueue", "nice", "rtprio", "rttime",
            }  # fmt: skip
            infinity = 2**64 - 1
            assert task.rlimits["cpu"] == (infinity, infinity)  # as the kernel has it, not Python's -1
            _running_untraced(t)
        finally:
            for k in kids:
                os.kill(k, signal.SIGKILL)
            t.close()
            for k in kids:
                os.waitpid(k, 0)  # a zombie of rounds until rounds went; ours since


def _run_on_pty(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a command with stdout and stderr on a real pseudo-terminal; its status and all it printed."""
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=60), out.decode(errors="replace")


def test_progress_bar_only_on_a_tty_and_never_with_json(spawn: Spawn, tmp_path: Path) -> None:
    t = spawn("memtarget", "64")
    root = str(Path(__file__).parent.parent)
    env = dict(os.environ, PYTHONPATH=root, CKPT_PROGRESS_AFTER="0", COLUMNS="120")
    # untracked dumps: several chains of one tracked process would (rightly) warn on stderr
    base = [sys.executable, "-m", "ckpt", "dump", "--pid", str(t.pid), "--track", "none"]
    rc, out = _run_on_pty([*base, "-D", str(tmp_path / "a")], env)
    assert rc == 0 and ("ckpt: copy" in out or "ckpt: compress" in out), out
    rc, out = _run_on_pty([*base, "-D", str(tmp_path / "b"), "--json"], env)
    assert rc == 0 and "ckpt: " not in out and json.loads(out)["pid"] == t.pid
    # and without a tty (a pipe), nothing but the result
    p = run_ckpt("dump", "--pid", str(t.pid), "--track", "none", "-D", str(tmp_path / "c"))
    assert p.returncode == 0 and p.stderr == ""


def test_level_option(spawn: Spawn, datafile: Path, tmp_path: Path) -> None:
    """--level takes zstd's whole range (fast negative levels too), any level reads back the same
    bytes, and an out-of-range level is one line before anything touches the target."""
    from ckpt import cli
    from ckpt.image import writer

    assert (cli.LEVEL_MIN, cli.LEVEL_MAX, cli.DEFAULT_LEVEL) == (
        writer.LEVEL_MIN,
        writer.LEVEL_MAX,
        writer.DEFAULT_LEVEL,
    )
    t = spawn("memtarget", "64", str(datafile))
    for bad in ("23", "-131073", "fast"):
        p = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "bad"), "--level", bad)
        assert p.returncode == 2
        _expect_clean_error(p, "--level")
    assert not (tmp_path / "bad").exists()
    _running_untraced(t)
    sizes = {}
    for level in ("-50", "19"):
        d = tmp_path / f"l{level}"
        r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--json", "--leave-stopped", "--level", level)
        out = json.loads(r.stdout)
        sizes[level] = out["bytes_written"]
        try:
            view = open_layer(out["layer"])
            fd = os.open(f"/proc/{t.pid}/mem", os.O_RDONLY)
            try:
                for v in view.layers[0].meta.vmas:
                    if v.status == "dumped":
                        assert view.read(v.start, v.end - v.start) == os.pread(fd, v.end - v.start, v.start)
            finally:
                os.close(fd)
            view.verify()
        finally:
            os.kill(t.pid, signal.SIGCONT)
        t.sum()  # running again, and answering
    assert sizes["19"] < sizes["-50"]
