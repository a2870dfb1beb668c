"""The merged table kept beside a layer (ckpt/image/tablecache.py): an incremental dump reads its
parent's instead of walking the chain, and a table file that is missing, stale, corrupt or hostile
never makes a layer wrong.

Real processes (tests/targets/layout.c, idle in read() between commands). Each chain's tables are
compared with the walk's (MergedView.page_table, absent rows dropped) at every layer, and the
merged view with the process's memory page for page. The random steps come from the suite's
hypothesis seed (pytest's header prints it; CKPT_HYPOTHESIS_SEED replays or varies it)."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from ckpt.dump import dump
from ckpt.image import Layer, MergedView, find_layers, tablecache
from ckpt.image.chain import PageTable
from ckpt.image.format import MetaError, TableRef
from tests.test_layouts import LayoutTarget, Mapping, Run
from tests.test_restore import Restored, _chain, restored  # noqa: F401 (restored: a fixture)
from tests.util import HYPOTHESIS_SEED, PAGE, Target, assert_view_equals_memory, run_ckpt

COLS = ("addr", "state", "layer", "index", "digest")


def _walk_table(layer: str | Path) -> PageTable:
    with MergedView(Layer.open(layer)) as v:
        return tablecache.present_rows(v.page_table()).numpy()


def _write_walked(layer: str | Path) -> None:
    """Write the layer's table file as its dump did: the walk's rows, the chain's names."""
    lay = Layer.open(layer)
    with MergedView(Layer.open(layer)) as v:
        names = [os.path.relpath(x.path, Path(layer).parent) for x in v.layers[1:]]
    t = _walk_table(layer)
    tablecache.write(Path(layer), lay.digest, tablecache.encode(t, names), len(t))


def _equal(a: PageTable, b: PageTable) -> bool:
    a, b = a.numpy(), b.numpy()
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in COLS)


def _cached(layer: str | Path) -> PageTable | None:
    """The layer's table file as a dump would take it (not through tablecache.load: Spy's)."""
    try:
        return tablecache.read(Layer.open(layer), small=True).table
    except tablecache.TableRefused:
        return None


