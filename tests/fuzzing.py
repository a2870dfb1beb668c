"""Mutations of real layers and a driver that runs every reading command on them (issue 13).

Shared by tests/test_fuzz.py (a bounded run in the suite) and bench/fuzz_layers.py (long runs).
A case is one mutated copy of a real chain; a child process (`python -m tests.fuzzing CASE_DIR`)
runs verify, show, show --json, read, diff, merge and restore's planning on it through the CLI's
own `main`, and reports each command's exit code and stderr, then its peak RSS (VmHWM) and
whether any temp file was left. The parent checks the rules: exit code in {0, 1, 2}, at most one
line on stderr and no traceback, no temp file, peak RSS under the bound.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import xxhash
import zstandard

ROOT = Path(__file__).resolve().parent.parent
FOOTER = 48
HEADER = 64
# Peak RSS of one case's child (all its commands); a hostile layer must not push it past this.
# The interpreter with numpy, zstandard and rich is ~60 MiB; a metadata bomb is stopped at ~200 MiB.
RSS_LIMIT = 512 << 20


# -- building mutated layers ------------------------------------------------------------------
def footer_of(raw: bytes) -> tuple[int, int]:
    off, length = struct.unpack_from("<QQ", raw, len(raw) - FOOTER + 8)
    return off, length


def meta_of(raw: bytes) -> dict[str, Any]:
    off, length = footer_of(raw)
    d = msgpack.unpackb(
        zstandard.ZstdDecompressor().decompress(raw[off : off + length]),
        raw=False,
        strict_map_key=False,
        unicode_errors="surrogateescape",
    )
    assert isinstance(d, dict)
    return d


def with_meta(raw: bytes, comp: bytes) -> bytes:
    """`raw` with its metadata replaced by `comp` (compressed), footer checksums recomputed."""
    off, _ = footer_of(raw)
    body = raw[:off] + comp
    foot = struct.pack("<8sQQ16s", b"CKPTFOOT", off, len(comp), xxhash.xxh3_128(comp).digest())
    return body + foot + struct.pack("<Q", xxhash.xxh3_64_intdigest(foot))


def pack(d: Any) -> bytes:
    raw = msgpack.packb(d, use_bin_type=True, unicode_errors="surrogateescape")
    return zstandard.ZstdCompressor(write_content_size=True).compress(raw)


def odd_files(base: Path) -> dict[str, Path]:
    """Files a hostile layer may name: made once per run under `base`."""
    base.mkdir(parents=True, exist_ok=True)
    out = {
        "fifo": base / "fifo",
        "dir": base / "dir",
        "loop": base / "loop",
        "sparse": base / "sparse",
        "zero": Path("/dev/zero"),
        "urandom": Path("/dev/urandom"),
        "null": Path("/dev/null"),
        "missing": base / "missing",
    }
    if not out["fifo"].exists():
        os.mkfifo(out["fifo"])
    out["dir"].mkdir(exist_ok=True)
    if not out["loop"].is_symlink():
        out["loop"].symlink_to("loop")
    if not out["sparse"].exists():
        with open(out["sparse"], "wb") as f:
            f.truncate(1 << 40)  # 1 TiB, no blocks
    return out


_ODD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    1 << 63,
    (1 << 64) - 1,
    1.5,
    float("inf"),
    "",
    "[/x]",
    "[bold]x",
    "a\0b",
    "\udcff\udcfe",
    "x" * 70000,
    b"",
    b"\xff" * 9,
    [],
    [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]],
    {},
    {b"k": 1},
    {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": 1}}}}}}}}}},
]


def _paths(x: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a decoded metadata map (bin blobs are leaves), depth-first."""
    out = [prefix]
    if isinstance(x, dict):
        for k, v in x.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(x, list) and len(x) <= 64:
        for i, v in enumerate(x):
            out += _paths(v, (*prefix, i))
    elif isinstance(x, list):  # long lists: a few entries are enough
        for i in (0, len(x) // 2, len(x) - 1):
            out += _paths(x[i], (*prefix, i))
    return out


def _set(d: Any, path: tuple[Any, ...], value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _get(d: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        d = d[k]
    return d


@dataclass
class Case:
    kind: str
    detail: str
    addr: int | None = None  # where `read` should look (default: the layer's first data page)


def mutate(rng: random.Random, top: bytes, odd: dict[str, Path], base_dir: Path) -> tuple[bytes, Case]:
    """One hostile version of the layer `top` (a child layer of a real chain)."""
    kind = rng.choice(["bitflip", "truncate", "meta", "meta", "parent", "mapping", "bomb", "chunks"])
    raw = bytearray(top)
    if kind == "bitflip":
        spots = sorted(rng.randrange(len(raw) * 8) for _ in range(rng.randint(1, 8)))
        for b in spots:
            raw[b // 8] ^= 1 << (b % 8)
        return bytes(raw), Case(kind, f"bits {spots}")
    if kind == "truncate":
        n = rng.randrange(len(raw))
        return bytes(raw[:n]), Case(kind, f"to {n} bytes")
    d = meta_of(top)
    if kind == "meta":
        paths = [p for p in _paths(d) if p]
        p = rng.choice(paths)
        old = _get(d, p)
        if isinstance(old, bytes) and old and rng.random() < 0.5:
            b = bytearray(old)  # a packed array: shuffle, duplicate, or misalign it
            op = rng.choice(["swap", "dup", "cut", "huge"])
            if op == "swap" and len(b) >= 16:
                b[:8], b[8:16] = b[8:16], b[:8]
            elif op == "dup" and len(b) >= 8:
                b += b[-8:]
            elif op == "cut":
                b = b[: rng.randrange(len(b))]
            else:
                b[-8:] = struct.pack("<Q", rng.choice([1 << 47, (1 << 64) - 4096, 4096]))
            v: Any = bytes(b)
        else:
            v = rng.choice(_ODD_VALUES)
        _set(d, p, v)
        return with_meta(top, pack(d)), Case(kind, f"{p} = {str(v)[:60]!r}")
    if kind == "parent":
        name = rng.choice(sorted(odd))
        target = odd[name]
        d["inventory"]["parent"] = {"path": str(target), "digest": d["inventory"]["parent"]["digest"]}
        return with_meta(top, pack(d)), Case(kind, f"parent -> {name}")
    if kind == "mapping":
        name = rng.choice(["fifo", "urandom", "sparse", "dir", "loop", "null"])
        target = odd[name]
        vmas = [i for i, v in enumerate(d["vmas"]) if v["status"] == "dumped"]
        i = rng.choice(vmas)
        v = d["vmas"][i]
        try:
            st = os.stat(target)
            fid = {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            fid = {"dev": 1, "ino": 1, "size": 0, "mtime_ns": 0}
        v.update(path=str(target), inode=fid["ino"] or 1, file=fid, offset=rng.choice([0, 1 << 62]))
        return with_meta(top, pack(d)), Case(kind, f"vmas[{i}] -> {name}", v["start"])
    if kind == "bomb":
        n = (64 << 20) - 4096
        per = n // 4
        inner = b"\xdd" + struct.pack(">I", per) + bytes([rng.choice([0x80, 0x90, 0xA0, 0xC0])]) * per
        blob = b"\x81\xa4vmas\x94" + inner * 4
        comp = zstandard.ZstdCompressor(write_content_size=True).compress(blob)
        return with_meta(top, comp), Case(kind, "64 MiB of empty containers")
    # chunks: a chunk record pointing elsewhere, with a valid checksum of what it points at
    ch = d["pages"]["chunks"]
    if not ch:
        return bytes(raw[:-1]), Case(kind, "no chunks; truncated by one")
    i = rng.randrange(len(ch))
    off, _ = footer_of(top)
    start = rng.randrange(HEADER, off)
    clen = rng.randrange(1, max(2, off - start))
    ch[i].update(offset=start, clen=clen, xxh3=xxhash.xxh3_64_intdigest(top[start : start + clen]))
    return with_meta(top, pack(d)), Case(kind, f"chunks[{i}] -> {start}+{clen}")


# -- the child: every reading command on one case ---------------------------------------------
def _vmhwm() -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1]) * 1024
    return 0


def _run_cli(argv: list[str]) -> tuple[int, str]:
    from ckpt.cli import main

    err = io.StringIO()
    out = io.StringIO()
    code: int
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:
            err.write(traceback.format_exc())
            code = 99
    return code, err.getvalue()


def _plan(layer: str) -> tuple[int, str]:
    """restore's planning and checks only (make_plan), never a restore of a hostile layer."""
    from ckpt.api import open_layer
    from ckpt.errors import CkptError
    from ckpt.restore.plan import make_plan

    try:
        with open_layer(layer) as view:
            make_plan(view)
        return 0, ""
    except CkptError as e:
        return 1, f"ckpt: {e}\n"
    except BaseException:
        return 99, traceback.format_exc()


def child(case_dir: Path) -> dict[str, Any]:
    spec = json.loads((case_dir / "case.json").read_text())
    layer, base = spec["layer"], spec["base"]
    cmds: list[tuple[str, Callable[[], tuple[int, str]]]] = [
        ("verify", lambda: _run_cli(["verify", layer])),
        ("show", lambda: _run_cli(["show", layer])),
        ("show --json", lambda: _run_cli(["show", "--json", layer])),
        ("read", lambda: _run_cli(["read", layer, "--addr", hex(spec["addr"]), "--size", "8192"])),
        ("diff", lambda: _run_cli(["diff", base, layer, "--pages"])),
        ("merge", lambda: _run_cli(["merge", layer, "-o", str(case_dir / "out" / "merged.ckpt")])),
        ("plan", lambda: _plan(layer)),
    ]
    results = {name: fn() for name, fn in cmds}
    return {"results": results, "vmhwm": _vmhwm()}


# -- the parent -------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    problems: list[str]
    vmhwm: int
    codes: dict[str, int]


def run_case(rng: random.Random, chain_dir: Path, top: Path, work: Path, odd: dict[str, Path]) -> Outcome:
    """One case: copy the chain, mutate its top layer, run the child, check the rules."""
    case_dir = work / "case"
    shutil.rmtree(case_dir, ignore_errors=True)
    shutil.copytree(chain_dir, case_dir / "chain")
    (case_dir / "out").mkdir(mode=0o700)
    layer = case_dir / "chain" / top.name
    data, case = mutate(rng, top.read_bytes(), odd, case_dir / "chain")
    layer.write_bytes(data)
    base = case_dir / "chain" / "layer-0001.ckpt"
    addr = meta_of(top.read_bytes())["pages"]["data"][:8]
    first = struct.unpack("<Q", addr)[0] if addr else 0x1000
    spec = {"layer": str(layer), "base": str(base), "addr": first if case.addr is None else case.addr}
    (case_dir / "case.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="200")
    # A generous timeout only turns a hang (a FIFO opened for reading) into a failure.
    p = subprocess.run(
        [sys.executable, "-m", "tests.fuzzing", str(case_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    problems: list[str] = []
    if p.returncode != 0:
        return Outcome(case, [f"driver failed ({p.returncode}): {p.stderr[-2000:]}"], 0, {})
    rep = json.loads(p.stdout.splitlines()[-1])
    codes: dict[str, int] = {}
    for name, (code, err) in rep["results"].items():
        codes[name] = code
        if code not in (0, 1, 2):
            problems.append(f"{name}: exit {code}: {err[-1500:]}")
        elif "Traceback" in err or err.count("\n") > 1:
            problems.append(f"{name}: stderr is not one line: {err[-1500:]}")
        elif code != 0 and not err.startswith("ckpt: "):
            problems.append(f"{name}: failed without saying why")
    left = [str(q) for q in case_dir.rglob("*") if ".tmp." in q.name or ".pub." in q.name]
    if left:
        problems.append(f"temp files left: {left}")
    if rep["vmhwm"] > RSS_LIMIT:
        problems.append(f"peak RSS {rep['vmhwm'] >> 20} MiB, over {RSS_LIMIT >> 20} MiB")
    return Outcome(case, problems, rep["vmhwm"], codes)


if __name__ == "__main__":
    print(json.dumps(child(Path(sys.argv[1]))))
