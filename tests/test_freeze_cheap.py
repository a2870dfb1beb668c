"""Work taken out of the freeze (issue 9 part 2, branch freeze9): each cheaper way gives what the
dearer one gave.

- swap_active() from sysinfo(2) instead of a /proc/meminfo read (twice per freeze);
- the batch's code assembled one call per struct pack, the same bytes as instruction by instruction;
- every thread seized with PTRACE_O_SUSPEND_SECCOMP, without reading its status for Seccomp: a
  tracer the kernel refuses the option (ckpt itself under a seccomp filter) seizes without it.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt import ranges
from ckpt import sysno as nr
from ckpt.memory import swap_active
from ckpt.proc.maps import Vma
from ckpt.ptrace import Frozen, inject
from ckpt.ptrace import batch as bt
from ckpt.track.base import fresh_ranges, tracked_vmas
from tests.test_freeze_safety import settled
from tests.util import Target

Spawn = Callable[..., Target]
PAGE = 4096
ROOT = Path(__file__).resolve().parent.parent


def test_swap_active_is_meminfo_swaptotal() -> None:
    with open("/proc/meminfo") as f:
        total = next(int(ln.split()[1]) for ln in f if ln.startswith("SwapTotal:"))
    assert swap_active() == (total > 0)


def _reference(calls: Sequence[bt.Call], code_at: int, data_at: int, tgid: int, tid: int, sig: int) -> bytes:
    """assemble() as it was before the one-pack path: instruction by instruction."""
    q = struct.Struct("<Q")

    def imm(v: int) -> bytes:
        return q.pack(v & 0xFFFFFFFFFFFFFFFF)

    mov = (b"\x48\xb8", b"\x48\xbf", b"\x48\xbe", b"\x48\xba", b"\x49\xba", b"\x49\xb8", b"\x49\xb9")
    from_rax = (
        b"\x48\x89\xc7", b"\x48\x89\xc6", b"\x48\x89\xc2", b"\x49\x89\xc2", b"\x49\x89\xc0", b"\x49\x89\xc1",
    )  # fmt: skip
    buf_at = data_at + 8 * len(calls)
    out = bytearray()
    for i, c in enumerate(calls):
        args: list[int | bt.Ref] = list(c.args) + [0] * (6 - len(c.args))
        if c.buf:
            args[c.out_arg] = buf_at
            buf_at += c.buf
        for j, a in enumerate(args[:6]):
            if isinstance(a, bt.Ref):
                out += b"\x48\xa1" + imm(data_at + 8 * a.index) + from_rax[j]
            else:
                out += mov[j + 1] + imm(a)
        out += mov[0] + imm(c.nr) + b"\x0f\x05" + b"\x48\xa3" + imm(data_at + 8 * i)
    for s in (sig, signal.SIGSTOP):
        regs = zip(mov, (bt.SYS_TGKILL, tgid, tid, s), strict=False)
        out += b"".join(m + imm(v) for m, v in regs) + b"\x0f\x05"
        out += b"\x48\x85\xc0\x78\x02\xeb\xfe" if s == sig else b"\xeb\xfe"
    return bytes(out)


_arg = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)


@st.composite
def _calls(draw: st.DrawFn) -> list[bt.Call]:
    n = draw(st.integers(1, 12))
    out: list[bt.Call] = []
    for i in range(n):
        k = draw(st.integers(0, 6))
        ref = i > 0 and draw(st.integers(0, 3)) == 0  # some calls take an earlier result
        args: list[int | bt.Ref] = []
        for _ in range(k):
            args.append(bt.Ref(draw(st.integers(0, i - 1))) if ref and draw(st.booleans()) else draw(_arg))
        out_n = draw(st.sampled_from([0, 0, 8, 32]))
        inp = draw(st.sampled_from([b"", b"", b"\x01" * 24]))
        out_arg = draw(st.integers(0, 5)) if out_n or inp else 0
        out.append(bt.Call(draw(st.integers(0, 450)), tuple(args), out=out_n, out_arg=out_arg, inp=inp))
    return out


@settings(max_examples=300, deadline=None)
@given(_calls(), st.integers(0x10000, 1 << 46), st.integers(0x10000, 1 << 46))
def test_assemble_packs_the_same_bytes(calls: list[bt.Call], code_at: int, data_at: int) -> None:
    b = bt.assemble(calls, code_at, data_at, 1234, 1235, 64)
    assert b.code == _reference(calls, code_at, data_at, 1234, 1235, 64)


def test_seized_with_seccomp_suspended_when_allowed(spawn: Spawn) -> None:
    t = spawn("sigstate")
    before = settled(t)
    with Frozen(t.pid) as fz:
        assert not fz._no_suspend  # root: every thread took the option
        assert fz.syscall(nr.GETPID) == t.pid
    assert settled(t) == before and t.cmd("ping") == "pong"


_UNDER_FILTER = r"""
import ctypes, sys
from ckpt import ranges
from ckpt import sysno as nr
from ckpt.proc.maps import Vma
from ckpt.track.base import fresh_ranges, tracked_vmas
from ckpt.ptrace import Frozen

class Insn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)
    ]

class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

