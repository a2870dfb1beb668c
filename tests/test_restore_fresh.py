"""Signal actions set only where the helper's differ (restore/freshactions.py): the restored process
has every dumped action exactly, whatever the helper inherited from the `ckpt restore` that made it.

The helper is exec'd by ckpt, so it keeps the signals ckpt's own process ignores (a shell's `nohup`,
a service manager): here `ckpt restore` runs with a set of signals ignored, some of which the dumped
process ignores too (no call needed) and some it leaves at SIG_DFL or handles (calls needed).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt.image import open_layer
from ckpt.image.format import SigactionRecord
from ckpt.restore.freshactions import helper_ignored, to_set
from tests.util import ROOT, LineChannel, Target, run_ckpt, subreaper_on, subreaper_restore

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
_libc = ctypes.CDLL(None, use_errno=True)
# Ignored by `ckpt restore` (and so by its helper): SIGHUP and SIGTERM the targets below ignore too,
# SIGALRM, SIGXCPU, SIGIO and two real-time signals they leave at SIG_DFL, SIGUSR2 rounds handles.
IGNORED_BY_CKPT = (signal.SIGHUP, signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, signal.SIGIO, 44, 64,
                   signal.SIGUSR2)  # fmt: skip
# Ignored by the rounds target from its start, with no flags and no mask (as execve leaves them).
IGNORED_BY_TARGET = (signal.SIGHUP, signal.SIGTERM, signal.SIGWINCH)


def _ignoring(sigs: tuple[int, ...]) -> Callable[[], None]:
    def pre() -> None:
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)

    return pre


def _status(pid: int) -> dict[str, str]:
    out = {}
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = ln.partition(":")
        out[k] = v.strip()
    return out


@pytest.fixture
def detached() -> Iterator[Callable[[Path], tuple[int, LineChannel]]]:
    """`ckpt restore --detach --json LAYER` run with IGNORED_BY_CKPT ignored: (the restored pid, its
    line channel: it shares the command's pipes). Every restored process is killed and reaped."""
    pids: list[int] = []
    procs: list[subprocess.Popen[bytes]] = []
    was_subreaper = subreaper_on()

    def start(layer: Path) -> tuple[int, LineChannel]:
        p = subprocess.Popen(
            [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach", "--json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
            bufsize=0, preexec_fn=_ignoring(IGNORED_BY_CKPT),
        )  # fmt: skip
        procs.append(p)
        chan = LineChannel(p, 60)
        out = json.loads(chan.readline())
        pids.append(out["pid"])
        return out["pid"], chan

    try:
        yield start
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for p in procs:
            p.wait(30)
            for f in (p.stdin, p.stdout, p.stderr):
                if f:
                    f.close()
        subreaper_restore(was_subreaper)


def _dump_kill(pid: int, d: Path) -> Path:
    run_ckpt("dump", "--pid", str(pid), "-D", str(d), "--track", "none", "--kill", check=True)
    return d / "layer-0001.ckpt"


def test_every_action_exact_after_a_helper_that_ignores(
    tmp_path: Path, spawn: Callable[..., Target], detached: Callable[[Path], tuple[int, LineChannel]]
) -> None:
    """sigacts: a handler, flags and a mask for most signals, SIG_IGN with a mask for some, SIG_DFL
    for others. Restored by a helper that ignores some of each kind, it reports every action as
    the original did (handlers, flags, masks) and /proc agrees on what is ignored and caught."""
    t = spawn("sigacts", "16", stderr=subprocess.DEVNULL)
    want_acts, want_round = t.cmd("acts"), t.cmd("round")
    want = _status(t.pid)
    layer = _dump_kill(t.pid, tmp_path / "d")
    t.proc.wait(10)
    pid, chan = detached(layer)
    got = _status(pid)
    assert (got["SigIgn"], got["SigCgt"], got["SigBlk"]) == (want["SigIgn"], want["SigCgt"], want["SigBlk"])
    assert chan.cmd("acts") == want_acts
    assert chan.cmd("round").split()[1] == str(int(want_round.split()[1]) + 1)
    usr2 = signal.SIGUSR2  # ignored by the helper, handled by the process: its handler runs
    assert chan.cmd(f"raise {usr2}") == f"caught {usr2} 1"


def test_ignored_actions_kept_and_defaults_given_back(
    tmp_path: Path, spawn: Callable[..., Target], detached: Callable[[Path], tuple[int, LineChannel]]
) -> None:
    """rounds, started with SIGHUP, SIGTERM and SIGWINCH ignored as execve leaves them (no call
    needed where the helper ignores them too) and everything else at SIG_DFL but its SIGUSR2
    handler: restored by a helper that ignores SIGALRM, SIGXCPU, SIGIO, two real-time signals and
    SIGUSR2, it has the original's actions, as a dump of it says, and its memory."""
    t = spawn("rounds", "16", stderr=subprocess.DEVNULL, preexec_fn=_ignoring(IGNORED_BY_TARGET))
    t.cmd("round")
    want_sum = t.sum()
    want = _status(t.pid)
    layer = _dump_kill(t.pid, tmp_path / "a")
    t.proc.wait(10)
    pid, chan = detached(layer)
    got = _status(pid)
    assert (got["SigIgn"], got["SigCgt"]) == (want["SigIgn"], want["SigCgt"])
    assert chan.cmd("sum") == f"sum {want_sum}"
    run_ckpt("dump", "--pid", str(pid), "-D", str(tmp_path / "b"), "--track", "none", check=True)
    with open_layer(layer) as a, open_layer(tmp_path / "b" / "layer-0001.ckpt") as b:
        assert a.top.sigactions == b.top.sigactions
        ign = {s.sig for s in a.top.sigactions if s.handler == 1}
        assert ign == set(IGNORED_BY_TARGET)
    assert chan.cmd("round").startswith("round 2 ")


def test_helper_ignored_reads_a_fresh_process(spawn: Callable[..., Target]) -> None:
    """A process whose actions are execve's (`sleep`, which sets none): its ignored set is read;
    one with a handler (rounds: SIGUSR2) is refused."""
    # Popen returns once the child has exec'd (its error pipe closes on exec).
    p = subprocess.Popen(["sleep", "60"], preexec_fn=_ignoring((signal.SIGHUP, signal.SIGALRM)))
    try:
        assert helper_ignored(p.pid) == (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGALRM - 1))
    finally:
        p.kill()
        p.wait()
    t = spawn("rounds", "4", stderr=subprocess.DEVNULL)
    assert helper_ignored(t.pid) is None


def test_to_set() -> None:
    """Only actions that differ from execve's (SIG_DFL, or SIG_IGN where ignored, nothing else set)."""

    def rec(sig: int, handler: int = 0, flags: int = 0, restorer: int = 0, mask: int = 0) -> SigactionRecord:
        return SigactionRecord(sig, handler, flags, restorer, mask)

    ign = 1 << (signal.SIGHUP - 1)
    acts = [
        rec(signal.SIGHUP, 1),  # ignored in both: skipped
        rec(signal.SIGINT),  # default in both: skipped
        rec(signal.SIGQUIT, 1),  # ignored by the process only
        rec(signal.SIGHUP + 0, 1, flags=0x10000000),  # flags differ
        rec(signal.SIGTERM, 0, mask=2),  # a mask
        rec(signal.SIGUSR1, 0x401000, flags=0x04000000, restorer=0x401100),  # a handler
        rec(signal.SIGALRM, 0, restorer=0x401100),
    ]
    assert to_set(acts, ign) == acts[2:]
    # SIGINT ignored by the helper must go back to SIG_DFL
    assert to_set(acts, ign | 1 << (signal.SIGINT - 1)) == [acts[1], *acts[2:]]
    assert to_set(acts, None) == acts
