"""Many syscalls in the restore helper in one run (CRIU's restorer blob), not one ptrace round trip each.

Remote.syscall single-steps one `syscall` per call: setregs, a step, a wait for the stop, getregs,
~130-200 µs each on these machines (more under load). The final step of a restore made ~60 of them
for signal actions alone (rt_sigaction for every signal), ~8 ms of a migration's downtime. Here a
list of calls is assembled into code (ckpt/ptrace/batch.py, the dump side's blob: each call's
registers, `syscall`, its result stored) that the helper runs under PTRACE_CONT, ending with a
real-time signal it sends itself; the tracer sees that signal-delivery-stop and the next step
resumes with signal 0, which drops it. The helper is ours, so no register or memory of it needs
putting back:
- the code goes into the restore's own page (the gadget page, read-write-execute, whose first bytes
  hold the `syscall` that Remote.syscall steps), after that instruction;
- results and argument buffers go into the scratch pages after it (Remote.put's area: nothing lives
  there between two calls);
- the end signal is one the helper does not block (its mask is its own until the very last step,
  load_thread); a ptraced task stops for a signal even when its action is to ignore it, and the
  stop comes before any handler runs. If the real-time queue is full, the blob falls back to SIGSTOP,
  recognised by where it stops.
Every call runs, even after one fails: only calls whose failure ends the restore (the helper is
killed then) and that touch nothing outside the helper belong in a blob.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import weakref
from collections.abc import Sequence

from ckpt.errors import RestoreError
from ckpt.ptrace import batch as bt
from ckpt.ptrace import raw
from ckpt.ptrace.regs import MASK64, ptrace_registers_t
from ckpt.restore.pidns import inner
from ckpt.restore.remote import MAX_STOPS, STEP_TIMEOUT, Remote

CODE_AT = 16  # bytes into the gadget page: after its `syscall` instruction
PAGE_SIZE = 4096
_own_pids: weakref.WeakKeyDictionary[Remote, int] = weakref.WeakKeyDictionary()


def _runs(calls: Sequence[bt.Call], code_room: int, data_room: int) -> list[list[bt.Call]]:
    """`calls` cut into runs whose code and data fit the rooms."""
    out: list[list[bt.Call]] = []
    cur: list[bt.Call] = []
    size = 0  # bt.data_size(cur), kept as it grows (summed again per call, ~60 signals' actions
    # made it quadratic: ~8% of a small restore's tracer time)
    for c in calls:
        need = bt.data_size([c])
        if cur and (bt.code_size(len(cur) + 1) > code_room or size + need > data_room):
            out.append(cur)
            cur, size = [], 0
        if bt.code_size(1) > code_room or need > data_room:
            raise RestoreError("internal: a syscall's arguments do not fit the restore's scratch area")
        cur.append(c)
        size += need
    if cur:
        out.append(cur)
    return out


def run(remote: Remote, calls: Sequence[bt.Call]) -> list[bt.Result]:
    """Run `calls` in the helper, in order; their results. One by one (Remote.syscall) where no
    blob can run: before the gadget page is in place, or with every real-time signal blocked."""
    if not calls:
        return []
    sig = bt.pick_signal(raw.getsigmask(remote.pid)) if remote.scratch else None
    if sig is None:
        return [_one(remote, c) for c in calls]
    code_at = remote.site + CODE_AT
    room = remote.site + PAGE_SIZE - code_at
    out: list[bt.Result] = []
    for part in _runs(calls, room, remote.scratch_size):
        out.extend(_run_once(remote, _local(part, len(out), out), code_at, sig))
    return out


def _local(part: list[bt.Call], first: int, done: list[bt.Result]) -> list[bt.Call]:
    """`part` (calls first.. of the caller's list) with its Refs made right for a run of its own: to a
    call of the same run by its place in the run, to one of an earlier run by the result it gave."""

    def local(a: int | bt.Ref) -> int | bt.Ref:
        if not isinstance(a, bt.Ref):
            return a
        return bt.Ref(a.index - first) if a.index >= first else done[a.index].ret

    return [
        dataclasses.replace(c, args=tuple(local(a) for a in c.args))
        if any(isinstance(a, bt.Ref) for a in c.args)
        else c
        for c in part
    ]


def check_all(remote: Remote, calls: Sequence[tuple[str, bt.Call]]) -> list[int]:
    """run(), raising RestoreError naming the first call that failed (as Remote.check does)."""
    got = run(remote, [c for _, c in calls])
    for (what, _), r in zip(calls, got, strict=True):
        check_ret(what, r.ret)
    return [r.ret for r in got]


def check_ret(what: str, ret: int) -> None:
    """RestoreError naming `what` if `ret` is an error (-errno), as Remote.check says it."""
    if -4095 <= ret < 0:
        raise RestoreError(
            f"{what} failed in the restored process: {os.strerror(-ret)} ({errno.errorcode.get(-ret, -ret)})"
        )


def _one(remote: Remote, c: bt.Call) -> bt.Result:
    args = list(c.args)
    if any(isinstance(a, bt.Ref) for a in args):
        raise RestoreError("internal: a call that uses an earlier result needs a blob")
    if c.buf:
        args += [0] * (c.out_arg + 1 - len(args))
        args[c.out_arg] = remote.put(c.inp.ljust(c.buf, b"\0"))
    ret = remote.syscall(c.nr, *(int(a) for a in args))  # type: ignore[arg-type]
    return bt.Result(ret, remote.read(args[c.out_arg], c.out) if c.out else b"")  # type: ignore[arg-type]


def _own_pid(remote: Remote) -> int:
    """The helper's pid as its own namespace numbers it: read from /proc once per helper (it never
    changes), not on every blob run."""
    me = _own_pids.get(remote)
    if me is None:
        me = _own_pids[remote] = inner(remote.pid)
    return me


def _run_once(remote: Remote, calls: list[bt.Call], code_at: int, sig: int) -> list[bt.Result]:
    pid = remote.pid
    data_at = remote.scratch
    me = _own_pid(remote)  # the blob's signal to itself names it as its pid namespace does (--pidns)
    blob = bt.assemble(calls, code_at, data_at, me, me, sig)
    size = bt.data_size(calls)
    image = bytearray(size)
    for addr, data in bt.inputs(calls, data_at):
        image[addr - data_at : addr - data_at + len(data)] = data
    remote.write(code_at, blob.code)
    remote.write(data_at, bytes(image))
    regs = ptrace_registers_t.from_buffer_copy(raw.getregs(pid))
    regs.rip, regs.orig_rax = blob.at, MASK64
    try:
        raw.setregs(pid, regs)
        _wait_end(pid, blob, sig, me, remote.shared_sigchld)
    except ProcessLookupError:
        raise RestoreError(f"the restore helper {pid} died (killed from outside?)") from None
    remote.count += len(calls)
    return bt.parse(calls, remote.read(data_at, size))


def _wait_end(pid: int, blob: bt.Blob, sig: int, me: int, shared: bool | None = None) -> None:
    """Let the helper run the blob until it stops at its end. Any other stop (someone's signal to
    our process group, an interrupt) is dropped, as Remote._step does: the helper is not yet the
    restored process, so nothing it was meant to receive is lost."""
    for _ in range(MAX_STOPS):
        raw.cont(pid)
        w = raw.wait(pid, STEP_TIMEOUT, shared=shared)
        if w is None:  # (the caller's failure path kills the helper)
            raise RestoreError(f"injected code in the restore helper {pid} did not return")
        if w.exited:
            raise RestoreError(f"the restore helper {pid} died during the restore")
        if not w.is_signal_stop:
            continue
        rip = raw.getregs(pid).rip
        if rip == blob.done_rip and bt.is_ours(raw.getsiginfo(pid), sig, me):
            return  # the next resume passes signal 0: the blob's signal goes with this stop
        if rip == blob.stop_rip and w.sig == signal.SIGSTOP:
            return
    raise RestoreError(f"the restore helper {pid} kept stopping for other reasons ({MAX_STOPS} stops)")
