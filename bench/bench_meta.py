"""Decoding a layer's metadata: time and peak memory of each decoder, on real metadata and on bombs.

Each (input, decoder) pair runs in a fresh child process; the child reports its decode time and
its peak RSS above what it held before decoding (VmHWM). A shared CPU makes times noisy.

    .venv/bin/python bench/bench_meta.py [--layer PATH] [--fds N]

Decoders: `msgpack` (msgpack.unpackb as ckpt did before: no object bound), `ckpt` (ckpt's
decode_meta: msgpack with container caps and an object budget), `msgspec` (msgspec.msgpack.decode,
untyped), `msgspec-typed` (into Structs for the records, the rest Any; only if msgspec is
installed: it is not a dependency of ckpt).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import zstandard

CHILD = r"""
import sys, time, json
from pathlib import Path
def hwm():
    for ln in open("/proc/self/status"):
        if ln.startswith("VmHWM:"):
            return int(ln.split()[1]) * 1024
    return 0
kind, src = sys.argv[1], sys.argv[2]
comp = Path(src).read_bytes()
import zstandard, msgpack
from ckpt.image.framing import decode_meta
try:
    import msgspec
    from typing import Any
    class Vma(msgspec.Struct):
        start: int; end: int; perms: str; offset: int; dev: str; inode: int; path: str; status: str
        file: Any = None
    class Fd(msgspec.Struct):
        fd: int; kind: str; path: str; flags: int; pos: int; mnt_id: int; dev: int; ino: int
        mode: int; size: int; mtime_ns: int
    class Top(msgspec.Struct):
        inventory: dict[str, Any]; vmas: list[Vma]; threads: list[Any]; sigactions: list[Any]
        fds: list[Fd]; mm: dict[str, Any]; pages: dict[str, Any]; task: Any = None
    typed = msgspec.msgpack.Decoder(Top)
except ImportError:
    msgspec = None
raw = zstandard.ZstdDecompressor().decompress(comp, max_output_size=1 << 31) if kind != "ckpt" else b""
base = hwm()
t0 = time.perf_counter()
err = ""
try:
    if kind == "msgpack":
        msgpack.unpackb(raw, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
    elif kind == "ckpt":
        decode_meta(comp, Path(src))
    elif kind == "msgspec":
        msgspec.msgpack.decode(raw)
    elif kind == "msgspec-typed":
        typed.decode(raw)
except Exception as e:
    err = type(e).__name__
dt = time.perf_counter() - t0
print(json.dumps({"s": dt, "peak": hwm() - base, "err": err}))
"""


def real_meta(layer: Path) -> bytes:
    raw = layer.read_bytes()
    off, length = struct.unpack_from("<QQ", raw, len(raw) - 48 + 8)
    return raw[off : off + length]


def with_fds(comp: bytes, n: int) -> bytes:
    """Real metadata with its fd table grown to `n` plausible entries (a process with n open files)."""
    d = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(comp), raw=False, strict_map_key=False)
    d["fds"] = [
        {
            "fd": i,
            "kind": "file",
            "path": f"/var/lib/app/data/shard-{i:07d}.db",
            "flags": 0o2,
            "pos": i * 4096,
            "mnt_id": 27,
            "dev": 64769,
            "ino": 1_000_000 + i,
            "mode": 0o100644,
            "size": 1 << 20,
            "mtime_ns": 1_700_000_000_000_000_000 + i,
        }
        for i in range(n)
    ]
    return zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(d, use_bin_type=True))


def bombs() -> dict[str, bytes]:
    z = zstandard.ZstdCompressor(write_content_size=True)
    n = (64 << 20) - 4096  # just under the 64 MiB a small layer may decompress to
    flat = b"\x81\xa4vmas\xdd" + struct.pack(">I", n) + b"\x80" * n
    # The same 64 M empty maps as 32 arrays of 2 M: under every container cap.
    per = n // 32
    inner = b"\xdd" + struct.pack(">I", per) + b"\x80" * per
    nested = b"\x81\xa4vmas\xdc" + struct.pack(">H", 32) + inner * 32
    deep = b"\x91" * 1000 + b"\xc0"
    return {
        "empty-maps-flat (64 MiB)": z.compress(flat),
        "empty-maps-nested (64 MiB)": z.compress(nested),
        "nesting-1000": z.compress(deep),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=Path, help="a real layer (default: dump a python3 process now)")
    ap.add_argument("--fds", type=int, default=200_000)
    a = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    with tempfile.TemporaryDirectory() as td:
        if a.layer is None:
            p = subprocess.Popen(
                [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert p.stdout is not None
            p.stdout.readline()
            subprocess.run(
                [sys.executable, "-m", "ckpt", "dump", "-t", str(p.pid), "-D", f"{td}/d", "--track", "none"],
                check=True,
                env=env,
                capture_output=True,
            )
            p.kill()
            p.wait()
            a.layer = Path(td) / "d" / "layer-0001.ckpt"
        comp = real_meta(a.layer)
        inputs = {"real (python3)": comp, f"real + {a.fds} fds": with_fds(comp, a.fds), **bombs()}
        try:
            import msgspec  # noqa: F401

            kinds = ["msgpack", "ckpt", "msgspec", "msgspec-typed"]
        except ImportError:
            kinds = ["msgpack", "ckpt"]
        print(f"{'input':28} {'compressed':>10}  " + "  ".join(f"{k:>22}" for k in kinds))
        for name, data in inputs.items():
            src = Path(td) / "meta.zst"
            src.write_bytes(data)
            cells = []
            for k in kinds:
                r = subprocess.run(
                    [sys.executable, "-c", CHILD, k, str(src)], env=env, capture_output=True, text=True
                )
                if r.returncode:
                    cells.append(f"{'crash ' + str(r.returncode):>22}")
                    continue
                o = json.loads(r.stdout)
                e = f" {o['err'][:8]}" if o["err"] else ""
                cells.append(f"{o['s']:7.3f}s {o['peak'] / 2**20:7.0f}MiB{e:>5}"[:22].rjust(22))
            print(f"{name:28} {len(data):>10}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