class Spy:
    """Whether each dump's tablecache.load found its parent's table usable."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.used: list[bool] = []
        real = tablecache.load

        def load(layer: Layer, **kw: Any) -> tablecache.Loaded | None:
            r = real(layer, **kw)
            self.used.append(r is not None)
            return r

        monkeypatch.setattr(tablecache, "load", load)


def _layout(big: bool) -> list[Mapping]:
    # big: more than pageset.small_max() (4096) rows, so the numpy path; else array columns
    n = 3000 if big else 300
    return [
        Mapping(
            "rw", "hole", 0, False, [Run("d", n, 1), Run("z", n // 3, 0), Run("a", n // 3), Run("d", n, 2)]
        ),
        Mapping("rw", "hole", 2, False, [Run("d", n // 2, 3), Run("a", 5)]),
    ]


def _npages(maps: list[Mapping]) -> list[int]:
    return [m.npages for m in maps]


def _step(t: LayoutTarget, sizes: list[int], rng: random.Random) -> None:
    """A few random writes between two dumps: new bytes, zeros, pages dropped, pages rewritten
    with their own bytes (dirty, unchanged)."""
    for _ in range(rng.randint(1, 4)):
        m = rng.randrange(len(sizes))
        n = rng.randint(1, 40)
        p = rng.randrange(sizes[m] - n)
        kind = rng.choice(["data", "data", "zero", "drop", "same"])
        tail = f" {rng.randrange(1 << 30)}" if kind == "data" else ""
        assert t.chan.cmd(f"{kind} {t.addrs[m] + p * PAGE:x} {n}{tail}") == "ok"


def _dump_checked(t: LayoutTarget, d: Path, incremental: bool, check_memory: bool) -> str:
    r = dump(t.pid, d, incremental=incremental, leave_stopped=True)
    try:
        if check_memory:
            assert_view_equals_memory(t.pid, r.layer)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    return r.layer


def _spoil(layer: str, how: str, older: str | None) -> None:
    """Make the table file of `layer` missing, stale (an older layer's), or corrupt."""
    p = tablecache.table_path(Path(layer))
    if how == "missing":
        p.unlink()
    elif how == "stale":
        assert older is not None
        q = tablecache.table_path(Path(older))
        p.write_bytes(q.read_bytes())
        q.unlink()
    elif how == "corrupt":
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        p.write_bytes(bytes(raw))


@pytest.fixture
def layout() -> Iterator[Callable[[list[Mapping]], LayoutTarget]]:
    started: list[LayoutTarget] = []

    def start(maps: list[Mapping]) -> LayoutTarget:
        t = LayoutTarget(maps)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
def test_sixty_layers_cached_spoiled_and_walked(
    big: bool,
    layout: Callable[[list[Mapping]], LayoutTarget],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """60 layers of one process. Before some dumps the parent's table file is taken away, replaced
    by an older layer's, or has a byte flipped: that dump walks the chain (and says so through
    tablecache.load), the others read the file. Every layer's recorded table equals the walk's,
    and the merged view equals the process's memory (at layers 2, 31 and 60)."""
    rng = random.Random(HYPOTHESIS_SEED)
    maps = _layout(big)
    sizes = _npages(maps)
    t = layout(maps)
    d = tmp_path / "chain"
    spy = Spy(monkeypatch)
    layers = [_dump_checked(t, d, False, True)]
    spoiled: list[bool] = []
    for k in range(1, 60):
        _step(t, sizes, rng)
        how = rng.choice(["keep"] * 5 + ["missing", "stale", "corrupt"])
        if how == "stale" and len(layers) < 2:
            how = "missing"
        if how == "stale":  # (the older layer's own file was dropped when its child was made)
            _write_walked(layers[-2])
        _spoil(layers[-1], how, layers[-2] if len(layers) > 1 else None)
        spoiled.append(how != "keep")
        layers.append(_dump_checked(t, d, True, k in (1, 30, 59)))
        cached = _cached(layers[-1])
        assert cached is not None, f"layer {k + 1} has no usable table file"
        assert _equal(cached, _walk_table(layers[-1])), f"layer {k + 1}: its table differs from the walk's"
        assert cached.small == (not big)
    assert spy.used == [not s for s in spoiled]
    assert any(spoiled) and not all(spoiled)
    # One table file per chain: each dump drops its parent's. 0600, as the layers.
    files = sorted(p.name for p in d.iterdir() if p.name.startswith(tablecache.PREFIX))
    assert files == [tablecache.PREFIX + Path(layers[-1]).name + tablecache.SUFFIX]
    assert len(list(d.glob("*.ckpt"))) == len(layers)  # (pathlib globs hidden files too)
    assert stat.S_IMODE(os.stat(d / files[0]).st_mode) == 0o600
    meta = Layer.open(layers[-1]).meta
    assert meta.table is not None and meta.table.layers == 60 and meta.table.root == Path(layers[0]).name


# -- hostile table files --------------------------------------------------------------------------
HEAD = struct.Struct("<8sII16sQQ")


def _decode(raw: bytes) -> dict[str, np.ndarray]:
    """The columns, and the chain's names (the rest of the body) under `names` as bytes."""
    n = HEAD.unpack_from(raw)[4]
    b = raw[HEAD.size :]
    o = [0, 8 * n, 16 * n, 24 * n, 26 * n, 27 * n]
    return {
        "names": np.frombuffer(b[o[5] :], "u1").copy(),
        "addr": np.frombuffer(b[o[0] : o[1]], "<u8").copy(),
        "digest": np.frombuffer(b[o[1] : o[2]], "<u8").copy(),
        "index": np.frombuffer(b[o[2] : o[3]], "<i8").copy(),
        "layer": np.frombuffer(b[o[3] : o[4]], "<u2").copy(),
        "state": np.frombuffer(b[o[4] : o[5]], "u1").copy(),
    }


def _encode(raw: bytes, c: dict[str, np.ndarray]) -> bytes:
    """A table file with the header of `raw` (its layer's digest) and the columns `c`, its sizes
    made consistent: what someone who can write the file but not the layer could make."""
    magic, version, flags, digest, _, _ = HEAD.unpack_from(raw)
    n = len(c["addr"])
    body = b"".join(
        c[k].astype(dt).tobytes()
        for k, dt in (("addr", "<u8"), ("digest", "<u8"), ("index", "<i8"), ("layer", "<u2"), ("state", "u1"))
    )
    body += c["names"].tobytes()
    return HEAD.pack(magic, version, flags, digest, n, len(body)) + body


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str, int, int, bytes]:
    """(kind, detail, position, value, bytes): drawn apart from any file, applied by `mutate` (the
    files change from one example to the next as the chain grows)."""
    kind = draw(st.sampled_from(["flip", "cut", "extend", "rows", "older", "header", "empty"]))
    detail = draw(st.sampled_from(["digest", "drop", "state", "dup", "layer", "magic", "version", "flags"]))
    return (
        kind,
        detail,
        draw(st.integers(0, 2**32)),
        draw(st.integers(1, (1 << 64) - 1)),
        draw(st.binary(min_size=1, max_size=64)),
    )


def mutate(raw: bytes, older: bytes, m: tuple[str, str, int, int, bytes]) -> tuple[str, bytes]:
    kind, detail, pos, val, extra = m
    if kind == "flip":
        i = pos % len(raw)
        return kind, raw[:i] + bytes([raw[i] ^ (val % 255 + 1)]) + raw[i + 1 :]
    if kind == "cut":
        return kind, raw[: pos % len(raw)]
    if kind == "extend":
        return kind, raw + extra
    if kind == "older":  # the parent's table with this layer's digest put in its header
        return kind, raw[:16] + HEAD.unpack_from(raw)[3] + older[32:]
    if kind == "header":
        vals = list(HEAD.unpack_from(raw))
        if detail == "magic":
            vals[0] = b"CKPTTABX"
        else:
            i = {"version": 1, "flags": 2}.get(detail, 4)
            vals[i] += val % 3 + 1
        return f"header/{detail}", HEAD.pack(*vals) + raw[HEAD.size :]
    if kind == "empty":
        return kind, b""
    c = _decode(raw)
    n = len(c["addr"])
    i = pos % max(1, n)
    what = detail if detail in ("digest", "drop", "state", "dup", "layer") else "digest"
    if n == 0:
        what = "dup"
    if what == "digest":
        c["digest"][i] ^= np.uint64(val)
    elif what == "drop":
        c = {k: v if k == "names" else np.delete(v, i) for k, v in c.items()}
    elif what == "state":
        c["state"][i] = 3 - c["state"][i]
    elif what == "layer":
        c["layer"][i] += 1
    else:
        c = {k: v if k == "names" else np.insert(v, i, v[i] if n else 0) for k, v in c.items()}
    return f"rows/{what}", _encode(raw, c)


@pytest.fixture(scope="module")
def hostile_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LayoutTarget, Path, list[str]]]:
    maps = _layout(False)
    t = LayoutTarget(maps)
    d = tmp_path_factory.mktemp("hostile") / "chain"
    try:
        layers = [_dump_checked(t, d, False, False)]
        rng = random.Random(HYPOTHESIS_SEED + 1)
        for _ in range(2):
            _step(t, _npages(maps), rng)
            layers.append(_dump_checked(t, d, True, False))
        yield t, d, layers
    finally:
        t.close()


