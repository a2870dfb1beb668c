"""The destination's last restore step on one CPU (ckpt/migrate/pin.py): the helper is pinned to its
tracer's CPU for `complete`, and every thread of the copy still comes back with the affinity it had
(all CPUs, or the one set). Real processes, real sockets."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from ckpt.migrate import pin
from tests.test_migrate import ENV, ROOT, Server, _ckpt, server
from tests.test_migrate_boost import _tids
from tests.util import Target

__all__ = ["server"]  # the fixture, used by name


def _migrate(t: Target, s: Server) -> int:
    m = subprocess.run(
        _ckpt("migrate", "--pid", str(t.pid), "--to", s.addr, "--policy", "rounds:1", "--json"),
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV,
    )  # fmt: skip
    assert m.returncode == 0, m.stderr
    assert '"warm": true' in m.stdout  # the warm restore ran its `complete`, where the pin is
    return s.done()


@pytest.mark.parametrize("narrow", [False, True])
def test_the_copy_keeps_every_threads_affinity(
    spawn: Callable[..., Target], server: Callable[..., Server], narrow: bool
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: a pin changes nothing to see")
    t = spawn("cpuhog", stderr=subprocess.DEVNULL)  # two threads
    tids = _tids(t.pid)
    if narrow:  # each thread on another CPU: neither is the tracer's for sure
        for tid, cpu in zip(tids, (cpus[-1], cpus[0]), strict=True):
            os.sched_setaffinity(tid, {cpu})
    want = [os.sched_getaffinity(tid) for tid in tids]
    copy = _migrate(t, server())
    assert [os.sched_getaffinity(tid) for tid in _tids(copy)] == want


def test_pinned_only_where_every_thread_gets_its_affinity_back() -> None:
    """A layer without scheduling records (format 1) would leave the pin on: not pinned then."""

    class T:
        def __init__(self, props: object) -> None:
            self.props = props

    class P:
        affinity = [0, 1]

    class NoAff:
        affinity: list[int] = []

    class Plan:
        thread = T(P())
        threads = [T(P())]

    assert pin.given_back(Plan())  # type: ignore[arg-type]
    Plan.threads = [T(None)]
    assert not pin.given_back(Plan())  # type: ignore[arg-type]
    Plan.threads = [T(NoAff())]
    assert not pin.given_back(Plan())  # type: ignore[arg-type]
