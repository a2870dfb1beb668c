"""Which of ckpt's functions work on numpy in a small dump and restore (issue 9 part 3).

    python bench/numpy_calls.py [--pages 256] [--markdown]

numpy's import is ~30% of the start of a small `ckpt dump` or `ckpt restore`; it stays until no
function on their path touches numpy. This lists those functions, so that the work left to take
numpy off the small path (ckpt/pageset.py: numpy only above a size) can be counted and followed.
Each command runs in its own interpreter with a profile hook that marks a function of ckpt when it
calls into numpy (a C function or method of numpy's) or holds a numpy value when it returns (an
operator such as `a[mask]` calls nothing the hook sees). Commands: a full dump with `--track none`,
a full dump with uffd-wp, an incremental dump, a restore. Not a test; counts, not times.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.util import Target, build_c  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
PR_SET_CHILD_SUBREAPER = 36
# Run inside the command's interpreter: argv[1] is where to write the findings (JSON).
HOOK = r"""
import json, sys, threading
out, argv = sys.argv[1], sys.argv[2:]
hits = {}
def prof(frame, event, arg):
    co = frame.f_code
    if "/ckpt/" not in co.co_filename:
        return
    if event == "c_call":
        owner = getattr(arg, "__self__", None)
        mods = (getattr(arg, "__module__", None) or "", type(owner).__module__,
                getattr(owner, "__name__", "") or "")
        if not any(m.startswith("numpy") for m in mods):
            return
    elif event == "return":
        if not any(type(v).__module__.startswith("numpy") for v in [arg, *frame.f_locals.values()]):
            return
    else:
        return
    key = co.co_filename.rsplit("/ckpt/", 1)[1] + ":" + co.co_name
    hits[key] = hits.get(key, 0) + 1
def report():
    with open(out, "w") as f:
        json.dump({"numpy": "numpy" in sys.modules, "functions": hits}, f)
import atexit
atexit.register(report)
threading.setprofile(prof)
sys.setprofile(prof)
import ckpt.cli
code = ckpt.cli.main(argv)
sys.setprofile(None)
report()
sys.exit(code)
"""


def traced(argv: list[str], out: Path, keep_stdin: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", HOOK, str(out), *argv],
        env=ENV,
        cwd=ROOT,
        stdin=subprocess.PIPE if keep_stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    exe = str(build_c("rounds"))
    work = Path(tempfile.mkdtemp(prefix="ckpt-numpy-calls-"))
    found: dict[str, dict[str, int]] = {}
    imported: dict[str, bool] = {}

    def run(name: str, argv: list[str]) -> None:
        out = work / f"{name}.json"
        p = traced(argv, out)
        _, err = p.communicate(timeout=300)
        if p.returncode:
            raise RuntimeError(f"{name}: {err.decode().strip()}")
        r = json.loads(out.read_text())
        found[name], imported[name] = r["functions"], r["numpy"]

    t = Target([exe, str(a.pages)], stderr=subprocess.DEVNULL)
    try:
        t.cmd("mix")
        run("dump --track none", ["dump", "--pid", str(t.pid), "-D", str(work / "a"), "--track", "none"])
        run("dump (uffd-wp)", ["dump", "--pid", str(t.pid), "-D", str(work / "b")])
        t.cmd("round")
        run("incremental dump", ["dump", "--pid", str(t.pid), "-D", str(work / "b"), "--incremental"])
    finally:
        t.proc.kill()
        t.proc.wait()
    out = work / "restore.json"
    p = traced(["restore", "--detach", str(work / "a")], out, keep_stdin=True)
    assert p.stdout is not None and p.stdin is not None
    pid = int(p.stdout.readline())
    p.stdin.close()
    p.wait(120)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # ours: we are a subreaper
    r = json.loads(out.read_text())
    found["restore"], imported["restore"] = r["functions"], r["numpy"]

    print(f"# functions of ckpt that work on numpy, {a.pages} pages ({a.pages * 4 // 1024} MiB target)")
    if a.markdown:
        print("| command | numpy imported | functions | modules | the functions |")
        print("|---|---|---|---|---|")
    for name, fns in found.items():
        mods = collections.defaultdict(list)
        for key in sorted(fns):
            mod, fn = key.split(":")
            mods[mod].append(fn)
        listing = "; ".join(f"{m}: {', '.join(fs)}" for m, fs in sorted(mods.items()))
        if a.markdown:
            print(f"| {name} | {'yes' if imported[name] else 'no'} | {len(fns)} | {len(mods)} | {listing} |")
        else:
            print(f"{name}: numpy imported: {imported[name]}, {len(fns)} functions in {len(mods)} modules")
            for m, fs in sorted(mods.items()):
                print(f"  {m}: {', '.join(fs)}")


if __name__ == "__main__":
    main()