@seed(HYPOTHESIS_SEED)
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(m=mutations(), steps=st.integers(0, 2**31))
def test_hostile_table_file_never_makes_a_wrong_layer(
    hostile_chain: tuple[LayoutTarget, Path, list[str]], m: tuple[str, str, int, int, bytes], steps: int
) -> None:
    """The newest layer's table file replaced by a mutation of it (a byte flipped, cut, extended, a
    header field changed, rows changed and the sizes made to agree, the parent's table under this
    layer's name): it is refused, or is the true table; the next dump on it is right page for page,
    and its own table equals the walk's."""
    t, d, layers = hostile_chain
    top = layers[-1]
    p = tablecache.table_path(Path(top))
    raw = p.read_bytes()
    older = p.read_bytes() if len(layers) < 2 else _older_table(layers[-2], top)
    kind, bad = mutate(raw, older, m)
    p.write_bytes(bad)
    truth = _walk_table(top)
    got = _cached(top)
    assert got is None or _equal(got, truth), f"{kind}: a table file other than the layer's was taken"
    if kind != "older":  # (the parent's table is this one's when nothing changed but the layer)
        assert got is None or bad == raw, kind
    _step(t, _npages(_layout(False)), random.Random(steps))
    layers.append(_dump_checked(t, d, True, True))
    mine = _cached(layers[-1])
    assert mine is not None and _equal(mine, _walk_table(layers[-1]))


