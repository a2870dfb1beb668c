"""ProcMem.read_many / write_many (ckpt/ptrace/mem.py): many areas of a live process in one
process_vm_readv / process_vm_writev, as a batch saves and restores every thread's stack area. Each
must equal the same reads and writes made one by one through /proc/PID/mem, including where the
one call cannot do it (an unmapped area, a read-only page: area by area through /proc/PID/mem,
with its error), and past IOV_MAX areas.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from ckpt.errors import TargetError
from ckpt.ptrace.mem import IOV_MAX, ProcMem
from tests.util import LineChannel

PAGE = 4096
PROGRAM = r"""
import ctypes, mmap, sys
rw = mmap.mmap(-1, 64 * 4096)
rw[:] = bytes(i % 251 for i in range(64 * 4096))
ro = mmap.mmap(-1, 4096)
ro[:] = b"r" * 4096
libc = ctypes.CDLL(None)
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
a_rw, a_ro = addr(rw), addr(ro)
libc.mprotect(ctypes.c_void_p(a_ro), 4096, 1)  # PROT_READ
print(a_rw, a_ro, flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def child() -> Iterator[tuple[int, int, int]]:
    p = subprocess.Popen([sys.executable, "-c", PROGRAM], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        rw, ro = (int(w) for w in LineChannel(p, 30).readline().split())
        yield p.pid, rw, ro
    finally:
        p.kill()
        p.wait()


def _pattern(off: int, n: int) -> bytes:
    return bytes((off + i) % 251 for i in range(n))


def test_read_many_equals_reads_one_by_one(child: tuple[int, int, int]) -> None:
    pid, rw, ro = child
    mem = ProcMem(pid)
    try:
        areas = [(rw + 5, 100), (ro, PAGE), (rw + 3 * PAGE - 7, 2 * PAGE), (rw, 1)]
        got = mem.read_many(areas)
        assert got == [mem.read(a, n) for a, n in areas]
        assert got[0] == _pattern(5, 100) and got[1] == b"r" * PAGE
        assert got[2] == _pattern(3 * PAGE - 7, 2 * PAGE)
        # More areas than one call takes: split, in order.
        many = [(rw + (i * 37) % (60 * PAGE), 1 + i % 64) for i in range(IOV_MAX + 300)]
        assert mem.read_many(many) == [_pattern(a - rw, n) for a, n in many]
        assert mem.read_many([]) == []
    finally:
        mem.close()


def test_read_many_of_an_unmapped_area_fails_as_read_does(child: tuple[int, int, int]) -> None:
    pid, rw, _ = child
    mem = ProcMem(pid)
    try:
        with pytest.raises(TargetError) as one:
            mem.read(8 << 20, 64)  # nothing is mapped at 8 MiB in a python3 process
        with pytest.raises(TargetError) as many:
            mem.read_many([(rw, 64), (8 << 20, 64)])
        assert str(many.value) == str(one.value)
    finally:
        mem.close()


def test_write_many_equals_writes_one_by_one(child: tuple[int, int, int]) -> None:
    pid, rw, ro = child
    mem = ProcMem(pid)
    try:
        writes = [(rw + 10, b"abc"), (rw + PAGE - 1, b"\x00" * 3), (rw + 20 * PAGE, b"x" * PAGE)]
        mem.write_many(writes)
        for a, d in writes:
            assert mem.read(a, len(d)) == d
        assert mem.read(rw, 10) == _pattern(0, 10)  # nothing else touched
        assert mem.read(rw + 13, 10) == _pattern(13, 10)
        # A read-only page: process_vm_writev cannot; then each goes through /proc/PID/mem, in order,
        # which fails there as write() does (this process does not trace the child: no FOLL_FORCE).
        with pytest.raises(TargetError) as one:
            mem.write(ro + 1, b"zz")
        with pytest.raises(TargetError) as both:
            mem.write_many([(rw + 30 * PAGE, b"yy"), (ro + 1, b"zz")])
        assert str(both.value) == str(one.value)
        assert mem.read(ro, 4) == b"rrrr" and mem.read(rw + 30 * PAGE, 2) == b"yy"
        many = [(rw + 40 * PAGE + i * 3, bytes([i % 256]) * 2) for i in range(IOV_MAX + 10)]
        mem.write_many(many)
        gap = _pattern(40 * PAGE + 2, 1)  # (3 bytes apart: the byte between two writes is left)
        assert mem.read(rw + 40 * PAGE, 6) == b"\x00\x00" + gap + b"\x01\x01" + _pattern(40 * PAGE + 5, 1)
        for a, d in many[-5:]:
            assert mem.read(a, 2) == d
        # Where two writes meet, the later one wins, as one by one.
        mem.write_many([(rw + 50 * PAGE, b"11"), (rw + 50 * PAGE + 1, b"22")])
        assert mem.read(rw + 50 * PAGE, 3) == b"122"
        mem.write_many([])
    finally:
        mem.close()
