"""The throttle's guard: a tiny process that outlives a `ckpt migrate` killed by SIGKILL (or any
death that runs no cleanup) and gives the throttled target back what the throttle took.

--auto-converge moves the target into a cgroup of its own with a CPU quota, or stops and continues
it by signals (ckpt/migrate/cgthrottle.py, ckpt/migrate/throttle.py). ckpt undoes that on every
path it lives through; a SIGKILL leaves nothing of ckpt to do it: the target would stay limited,
or, in the duty cycle, stopped forever. So before it throttles anything, ckpt starts this guard
(`sys.executable -I -S` on this file: no site, no ckpt imports, ~10 ms) and keeps it told, over a
pipe, of what there is to undo. The guard sleeps in poll() on that pipe and on a pidfd of ckpt:
woken by the event, never by a timer.

- ckpt ends cleanly: it sends "done" and the guard exits doing nothing.
- ckpt dies: the pidfd becomes readable (the kernel has already detached ckpt's tracees by then),
  the guard reads what was said before the death (it is all in the pipe) and undoes it: every
  process of the throttle cgroup back into the cgroup it came from, `-cpu` where ckpt had enabled
  it, the cgroup removed; SIGCONT where the duty cycle may have stopped the target.

Messages are JSON lines, each below PIPE_BUF (written whole):
    {"cg": CHILD, "home": HOME, "enabled": BOOL}  before the cgroup is made (undo is harmless
                                                   where it was not made yet)
    {"cg": null}                                   after it is gone
    {"stop": [PIDS]}                               the duty cycle runs (it may stop them)
    {"stop": []}                                   it no longer does (its own stop undone)
    {"done": true}

The duty cycle is reported as running only while its thread runs: after the final dump the target
is stopped for the handover, and a SIGCONT then could let two copies run; the guard leaves that
stop alone as ckpt does.

The guard runs in a session of its own and ignores the signals a terminal or a supervisor sends to
ckpt's group, so that what kills ckpt does not kill it too. Where it dies as well (a SIGKILL to
both), the next `ckpt migrate` removes the orphan: cgthrottle.reap_orphans."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
from typing import Any


class Guard:
    """ckpt's side: starts the guard and tells it what to undo."""

    def __init__(self) -> None:
        import subprocess  # (not in the guard itself: its start is kept short)

        r, self._w = os.pipe()
        me = os.pidfd_open(os.getpid())
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, str(r), str(me)],
                pass_fds=(r, me),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            os.close(self._w)
            raise
        finally:
            os.close(r)
            os.close(me)
        self.closed = False

    def tell(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        with contextlib.suppress(OSError):  # a guard that is gone cannot help: ckpt goes on
            os.write(self._w, (json.dumps(msg) + "\n").encode())

    def close(self) -> None:
        """Nothing is left to undo: the guard exits doing nothing. Safe to call again. Not waited
        for (its start may still be under way on a loaded machine: ~0.2 s): it ends by itself."""
        if self.closed:
            return
        self.tell({"done": True})
        self.closed = True
        os.close(self._w)
        self.proc.poll()


def _write(path: str, s: str) -> None:
    with open(path, "w") as f:
        f.write(s)


def undo(state: dict[str, Any]) -> None:
    """What the guard does when ckpt died: the throttle lifted from the target."""
    for pid in state.get("stop") or []:
        with contextlib.suppress(OSError):
            os.kill(int(pid), signal.SIGCONT)
    child, home = state.get("cg"), state.get("home")
    if not child or not home:
        return
    if state.get("enabled"):
        with contextlib.suppress(OSError):
            _write(os.path.join(home, "cgroup.subtree_control"), "-cpu")
    for _ in range(100):  # also what the target forked meanwhile; bounded, as in CpuMax.close
        try:
            with open(os.path.join(child, "cgroup.procs")) as f:
                left = f.read().split()
        except OSError:
            break
        if not left:
            break
        for p in left:
            with contextlib.suppress(OSError):
                _write(os.path.join(home, "cgroup.procs"), p)
    with contextlib.suppress(OSError):
        os.rmdir(child)


def serve(rfd: int, pidfd: int) -> int:
    """The guard's loop: 0 when told "done", 1 when it undid the throttle of a dead ckpt."""
    state: dict[str, Any] = {}
    buf = b""
    p = select.poll()
    p.register(rfd, select.POLLIN)
    p.register(pidfd, select.POLLIN)
    closed = dead = False
    while not (closed and dead):
        # No timeout: a message, or ckpt's death (its pipe end closes, then its pidfd fires).
        events = dict(p.poll())
        if pidfd in events:
            # Exited, its tracees detached. What it said is all in the pipe (a process it forked
            # could still hold the write end open: read without blocking).
            dead = True
            os.set_blocking(rfd, False)
            p.unregister(pidfd)
        while not closed:
            try:
                chunk = os.read(rfd, 65536)
            except BlockingIOError:
                chunk = b""
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError, AttributeError):
                    msg = json.loads(line)
                    if msg.get("done"):
                        return 0
                    state.update(msg)
            if chunk == b"":
                closed = True  # ckpt is exiting; wait for its exit to finish before acting
                p.unregister(rfd)
            elif not dead:
                break  # one read per wake-up while ckpt lives; once dead, drain
    undo(state)
    return 1


def main(argv: list[str]) -> int:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
    return serve(int(argv[1]), int(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