def _older_table(parent: str, top: str) -> bytes:
    """The parent's table as its dump wrote it (rebuilt: its file was dropped when `top` was made)."""
    p = tablecache.table_path(Path(parent))
    assert Layer.open(parent).meta.table is not None
    _write_walked(parent)
    raw = p.read_bytes()
    p.unlink()
    return raw


def test_table_file_not_a_regular_file(
    layout: Callable[[list[Mapping]], LayoutTarget], tmp_path: Path
) -> None:
    """A FIFO, a directory or a symlink under the table file's name: refused at once (never waited
    on, never followed), and the dump walks."""
    maps = _layout(False)
    t = layout(maps)
    d = tmp_path / "chain"
    top = _dump_checked(t, d, False, False)
    p = tablecache.table_path(Path(top))
    target = tmp_path / "elsewhere"
    target.write_bytes(p.read_bytes())
    for make in (os.mkfifo, os.mkdir, lambda q: os.symlink(target, q)):
        p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
        make(p)
        with pytest.raises(tablecache.TableRefused):
            tablecache.read(Layer.open(top))
    p.unlink()
    os.mkfifo(p)
    _step(t, _npages(maps), random.Random(HYPOTHESIS_SEED))
    top = _dump_checked(t, d, True, True)
    assert _cached(top) is not None


@pytest.mark.parametrize(
    "bad",
    [
        {"sha256": "0" * 63, "rows": 1, "layers": 1, "root": "x"},
        {"sha256": "A" * 64, "rows": 1, "layers": 1, "root": "x"},
        {"sha256": "0" * 64, "rows": -1, "layers": 1, "root": "x"},
        {"sha256": "0" * 64, "rows": 1 << 40, "layers": 1, "root": "x"},
        {"sha256": "0" * 64, "rows": 1, "layers": 0, "root": "x"},
        {"sha256": "0" * 64, "rows": 1, "layers": 10001, "root": "x"},
        {"sha256": "0" * 64, "rows": 1, "layers": 1, "root": ""},
        {"sha256": "0" * 64, "rows": 1, "layers": 1, "root": "a\0b"},
        {"sha256": "0" * 64, "rows": 1, "layers": 1},
        [],
    ],
)
def test_table_record_bounds(bad: Any) -> None:
    with pytest.raises(MetaError):
        TableRef.from_dict(bad)


# -- restore: the plan takes the kept table when it is the chain's ---------------------------------
@pytest.mark.parametrize("spoil", ["keep", "corrupt", "missing"])
def test_restore_of_a_chain_with_its_table(
    spoil: str,
    tmp_path: Path,
    spawn: Callable[..., Any],
    datafile: Path,
    restored: Callable[..., Restored],  # noqa: F811
) -> None:
    """A restore's plan takes the top's table file (no walk) when it is the chain's, walks when it
    is spoiled, and the restored process's own checksum of its memory is the dumped one either way."""
    from ckpt.restore import make_plan

    layer, before, ref = _chain(tmp_path, spawn, datafile)
    _spoil(str(layer), spoil, None)
    with MergedView(Layer.open(layer)) as v:
        kept = v.cached_table(small=True)
        assert (kept is not None) == (spoil == "keep")
        plan = make_plan(v, small=True)
        assert _equal(plan.table, _walk_table(layer))
        if kept is not None:
            assert _equal(plan.table, kept)
    r = restored(layer)
    assert r.cmd("sum") == f"sum {before}"
    assert r.cmd("round") == ref.cmd("round")
    r.send("exit 0")
    assert r.wait() == 0


