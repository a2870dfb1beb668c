"""What a dump parses after its thaw (dump._collect_in's later(): the task record, the signal
actions, the props record's parsed keys, the other threads' cloned state) reads nothing of the
process: it runs once the target is let go, and its records are those of the same parse made inside
the freeze."""

from __future__ import annotations

import importlib
import os
import resource
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt.dump import dump
from ckpt.image import Layer
from ckpt.ptrace import raw
from tests.util import Target

dump_mod = importlib.import_module("ckpt.dump")  # (ckpt.dump, the name, is the function)

# A python3 process with state of every kind the parse builds: its umask, a limit, handlers, an
# interval timer, a parent-death signal and a subreaper flag, and a second thread.
_TARGET = r"""
import ctypes, os, resource, signal, sys, threading
os.umask(0o027)
resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))
signal.signal(signal.SIGUSR1, lambda *a: None)
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
signal.setitimer(signal.ITIMER_VIRTUAL, 1000.0, 1000.0)
libc = ctypes.CDLL(None)
libc.prctl(1, 10, 0, 0, 0)  # PR_SET_PDEATHSIG SIGUSR1
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
ev = threading.Event()
threading.Thread(target=ev.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target([sys.executable, "-c", _TARGET])
    try:
        yield t
    finally:
        t.proc.kill()
        t.proc.wait()


def _tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("TracerPid:"))


def _records(d: Path) -> tuple[Any, Any, Any, list[Any]]:
    with Layer.open(sorted(d.glob("layer-*.ckpt"))[-1]) as layer:
        m = layer.meta
        task = m.task.to_dict()
        task.pop("pending", None)
        props = m.props.to_dict()
        for k in ("itimers", "timers"):  # (the timers run on between two dumps)
            props.pop(k, None)
        threads = sorted((t.tid, t.props.to_dict() if t.props else None) for t in m.threads)
        return task, [a.to_dict() for a in m.sigactions], props, threads


def test_the_parse_after_the_thaw_reads_nothing_of_the_process(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = target.pid
    collect = dump_mod._collect_in
    seen: list[str] = []  # what later() touched of the process
    tracers: list[int] = []
    now: list[bool] = [False]  # (later() called inside the freeze: the same parse, frozen)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if not watching[0]:
            return
        if event in ("open", "os.listdir", "os.scandir") and f"/proc/{pid}" in str(args[0]):
            seen.append(f"{event} {args[0]}")

    watching = [False]
    sys.addaudithook(hook)
    real_stat, real_readlink = os.stat, os.readlink

    def stat(path: Any, *a: Any, **k: Any) -> Any:
        if watching[0] and f"/proc/{pid}" in str(path):
            seen.append(f"stat {path}")
        return real_stat(path, *a, **k)

    def readlink(path: Any, *a: Any, **k: Any) -> Any:
        if watching[0] and f"/proc/{pid}" in str(path):
            seen.append(f"readlink {path}")
        return real_readlink(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "readlink", readlink)
    for mod, name in ((raw, "call"), (resource, "prlimit"), (os, "sched_getscheduler"), (os, "getpriority")):
        real = getattr(mod, name)

        def asked(*a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            if watching[0]:
                seen.append(_name)  # (ptrace, or a question about the process)
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, asked)

    def wrapped(*a: Any, **k: Any) -> dict[str, Any]:
        out = collect(*a, **k)
        later: Callable[[], None] = out["later"]

        def watched() -> None:
            tracers.append(_tracer(pid))
            watching[0] = True
            try:
                later()
            finally:
                watching[0] = False

        if now[0]:
            later()
            out["later"] = lambda: None
        else:
            out["later"] = watched
        return out

    # (the watch sees what it is for: a file of the process, a stat, a call through ctypes)
    watching[0] = True
    open(f"/proc/{pid}/comm", "rb").close()
    os.stat(f"/proc/{pid}/status")
    resource.prlimit(pid, resource.RLIMIT_NOFILE)
    watching[0] = False
    assert seen == [f"open /proc/{pid}/comm", f"stat /proc/{pid}/status", "prlimit"]
    seen.clear()
    monkeypatch.setattr(dump_mod, "_collect_in", wrapped)
    dump(pid, tmp_path / "after", track="uffd-wp")
    dump(pid, tmp_path / "after", incremental=True, track="uffd-wp")
    assert tracers == [0, 0]  # let go before the parse, in the full dump and the incremental
    assert seen == []
    now[0] = True
    dump(pid, tmp_path / "frozen", track="none")
    after, frozen = _records(tmp_path / "after"), _records(tmp_path / "frozen")
    assert after == frozen
    task, acts, props, threads = after
    assert task["umask"] == 0o027 and task["rlimits"]["nofile"] == [100, 200]
    by_sig = {a["sig"]: a for a in acts}
    assert by_sig[signal.SIGUSR1]["handler"] > 1 and by_sig[signal.SIGUSR2]["handler"] == 1  # (SIG_IGN)
    assert props["pdeathsig"] == signal.SIGUSR1 and props["subreaper"] is True
    assert len(threads) == 2 and all(p is not None for _, p in threads)
    with Layer.open(sorted((tmp_path / "after").glob("layer-*.ckpt"))[-1]) as layer:
        virtual = layer.meta.props.itimers[1]  # ITIMER_VIRTUAL: [value, interval] in microseconds
        assert virtual[1] == 1000 * 1_000_000 and virtual[0] > 0  # (the value: rounded up to a tick)
    assert target.proc.poll() is None
