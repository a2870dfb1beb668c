"""The warm copy buffer of `ckpt service` (ckpt/warmbuf.py): a served full dump copies into the
service's memfd, whose pages the previous dump allocated, and stores what it would have stored with
an anonymous buffer; old pages in it never reach a layer; one dump at a time has it; a service
started with --warm-buffer 0, or a dump larger than the cap, leaves it alone; --warm-idle frees it.

Every service is a real `python -m ckpt service` (tests/test_service.py's), every target a real
process; the memfd is looked at from outside, through /proc/SERVICE/fd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.image import Layer, find_layers
from tests.test_service import ENV, WAIT, Service, ckpt, listening
from tests.util import ROOT, LineChannel, Target, assert_view_equals_memory

P = 4096
MEMFD = "/memfd:ckpt-warm (deleted)"


class WarmService(Service):
    """tests/test_service.py's Service, started with more options."""

    def __init__(self, sock: Path, options: tuple[str, ...]) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt", "service", "--socket", str(sock), "--json", *options],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
        )  # fmt: skip
        self.log = LineChannel(self.proc, WAIT, lambda: f"; stderr: {self._stderr()}")  # type: ignore[arg-type]
        listening(json.loads(self.log.readline()), sock, self.proc.pid)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """start(*options): a service with these `ckpt service` options; each stopped afterwards, its
    commands all reaped."""
    started: list[Service] = []

    def _start(*options: str) -> Service:
        sock = tmp_path / f"svc{len(started)}" / "sock"
        s = WarmService(sock, options)
        started.append(s)
        return s

    yield _start
    for s in started:
        try:
            if s.proc.poll() is None:
                assert s.reaped()
        finally:
            s.stop()


def _memfd(s: Service) -> str:
    """/proc path of the service's warm buffer (it makes it at the first full dump it serves)."""
    d = f"/proc/{s.proc.pid}/fd"
    found = [f"{d}/{n}" for n in os.listdir(d) if _link(f"{d}/{n}") == MEMFD]
    assert len(found) == 1, found
    return found[0]


def _link(p: str) -> str:
    try:
        return os.readlink(p)
    except OSError:
        return ""


def _allocated(s: Service) -> int:
    return os.stat(_memfd(s)).st_blocks * 512


def _served_dump(s: Service, t: Target, d: Path) -> dict[str, object]:
    """A full dump of t through s; the service's log line for it."""
    r = ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--track", "none", service=s)
    assert r.returncode == 0, r.stderr
    log = s.next()
    assert (log["outcome"], log["status"]) == ("ran", "X0"), log
    return log


def _chunks(path: Path) -> list[tuple[list[int], object, bytes]]:
    """Each chunk of a layer: its page addresses, its record (offset aside), its stored bytes; for
    the chunk that holds the thread's rseq area, its pages with that area zeroed instead of the
    record and bytes (the kernel writes into it the CPU the thread last returned to user space on,
    which the dumps' injected syscalls change: assert_view_equals_memory leaves it out too)."""
    out: list[tuple[list[int], object, bytes]] = []
    with Layer.open(path) as layer, open(path, "rb") as f:
        layer.verify()
        ((start, length, _),) = [th.rseq for th in layer.meta.threads if th.rseq is not None]
        pos = 0
        for c in layer.pages.chunks:
            addrs = [int(x) for x in layer.pages.data[pos : pos + c.npages]]
            pos += c.npages
            base = start // P * P
            if base in addrs:
                pages = bytearray(b"".join(layer.read_page(a) for a in addrs))
                at = addrs.index(base) * P + start - base
                pages[at : at + length] = bytes(length)
                out.append((addrs, "rseq", bytes(pages)))
                continue
            f.seek(c.offset)
            out.append((addrs, (c.clen, c.xxh3, c.raw, c.pxxh3), f.read(c.clen)))
    assert sum(x[1] == "rseq" for x in out) == 1
    return out


def _region_page(t: Target, i: int) -> bytes:
    with open(f"/proc/{t.pid}/mem", "rb") as f:
        f.seek(t.info()["region"] + i * P)
        return f.read(P)