def test_table_follows_mapping_changes(
    spawn: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mappings made, moved, grown, cut, protected and unprotected between dumps (fresh ranges,
    mappings no longer dumped, pages outside every mapping): each layer's kept table equals the
    walk's, read from the parent's table file every time, and the last merged view is the memory."""
    t = spawn("memtarget", "256")
    spy = Spy(monkeypatch)
    d = tmp_path / "chain"
    rng = random.Random(HYPOTHESIS_SEED + 2)
    maps: list[tuple[int, int]] = []  # (addr, pages) of the mappings the test made
    r = dump(t.pid, d, leave_stopped=True)
    os.kill(t.pid, signal.SIGCONT)
    for k in range(16):
        op = rng.choice(["mmap", "munmap", "mremap", "mprotect", "write", "sbrk"]) if maps else "mmap"
        if op == "mmap":
            n = rng.randint(1, 40)
            maps.append((int(t.cmd(f"mmap {n}").split()[1], 16), n))
        elif op == "munmap":
            a, n = maps.pop(rng.randrange(len(maps)))
            assert t.cmd(f"munmap {a:#x} {n}") == "ok"
        elif op == "mremap":
            i = rng.randrange(len(maps))
            a, n = maps[i]
            m = rng.randint(1, 60)
            maps[i] = (int(t.cmd(f"mremap {a:#x} {n} {m}").split()[1], 16), m)
        elif op == "mprotect":
            a, n = maps[rng.randrange(len(maps))]
            assert t.cmd(f"mprotect {a:#x} {n} {rng.choice(['none', 'r', 'rw'])}") == "ok"
        elif op == "sbrk":
            assert t.cmd(f"sbrk {rng.randint(1, 9) * PAGE}").startswith("brk")
        t.cmd("write " + " ".join(str(rng.randrange(256)) for _ in range(5)))
        t.cmd(f"fill {rng.randrange(256)} 0")
        r = dump(t.pid, d, incremental=True, leave_stopped=True)
        try:
            if k == 15:
                assert_view_equals_memory(t.pid, r.layer)
        finally:
            os.kill(t.pid, signal.SIGCONT)
        cached = _cached(r.layer)
        assert cached is not None and _equal(cached, _walk_table(r.layer)), f"layer {k + 2} after {op}"
    assert spy.used == [True] * 16


@pytest.mark.parametrize(
    ("gone", "length", "index"),
    [("root", 3, 0), ("middle", 3, 1), ("deep", 5, 1)],
    ids=["root", "parents-parent", "deep"],
)
def test_dump_on_a_chain_with_a_layer_gone_refuses(
    layout: Callable[[list[Mapping]], LayoutTarget], tmp_path: Path, gone: str, length: int, index: int
) -> None:
    """A layer under the parent deleted (old layers pruned to free space), wherever it is in the
    chain: the dump refuses, as the walk does, instead of trusting the parent's table file and
    adding a layer that no restore can use (the chain is broken under it). One clear error naming
    the missing layer, no new layer. `deep`: neither the root nor the parent's parent, found by a
    stat of each name of the table file's chain list (test_chain_there for the listing)."""
    from ckpt.errors import CkptError

    maps = _layout(False)
    t = layout(maps)
    d = tmp_path / "chain"
    rng = random.Random(HYPOTHESIS_SEED)
    layers = [_dump_checked(t, d, False, False)]
    for _ in range(length - 1):
        _step(t, _npages(maps), rng)
        layers.append(_dump_checked(t, d, True, False))
    assert _cached(layers[-1]) is not None
    top = tablecache.read(Layer.open(layers[-1]))
    assert top.names == [Path(x).name for x in reversed(layers[:-1])]
    Path(layers[index]).unlink()
    _step(t, _npages(maps), rng)
    with pytest.raises(CkptError, match="missing") as e:
        dump(t.pid, d, incremental=True)
    assert Path(layers[index]).name in str(e.value)
    kept = sorted(Path(x).name for x in layers if Path(x).exists())
    assert sorted(p.name for p in d.glob("layer-*")) == kept


@pytest.mark.parametrize("n", [5, 300], ids=["stat", "listed"])
def test_chain_there(tmp_path: Path, n: int) -> None:
    """dump._chain_there, on files: every name there (plain ones in the parent's directory, one in
    another by a relative path, one absolute), then each kind of name missing in turn."""
    from ckpt.dump import _chain_there

    d, other = tmp_path / "chain", tmp_path / "other"
    d.mkdir()
    other.mkdir()
    names = [f"layer-{i:04d}.ckpt" for i in range(n, 0, -1)]
    for name in names:
        (d / name).touch()
    (other / "layer-0001.ckpt").touch()
    chain = [*names, "../other/layer-0001.ckpt", str(other / "layer-0001.ckpt")]
    top = d / f"layer-{n + 1:04d}.ckpt"
    assert _chain_there(top, chain)
    for gone in (d / names[n // 2], other / "layer-0001.ckpt"):
        gone.unlink()
        assert not _chain_there(top, chain), gone
        gone.touch()
    assert _chain_there(top, chain)


def test_a_version_1_table_file_is_not_read(
    layout: Callable[[list[Mapping]], LayoutTarget], tmp_path: Path
) -> None:
    """A table file of version 1 (an older ckpt's: no chain list) is not taken: the next dump walks
    the chain once and writes a version 2 file."""
    maps = _layout(False)
    t = layout(maps)
    d = tmp_path / "chain"
    layers = [_dump_checked(t, d, False, False)]
    _step(t, _npages(maps), random.Random(HYPOTHESIS_SEED))
    layers.append(_dump_checked(t, d, True, False))
    p = tablecache.table_path(Path(layers[-1]))
    raw = bytearray(p.read_bytes())
    assert HEAD.unpack_from(raw)[1] == 2
    struct.pack_into("<I", raw, 8, 1)
    p.write_bytes(bytes(raw))
    with pytest.raises(tablecache.TableRefused, match="version 2"):
        tablecache.read(Layer.open(layers[-1]))
    layers.append(_dump_checked(t, d, True, True))
    assert _equal(_cached(layers[-1]) or _walk_table(layers[0]), _walk_table(layers[-1]))
    assert tablecache.read(Layer.open(layers[-1])).names == [Path(layers[1]).name, Path(layers[0]).name]


def test_a_table_larger_than_memory_is_refused_before_its_allocation(tmp_path: Path) -> None:
    """The row count comes from the layer's metadata, bounded by the format only (a crafted layer
    may say 2**36 rows): beside a sparse file of exactly that size, the read must refuse before it
    allocates the table (it would have asked for terabytes), and the dump then walks the chain."""
    layer = tmp_path / "layer-0002.ckpt"
    with open("/proc/meminfo") as f:
        total = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal:"))
    rows = 4 * total // tablecache.ROW_BYTES  # four times the machine's memory
    with open(tablecache.table_path(layer), "wb") as f:
        # sparse: no disk used; its chain list's size: one name, the parent's
        f.truncate(tablecache.HEADER_SIZE + rows * tablecache.ROW_BYTES + len("layer-0001.ckpt") + 1)
    ref = TableRef(sha256="0" * 64, rows=rows, layers=2, root="layer-0001.ckpt")
    fake = type("L", (), {"path": layer})()
    with pytest.raises(tablecache.TableRefused, match="more than the memory available"):
        tablecache._read_all(fake, ref)  # type: ignore[arg-type]


def test_show_prints_the_table_record(spawn: Callable[..., Target], tmp_path: Path) -> None:
    """`ckpt show` of an incremental layer: its table record (JSON and text), as the layer holds it."""
    t = spawn("rounds", "64")
    assert t.cmd("round").startswith("round 1 ")
    d = tmp_path / "d"
    run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), check=True)
    assert t.cmd("round").startswith("round 2 ")
    run_ckpt("dump", "--pid", str(t.pid), "-D", str(d), "--incremental", check=True)
    top = find_layers(d)[-1]
    rec = Layer.open(top).meta.table
    assert rec is not None and rec.layers == 2
    shown = json.loads(run_ckpt("show", str(top), "--json", check=True).stdout)
    assert shown["table"] == rec.to_dict()
    text = run_ckpt("show", str(top), check=True).stdout
    assert f"{rec.sha256[:16]}... matches: {rec.rows} pages of 2 layer(s)" in text
