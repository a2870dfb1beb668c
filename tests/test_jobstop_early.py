"""Restored job-control stops, two corner cases (ckpt/restore/jobstop.py).

A thread's own pending signal is taken before the restored stop whatever its number
(ckpt/restore/jobstop.py early_signals): the kernel dequeues a thread's private queue before the
shared one, where the stop signal is. The restore says so. And `--detach` judges whether the
group is orphaned as it will be once ckpt has exited."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ckpt.image import Layer
from ckpt.ptrace import raw
from tests.test_jobstop import (  # noqa: F401
    ENV,
    WAIT,
    ApiRestore,
    _dump,
    _killed,
    _states,
    _stopped,
    _stopped_original,
    _target,
    api_restore,
)
from tests.util import ROOT, LineChannel, Target


def test_a_private_signal_above_the_stop_is_warned(
    tmp_path: Path,
    spawn: Callable[..., Target],
    api_restore: Callable[..., ApiRestore],  # noqa: F811
) -> None:
    t = spawn("rtsignals", process_group=0)
    assert t.cmd("count").startswith("rtmax 0 ")
    os.kill(t.pid, signal.SIGSTOP)
    assert _stopped_original(t) == signal.SIGSTOP
    rtmax = signal.SIGRTMAX
    raw.tgkill(t.pid, t.pid, rtmax)  # to the main thread alone: its own queue
    layer = _dump(t.pid, tmp_path / "d", "--kill")
    _killed(t)
    task = Layer.open(layer).task
    assert task.stop == signal.SIGSTOP
    assert [(p.sig, p.shared) for p in task.pending] == [(rtmax, False)]
    r = api_restore(layer, process_group=0)
    assert r.info["stopped"] == signal.SIGSTOP
    assert any("takes its pending SIGRTMAX before it stops again" in w for w in r.info["warnings"]), r.info
    os.kill(r.pid, signal.SIGCONT)
    assert r.told() == {"continued": True}
    assert r.cmd("count").startswith("rtmax 1 ")


def test_detach_judges_the_group_as_ckpt_exit_leaves_it(
    tmp_path: Path, spawn: Callable[..., Target], subreaper: list[int]
) -> None:
    """`ckpt restore --detach` of a process dumped in a SIGTSTP stop, in ckpt's own group: once ckpt
    exits that group is orphaned (the kernel would discard a SIGTSTP not yet taken), so SIGSTOP is
    sent, and said. (This test, a subreaper of the session, adopts it: it stays stopped.)"""
    t = _target(spawn, 5)
    assert t.cmd(f"stop {int(signal.SIGTSTP)}") == "stopping"
    assert _stopped_original(t) == signal.SIGTSTP
    layer = _dump(t.pid, tmp_path / "d", "--kill")
    _killed(t)
    p = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "restore", str(layer), "--detach"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=ENV, cwd=ROOT, bufsize=0, process_group=0,
    )  # fmt: skip
    try:
        chan = LineChannel(p, WAIT)
        pid = int(chan.readline())
        subreaper.append(pid)
        assert p.wait(WAIT) == 0
        assert p.stderr is not None
        err = p.stderr.read().decode()
        assert "is stopped with SIGSTOP, not SIGTSTP as dumped" in err, err
        assert f"process {pid} left stopped (SIGSTOP), as it was dumped" in err, err
        # Ours since ckpt exited (the subreaper): its stop's report, which ckpt never took, with it.
        assert _stopped(pid) == signal.SIGSTOP
        assert _states(pid) == {"T"}
        os.kill(pid, signal.SIGCONT)
        assert chan.readline() == "resumed conts 1 value 5"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
        for f in (p.stdin, p.stdout, p.stderr):
            if f:
                f.close()
