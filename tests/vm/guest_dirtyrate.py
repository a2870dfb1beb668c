"""Issue 11: `ckpt dirtyrate` with the soft-dirty tracker, on a kernel that has soft-dirty.

tests/vm/test_dirtyrate_guest.py runs this in the QEMU guest (Debian's kernel: soft-dirty, no
uffd-wp async). A step-mode examples/dirtier (no huge pages: a soft-dirty bit covers a whole THP)
writes a known set of pages between two samples; dirtyrate must report exactly that set inside the
target's buffer, and `--track auto` must pick soft-dirty. One Python process does it all (a Python
start costs seconds under TCG). Writes JSON to --out; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback

COUNTS = [0, 1, 5, 40, 3, 200, 0, 17]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dirtier", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--track", default="soft-dirty", help="uffd-wp: the same checks on the host")
    a = ap.parse_args()
    res: dict[str, object] = {"failures": []}
    failures: list[str] = res["failures"]  # type: ignore[assignment]
    argv = [a.dirtier, "-m", "4M", "-S", "-N", "-p", "random", "-s", "11"]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        from ckpt.teach.dirtyrate import measure
        from ckpt.track import auto_name

        assert p.stdout is not None and p.stdin is not None
        words = dict(w.split("=", 1) for w in p.stdout.readline().split()[1:])
        base, npages = int(words["base"], 16), int(words["pages"])
        res["auto"] = auto_name()
        expected: list[list[int]] = []
        got: list[list[int]] = []

        def wait(_secs: float) -> bool:
            if len(expected) == len(COUNTS):
                return True
            p.stdin.write(f"step {COUNTS[len(expected)]}\n")  # type: ignore[union-attr]
            ans = p.stdout.readline().split()  # type: ignore[union-attr]
            expected.append(sorted({base + int(i) * 4096 for i in ans[1:]}))
            return False

        def on(iv: object) -> None:
            got.append([int(x) for x in iv.pages if base <= x < base + npages * 4096])  # type: ignore[attr-defined]

        s = measure(p.pid, track=a.track, wait=wait, on_interval=on)
        res.update(tracker=s.tracker, intervals=s.intervals, end=s.end, expected=expected, got=got)
        if s.tracker != a.track:
            failures.append(f"tracker {s.tracker}, not {a.track}")
        if got != expected:
            failures.append(
                f"dirty sets differ: expected sizes {[len(e) for e in expected]}, got {[len(g) for g in got]}"
            )
        p.stdin.write("sum\n")
        if not p.stdout.readline().startswith("checksum "):
            failures.append("the target did not answer after the run")
    except Exception:
        failures.append(traceback.format_exc())
    finally:
        p.kill()
        p.wait()
    with open(a.out, "w") as f:
        json.dump(res, f)
    for x in failures:
        print(x, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
