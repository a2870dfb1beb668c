"""Error paths of restore/pidns.py's PidNamespace.make that a real restore does not reach: what a
failure leaves behind in ckpt (a `ckpt serve` runs restore after restore)."""

from __future__ import annotations

import contextlib
import os

import pytest

from ckpt.errors import RestoreError
from ckpt.restore import pidns
from ckpt.restore.remote import Remote
from ckpt.restore.resume import in_tracer_thread


def _links() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, gone by now
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def test_a_failed_init_setup_leaves_no_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The init's fds cannot be closed (the kernel's refusal stood in for by ckpt's own check): one
    RestoreError, and neither the init's /proc/PID/mem fd nor the init itself is left."""
    real = Remote.check
    inits: list[int] = []

    def check(self: Remote, what: str, nr: int, *args: int) -> int:
        if what == "closing the init's fds":
            inits.append(self.pid)
            raise RestoreError(f"{what} failed in the restored process: test")
        return real(self, what, nr, *args)

    monkeypatch.setattr(Remote, "check", check)
    with pytest.raises(RestoreError, match="closing the init's fds"):
        in_tracer_thread(pidns.PidNamespace.make)
    assert len(inits) == 1 and not pidns._couriers
    assert f"/proc/{inits[0]}/mem" not in _links()
