"""The injected syscalls' site in [vdso] (ptrace/inject.py find_vdso_syscall): looked for at the
offset where another process's [vdso] of the same size had it, and searched for again where that
process's copy differs there (a debugger's breakpoint)."""

from __future__ import annotations

from collections.abc import Callable

from ckpt.proc.maps import read_maps
from ckpt.ptrace import Frozen, inject
from tests.util import Target


def _vdso(pid: int) -> tuple[int, int]:
    v = next(v for v in read_maps(pid) if v.path == "[vdso]")
    return v.start, v.size


def test_the_site_is_looked_for_where_it_was_and_searched_where_patched(spawn: Callable[..., Target]) -> None:
    a, b = spawn("rtsignals"), spawn("rtsignals")
    inject._vdso_sites.clear()
    with Frozen(a.pid) as f:
        site = inject.find_vdso_syscall(a.pid, f._mem)
        assert site is not None and f.read_mem(site, 2) == inject.SYSCALL_INSN
    start, size = _vdso(a.pid)
    assert inject._vdso_sites == {size: site - start}
    with Frozen(b.pid) as f:
        bstart, bsize = _vdso(b.pid)
        assert bsize == size
        assert inject.find_vdso_syscall(b.pid, f._mem) == bstart + site - start  # (the same image)
        # Its copy patched where a has it (as gdb's breakpoint would: int3, nop): found elsewhere.
        f.write_mem(bstart + site - start, b"\xcc\x90")
        try:
            other = inject.find_vdso_syscall(b.pid, f._mem)
            assert other is not None and other != bstart + site - start
            assert f.read_mem(other, 2) == inject.SYSCALL_INSN
        finally:
            f.write_mem(bstart + site - start, inject.SYSCALL_INSN)
    assert a.cmd("count") == b.cmd("count") == "rtmax 0 usr1 0 early 0 last none"