def test_a_dump_with_the_warm_buffer_stores_the_same_bytes(
    tmp_path: Path, spawn: Callable[..., Target], start: Callable[..., Service]
) -> None:
    s = start()
    t = spawn("rounds", "2048")
    assert t.cmd("mix") == "ok"
    before = t.sum()
    page = _region_page(t, 100)  # random bytes: found only where the target's pages were copied
    # Stopped for every dump and the comparison, and on one CPU (the kernel rewrites a thread's rseq
    # area when it runs on another CPU, be it only for a dump's injected syscalls: Target.pin).
    t.pin()
    os.kill(t.pid, signal.SIGSTOP)
    assert t.stopped_state() == "T"
    here = ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "here"), "--track", "none")
    assert here.returncode == 0, here.stderr
    # The first served dump is lent the buffer with no page in it: it allocates what it uses.
    assert _served_dump(s, t, tmp_path / "cold")["warm"] == 0
    size = _allocated(s)
    assert size >= 2048 * P
    # Its pages cleared from outside (they stay allocated): whatever the next dump copies shows.
    with open(_memfd(s), "r+b") as f:
        f.write(bytes(size))
    assert _allocated(s) == size
    # The second finds them: lent with `size` bytes, it grows the buffer by a few pages at most (those
    # the first dumps' injected calls may have made present in the target: its Rss, the guess).
    assert _served_dump(s, t, tmp_path / "warm")["warm"] == size
    assert size <= _allocated(s) <= size + 16 * P, (size, _allocated(s))
    with open(_memfd(s), "rb") as f:
        assert page in f.read()  # the dump copied the target into the service's buffer
    (lh,), (lc,), (lw,) = (find_layers(tmp_path / d) for d in ("here", "cold", "warm"))
    a, b, c = _chunks(lh), _chunks(lc), _chunks(lw)
    assert sum(len(x[0]) for x in a) >= 1536  # (the mix leaves 1/4 of the region zero)
    assert a == b == c
    assert_view_equals_memory(t.pid, lw)
    os.kill(t.pid, signal.SIGCONT)
    assert t.sum() == before


def test_old_pages_in_the_buffer_never_reach_a_layer(
    tmp_path: Path, spawn: Callable[..., Target], start: Callable[..., Service]
) -> None:
    s = start()
    big = spawn("rounds", "4096")
    assert big.cmd("mix") == "ok"
    old = [_region_page(big, i) for i in (10, 3000)]  # random, text
    _served_dump(s, big, tmp_path / "big")
    size = _allocated(s)
    with open(_memfd(s), "rb") as f:
        held = f.read()
    assert all(p in held for p in old)
    big.close()
    # A smaller process, dumped with the buffer that holds the big one's pages past its own rows.
    small = spawn("rounds", "256")
    assert small.cmd("round").startswith("round 1 ")
    os.kill(small.pid, signal.SIGSTOP)
    assert small.stopped_state() == "T"
    # Lent with the big one's pages in it. Not all of `size`, always: the pages its populate made
    # and no copy wrote are clean zeros the kernel may drop meanwhile (a DAMON pageout scheme did
    # here, 8 of them, in CI): only those the big dump wrote stay for sure.
    assert 0 < _served_dump(s, small, tmp_path / "small")["warm"] <= size
    with open(_memfd(s), "rb") as f:
        held = f.read()
    assert old[1] in held  # still there, after the small dump's rows
    (layer,) = find_layers(tmp_path / "small")
    assert_view_equals_memory(small.pid, layer)  # every stored page is the small process's own
    with Layer.open(layer) as lay:
        lay.verify()
        stored = {lay.read_page(int(a)) for a in lay.pages.data}
    assert not stored & set(old)
    os.kill(small.pid, signal.SIGCONT)


def _held(t: Target, d: Path, s: Service) -> tuple[subprocess.Popen[bytes], int]:
    """A served full dump held in its compress phase (cli.py's test hook): its client, and the
    read end that said it is there."""
    r, w = os.pipe()
    env = dict(ENV, CKPT_DUMP_TEST_HOLD="compress", CKPT_DUMP_TEST_HOLD_FD=str(w), CKPT_SERVICE=str(s.sock))
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "dump", "--pid", str(t.pid), "-D", str(d), "--track", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, pass_fds=(w,),
    )  # fmt: skip
    os.close(w)
    return p, r


