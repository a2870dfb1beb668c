"""A thread's own pending signal is taken before the restored stop whatever its number
(ckpt/restore/jobstop.py early_signals): the kernel dequeues a thread's private queue before the
shared one, where the stop signal is. The restore says so."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from ckpt.image import Layer
from ckpt.ptrace import raw
from tests.test_jobstop import ApiRestore, _dump, _killed, _stopped_original, api_restore  # noqa: F401
from tests.util import Target


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