libc = ctypes.CDLL(None, use_errno=True)
allow = (Insn * 1)(Insn(0x06, 0, 0, 0x7FFF0000))  # BPF_RET|BPF_K SECCOMP_RET_ALLOW
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(Prog(1, allow)), 0, 0) == 0  # PR_SET_SECCOMP, FILTER
pid = int(sys.argv[1])
with Frozen(pid) as fz:
    got = fz.syscall(nr.GETPID)
    print(got == pid, fz._no_suspend)
"""


def test_tracer_under_a_seccomp_filter_seizes_without_the_option(spawn: Spawn) -> None:
    """The kernel refuses PTRACE_O_SUSPEND_SECCOMP to a tracer in seccomp mode (EPERM): the seize
    goes on without it, and the freeze and its injection work as before."""
    t = spawn("sigstate")
    before = settled(t)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", _UNDER_FILTER, str(t.pid)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]
    assert settled(t) == before and t.cmd("ping") == "pong"


def test_sigaction_dicts_are_the_records_dicts(spawn: Spawn) -> None:
    """The freeze's signal actions as dicts straight from the answers: the records' to_dict(), every
    signal asked and a third of them (the others then SIG_DFL)."""
    t = spawn("sigstate")
    settled(t)
    with Frozen(t.pid) as fz:
        plan = bt.Plan()
        wanted = inject.ask_sigactions(plan)
        ans = plan.run(fz)
    got = inject.sigaction_dicts(t.pid, wanted, ans)
    assert got == [a.to_dict() for a in inject.sigactions_from(t.pid, wanted, ans)]
    assert len(got) >= 60 and all(d["sig"] not in (9, 19) for d in got)
    some = set(list(wanted)[::3])
    assert inject.sigaction_dicts(t.pid, some, ans) == [
        a.to_dict() for a in inject.sigactions_from(t.pid, some, ans)
    ]


def test_read_maps_reuses_the_parse_of_the_same_bytes() -> None:
    """A second read of unchanged maps gives equal records in a list of its own; other bytes (another
    process's) are parsed anew."""
    from ckpt.proc import maps as mp

    # Two cats, each past its first echo (so done loading and allocating): their maps no longer
    # change. (Two `sleep`s read at once could still be loading, which failed once in a merged run.)
    procs = [subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"ready\n")
            p.stdin.flush()
            assert p.stdout.readline() == b"ready\n"
        a = mp.read_maps(procs[0].pid)
        b = mp.read_maps(procs[0].pid)
        assert a == b and a is not b
        b.clear()  # a caller's list is its own
        assert mp.read_maps(procs[0].pid) == a
        c = mp.read_maps(procs[1].pid)
        with open(f"/proc/{procs[1].pid}/maps", errors="surrogateescape") as f:
            assert c == [mp.parse_maps_line(ln) for ln in f] and c != a
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def _fresh_reference(vmas: Sequence[Vma], parent_vmas: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """fresh_ranges as it was: every parent mapping looked at for each of today's."""
    pv = sorted(
        (int(p["start"]), int(p["end"]), int(p["inode"]), int(p["offset"]) - int(p["start"]), str(p["path"]))
        for p in parent_vmas
        if p.get("status", "dumped") == "dumped"
    )
    out: list[tuple[int, int]] = []
    for v in tracked_vmas(vmas):
        cur = v.start
        key = (v.inode, v.offset - v.start, v.path)
        for ps, pe, pino, pdelta, ppath in pv:
            if pe <= cur or ps >= v.end:
                continue
            same = (pino, pdelta, ppath) == key or (v.inode == 0 and pino == 0 and ppath == v.path)
            if not same:
                continue
            lo, hi = max(ps, v.start), min(pe, v.end)
            if lo > cur:
                out.append((cur, lo))
            cur = max(cur, hi)
        if cur < v.end:
            out.append((cur, v.end))
    return ranges.merge(out)


@st.composite
def _layout(draw: st.DrawFn) -> list[Vma]:
    """Non-overlapping mappings on a small grid of pages, of a few kinds (anonymous, a file at some
    offset, [heap]), some touching."""
    out: list[Vma] = []
    at = 0x10000
    for _ in range(draw(st.integers(0, 10))):
        at += draw(st.integers(0, 3)) * PAGE
        size = draw(st.integers(1, 4)) * PAGE
        kind = draw(st.integers(0, 2))
        ino, path = ((0, ""), (7, "/lib/x.so"), (0, "[heap]"))[kind]
        off = draw(st.integers(0, 3)) * PAGE if ino else 0
        perms = draw(st.sampled_from(["rw-p", "r--p", "---p"]))
        out.append(Vma(at, at + size, perms, off, "00:00", ino, path))
        at += size
    return out


@settings(max_examples=400, deadline=None)
@given(_layout(), _layout(), st.lists(st.booleans(), max_size=10))
def test_fresh_ranges_as_before(now: list[Vma], before: list[Vma], absent: list[bool]) -> None:
    parent: list[dict[str, Any]] = [
        {
            "start": v.start,
            "end": v.end,
            "inode": v.inode,
            "offset": v.offset,
            "path": v.path,
            "status": "dumped",
        }
        for v in before
    ]
    for p, gone in zip(parent, absent, strict=False):
        if gone:
            p["status"] = "absent"
    assert fresh_ranges(now, parent) == _fresh_reference(now, parent)
