"""Diff and chain-resolution speed on synthetic 1 GiB layers (issue 4: "two 1 GiB layers diff in well
under a second"). Not a test: it prints a table.

    python bench/bench_diff.py [--pages 262144] [--repeat 5] [--markdown]

Layers are built with LayerWriter from stamped pages (cheap to make, real files, real checksums):
a full layer, a child with 10% of its pages written and 1000 written back unchanged, and an
unrelated full layer; and a 10-layer chain for MergedView.page_table().
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckpt.diff import diff  # noqa: E402
from ckpt.image import Inventory, LayerMeta, LayerWriter, PageIndex, VmaRecord, open_layer, parent_ref  # noqa: E402
from ckpt.image.reader import Layer  # noqa: E402

PG = 4096
BASE = 0x7F0000000000


def stamped(idx: np.ndarray, stamp: int) -> bytes:
    """Page i holds (i, stamp) in its first 16 bytes, zeros after: distinct, cheap, compressible."""
    a = np.zeros((len(idx), PG // 8), dtype=np.uint64)
    a[:, 0] = idx
    a[:, 1] = stamp
    return a.tobytes()


def layer(
    d: Path,
    name: str,
    n: int,
    idx: np.ndarray,
    stamp: int,
    parent: Path | None = None,
    unchanged: np.ndarray | None = None,
) -> Path:
    vma = VmaRecord(BASE, BASE + n * PG, "rw-p", 0, "00:00", 0, "")
    with LayerWriter(d, name) as w:
        for lo in range(0, len(idx), 4096):
            sel = idx[lo : lo + 4096]
            w.add_pages(np.uint64(BASE) + sel.astype(np.uint64) * np.uint64(PG), stamped(sel, stamp))
        uc = (
            np.empty(0, np.uint64)
            if unchanged is None
            else np.uint64(BASE) + unchanged.astype(np.uint64) * np.uint64(PG)
        )
        inv = Inventory(
            pid=1,
            incremental=parent is not None,
            parent=None if parent is None else parent_ref(Layer.open(parent), d),
        )
        return w.finish(LayerMeta(inventory=inv, vmas=[vma], pages=PageIndex(unchanged=np.sort(uc))))


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=1 << 18)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    n = a.pages
    rng = np.random.default_rng(7)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-diff-", dir="/var/tmp") as t:
        d = Path(t)
        full = layer(d, "layer-0001.ckpt", n, np.arange(n), 1)
        written = np.sort(rng.choice(n, n // 10, replace=False))
        rest = np.setdiff1d(np.arange(n), written)
        child = layer(
            d,
            "layer-0002.ckpt",
            n,
            written,
            2,
            parent=full,
            unchanged=np.sort(rng.choice(rest, 1000, replace=False)),
        )
        other = layer(d / "o", "layer-0001.ckpt", n, np.arange(n), 3)

        def run(x: Path, y: Path) -> None:
            va, vb = open_layer(x), open_layer(y)
            diff(va, vb).to_dict()

        rows.append(["diff parent / child (10% changed)", f"{timed(lambda: run(full, child), a.repeat):.0f}"])
        rows.append(["diff of unrelated full layers", f"{timed(lambda: run(full, other), a.repeat):.0f}"])
        prev = full
        for k in range(2, 11):
            sel = np.sort(rng.choice(n, n // 20, replace=False))
            prev = layer(d / "chain", f"layer-{k:04d}.ckpt", n, sel, k, parent=prev if k > 2 else full)
        rows.append(
            [
                "page_table of a 10-layer chain",
                f"{timed(lambda: open_layer(prev).page_table(), a.repeat):.0f}",
            ]
        )
    title = f"{n} pages ({n * PG / 2**30:.2f} GiB) per layer, median of {a.repeat}, open included"
    if a.markdown:
        print(f"\n### {title}\n\n| what | ms |\n|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} |")
    else:
        print(title)
        for r in rows:
            print(f"  {r[0]:<40} {r[1]:>6} ms")


if __name__ == "__main__":
    main()
