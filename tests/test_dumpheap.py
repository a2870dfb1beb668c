"""`ckpt dump`'s malloc settings (cli._heap_for_one_dump): a block of up to 32 MiB comes from the heap
and is kept there when freed. zstd's ~1 MiB output buffer of each chunk had been a fresh mmap under
glibc's dynamic threshold: ~7 k first-touch faults per 256 MiB dump on the compression threads
(docs/benchmarks.md, branch dump256)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import ctypes, json, sys
if sys.argv[1] == "set":
    from ckpt.cli import _heap_for_one_dump
    _heap_for_one_dump()

class Info(ctypes.Structure):  # struct mallinfo2 (glibc >= 2.33)
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
out = {}
for size in (1 << 20, 2 << 20, 31 << 20):
    before = libc.mallinfo2().hblks
    p = libc.malloc(size)
    out[str(size)] = libc.mallinfo2().hblks - before  # 1: a mapping of its own; 0: from the heap
    libc.free(p)
print(json.dumps(out))
"""


def _mapped(mode: str) -> dict[str, int]:
    argv = [sys.executable, "-c", PROBE, mode]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def test_blocks_up_to_32_mib_come_from_the_heap() -> None:
    """In a fresh process, blocks of 1, 2 and 31 MiB are each a mapping of their own (glibc's
    threshold starts at 128 KiB); after _heap_for_one_dump none is (the same C library, its
    mallinfo2 counts the mapped blocks)."""
    assert _mapped("default") == {str(1 << 20): 1, str(2 << 20): 1, str(31 << 20): 1}
    assert _mapped("set") == {str(1 << 20): 0, str(2 << 20): 0, str(31 << 20): 0}