def _maps_memfd(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    fds = [_link(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
    return "memfd:ckpt-warm" in maps or MEMFD in fds


def test_one_dump_at_a_time(
    tmp_path: Path, spawn: Callable[..., Target], start: Callable[..., Service]
) -> None:
    s = start()
    a, b = spawn("rounds", "1024"), spawn("rounds", "512")
    _served_dump(s, a, tmp_path / "first")  # (the buffer allocated)
    held = []
    try:
        for t, d in ((a, "a"), (b, "b")):
            p, r = _held(t, tmp_path / d, s)
            held.append(p)
            with os.fdopen(r, "rb") as hold:
                assert hold.readline() == b"compress\n"
        kids = [int(x) for x in s.children()]
        assert len(kids) == 2
        # The first has it mapped; the second, forked while it was lent, has neither the mapping
        # nor the descriptor.
        assert [_maps_memfd(k) for k in sorted(kids)] == [True, False]
        for p in held:
            p.send_signal(signal.SIGINT)
            assert p.wait(WAIT) == 130
    finally:
        for p in held:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=WAIT)
    logs = [s.next(), s.next()]
    assert sorted(("warm" in x, x["status"]) for x in logs) == [(False, "X130"), (True, "X130")]
    # Given back when its child ended: the next dump has it again, as does a command that is not a
    # full dump never.
    assert "warm" in _served_dump(s, b, tmp_path / "again")
    r = ckpt("show", str(find_layers(tmp_path / "again")[0]), service=s)
    assert r.returncode == 0 and "warm" not in s.next()


def test_off_over_the_cap_and_freed_when_idle(
    tmp_path: Path, spawn: Callable[..., Target], start: Callable[..., Service]
) -> None:
    t = spawn("rounds", "2048")
    off = start("--warm-buffer", "0")
    assert "warm" not in _served_dump(off, t, tmp_path / "off")
    assert not any(
        _link(f"/proc/{off.proc.pid}/fd/{n}") == MEMFD for n in os.listdir(f"/proc/{off.proc.pid}/fd")
    )
    # A cap of 1 MiB: lent, but an 8 MiB process's dump takes an anonymous buffer instead.
    small = start("--warm-buffer", "1")
    assert _served_dump(small, t, tmp_path / "cap")["warm"] == 0
    assert _allocated(small) == 0
    for d in ("off", "cap"):
        assert_view_equals_memory(t.pid, find_layers(tmp_path / d)[0])
    # Idle for 0 s: freed as soon as the dump that allocated it is done.
    idle = start("--warm-idle", "0")
    assert _served_dump(idle, t, tmp_path / "idle")["warm"] == 0
    assert idle.next() == {"warm_buffer": 0, "why": "no full dump for 0 s"}
    assert _allocated(idle) == 0


@pytest.mark.parametrize("option", [["--warm-buffer", "-1"], ["--warm-idle", "-2"], ["--warm-buffer", "x"]])
def test_bad_options(tmp_path: Path, option: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ckpt", "service", "--socket", str(tmp_path / "s" / "sock"), *option],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=WAIT,
    )  # fmt: skip
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "s" / "sock").exists()


def test_a_descriptor_near_the_limit(
    tmp_path: Path, spawn: Callable[..., Target], start: Callable[..., Service]
) -> None:
    """A client with a descriptor as high as the service still serves (its child moves the client's
    five descriptors just under the limit): no number is left for the buffer's, and the dump goes
    without it, the same layer, instead of failing."""
    import resource

    s = start()
    t = spawn("rounds", "512")
    n = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 6  # (0, 1, 2, n and the cwd: five moved above n)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(fd, n)
        r = ckpt(
            "dump",
            "--pid",
            str(t.pid),
            "-D",
            str(tmp_path / "d"),
            "--track",
            "none",
            pass_fds=(n,),
            service=s,
        )
    finally:
        os.close(n)
        os.close(fd)
    log = s.next()
    assert (r.returncode, log["outcome"], log["status"], log["warm"]) == (0, "ran", "X0", 0), r.stderr
    assert _allocated(s) == 0  # it had the buffer, and could not keep its descriptor
    assert_view_equals_memory(t.pid, find_layers(tmp_path / "d")[0])
