"""The migration's guard: a tiny process that outlives a `ckpt migrate` killed by SIGKILL (or any
death that runs no cleanup) and leaves exactly one copy of the process running, and the target
with nothing of ckpt's left on it that it can take back.

ckpt undoes what it did on every path it lives through. A SIGKILL (the OOM killer, a supervisor's
last resort, `kill -9` of a process group) leaves nothing of ckpt to do it: the target would stay
in its throttle cgroup or, in the duty cycle, stopped; and, from the final round on, stopped for
the hand-over forever, while the destination, seeing the connection close before its COMMIT,
kills its held copy: no copy would run. So every single-process migration starts this guard
(`sys.executable -I -S` on this file: no site, no ckpt imports) before its first round, and keeps
it told, over a pipe, where the migration is. The guard holds a pidfd of each target (opened by ckpt
before the guard starts and passed to it: a recycled pid is never signalled), a pidfd of ckpt, and
a duplicate of the migration's socket. It sleeps in poll() on the pipe and on ckpt's pidfd: woken
by the event, never by a timer.

- ckpt ends (success or a failure it handled): it sends "done", the guard exits doing nothing,
  and ckpt reaps it (`close`: no guard outlives a ckpt that ended by itself).
- ckpt dies: the pidfd becomes readable (the kernel has already detached ckpt's tracees by then),
  the guard reads what was said before the death (it is all in the pipe) and acts on the last
  phase (below); then it lifts the throttle (every process of the throttle cgroup back into the
  cgroup it came from, `-cpu` where ckpt had enabled it, the cgroup removed), removes the source's
  staging copy of the chain (/dev/shm/ckpt-migrate-*: memory, which a killed ckpt would leave to
  the machine for good) and exits, which closes its duplicate of the socket: the destination sees
  the connection end then, not before.

The phases, each told before the state it names can begin:
    (none)            the live rounds: the target runs (tracked); only the duty cycle's SIGSTOP,
                      while it runs ({"stop": [PIDS]}), is undone with SIGCONT
    handover          the final round may stop the target (the freeze, then SIGSTOP until the
                      destination answers): SIGCONT of the stops that are ckpt's (below). No COMMIT
                      was sent, so the destination's copy, held stopped, is killed there when the
                      connection ends.
    commit, MARK      COMMIT is being sent; MARK is the count of bytes written into the socket just
                      before it. The socket tells which side of the send ckpt died on: none
                      written beyond MARK means the COMMIT never left: SIGCONT, and the copy is
                      killed at the destination. More, all acknowledged by the destination's
                      kernel (nothing left in the send queue), means the copy will run: the
                      original is killed (SIGKILL). More, some not acknowledged (the connection
                      reset, or ckpt died a moment after the send): the destination may or may
                      not have it, so the original is left stopped, as ckpt leaves it when the
                      COMMIT left and no answer came.
    committed         the COMMIT was written whole: the copy runs (or will); SIGKILL of the
                      original (killed already, or stopped since the final freeze: it did nothing).
    let-go            ckpt decided the original runs on (a failure before the commit, or the
                      destination said its copy is gone): SIGCONT of the stops that are ckpt's.
    hold              ckpt decided to keep the original stopped (COMMIT left, no answer: the copy
                      may run; its message says kill -9 or kill -CONT): left as it is.

SIGCONT goes only to a stop that ckpt made, one process's as a tree's: those the final dump's thaw
stops with ckpt's SIGSTOP ({"ckpt_stopped": [PIDS]}, told before it: ckpt.ptrace.freeze.thaw_all)
and the duty cycle's ({"stop": [PIDS]}); and of those not one with a stop signal pending
(`stopped_by_another`: someone else stopped it again meanwhile, and the SIGCONT would discard
that). A process someone else stopped (a shell's job control, a debugger) stays stopped.

Messages are JSON lines, each below PIPE_BUF (written whole):
    {"cg": CHILD, "home": HOME, "enabled": BOOL}  before the throttle cgroup is made (a quota's or
                                                   the freezer's: thawed first when undone)
    {"cg": null}                                   after it is gone
    {"stop": [PIDS]} / {"stop": []}                the duty cycle runs / no longer does
    {"phase": NAME, "mark": N}                     the hand-over's phase (above)
    {"sched": [[TID, POLICY, SLACK], ...]} / {"sched": []}  the target's threads raised for the final
                                                   seize (targetboost.py) / given back
    {"members": [[PID, START], ...]}               the targets are exactly these (a tree as dumped),
                                                   with those of {"members_more": [...]} before it
    {"targets": [[PID, START], ...]}               more targets (a process tree's members, known
                                                   only once walked): the guard opens their pidfds
                                                   itself and keeps each whose start time (field
                                                   22 of /proc/PID/stat) is START: a pid reused
                                                   before the open is never taken for one
    {"tcp": [PID, LOCK, [INODE, ...], [INODE, ...]]}  --tcp-established: before the final dump
                                                   locks and puts PID's sockets in repair mode (added
                                                   to); the last list: those with SO_REUSEADDR on
    {"tcp_records": PATH}                          the stash of their records (before READY)
    {"tcp_moved": CMD} / {"tcp_moved": null}       --on-commit ran (CMD: --on-abort) / moved back
                                                   (a CMD too long for one message is refused
                                                   before the migration: tcpmove.check_on_abort)
    {"tree": ROOT}                                 a tree's migration: continuing it, the guard
                                                   walks ROOT's descendants again (`descendants`)
    {"ckpt_stopped": [PIDS]}                       the processes that the final dump's thaw stops
                                                   (added to): continuing, only these get SIGCONT
                                                   (and the duty cycle's), never one someone else
                                                   stopped
    {"done": true}

With TCP connections (guardtcp.py, ckpt's code in an interpreter of its own, only after a death):
continued, the original first gets them back (repair mode off, or connected again from the stash
where the commit's let-go had disconnected them, --on-abort first), the lock lifted; killed after
the COMMIT, the lock is lifted once the destination has ended the connection (on one machine its
copy's restore lifts the shared lock itself, and lifted before that a packet of the peer meeting no
socket would be answered by a reset); held: left as they are.

The guard runs in a session of its own and ignores the signals a terminal or a supervisor sends to
ckpt's group, so that what kills ckpt does not kill it too. Where it dies as well (a SIGKILL to
both), the next `ckpt migrate` removes an orphaned throttle cgroup (cgthrottle.reap_orphans); an
original stopped for the hand-over then needs `kill -CONT` by hand."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

MAX_WALK = 4096  # processes a tree's walk takes at most (ckpt refuses trees of more: image/tree.py)
TCP_WAIT = 150.0  # s: bounds the TCP work after a death (an --on-abort hook's 60 s; RUNNING's 60 s)
CLOSE_WAIT = 10.0  # s a clean end waits for the guard to exit (its start under load: ~0.2 s)
TIOCOUTQ = 0x5411  # (SIOCOUTQ) bytes written into a TCP socket and not yet acknowledged
TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in struct tcp_info (Linux >= 4.1)


def written(fd: int) -> int:
    """Bytes written into TCP socket `fd` since it connected: those the peer acknowledged (the
    count starts at 1, for the SYN) plus those still queued. ckpt takes it before the COMMIT and
    the guard after ckpt's death, the same way: only the difference matters."""
    acked, queued = _sent(fd)
    return acked + queued


def _sent(fd: int) -> tuple[int, int]:
    """(bytes the peer acknowledged, bytes still in the send queue) of TCP socket `fd`."""
    import fcntl
    import socket
    import struct

    s = socket.socket(fileno=os.dup(fd))
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        if len(info) < TCPI_BYTES_ACKED + 8:
            raise OSError(f"struct tcp_info of {len(info)} bytes has no tcpi_bytes_acked")
        acked = int(struct.unpack_from("Q", info, TCPI_BYTES_ACKED)[0])
        queued = int(struct.unpack("i", fcntl.ioctl(fd, TIOCOUTQ, b"\0" * 4))[0])
    finally:
        s.close()
    return acked, queued


class Guard:
    """ckpt's side: starts the guard and tells it what to undo. `pids`: the targets, each passed as
    a pidfd; `sock`: the migration's socket (its fd), held by the guard while it decides;
    `staging`: the source's staging directory, removed by the guard if ckpt dies."""

    def __init__(self, pids: Sequence[int] = (), sock: int | None = None, staging: str | None = None) -> None:
        import subprocess  # (not in the guard itself: its start is kept short)

        fds: dict[str, int] = {}
        r, self._w = os.pipe()
        me = os.pidfd_open(os.getpid())
        try:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # gone: nothing to guard
                    fds[str(pid)] = os.pidfd_open(pid)
            args = {"targets": fds, "sock": sock, "staging": staging}
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, str(r), str(me), json.dumps(args)],
                pass_fds=(r, me, *fds.values(), *([sock] if sock is not None else [])),
                # Not ckpt's stdout/stderr: a caller reading them to their end would wait for a
                # guard that outlives a killed ckpt (it writes nothing anyway).
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            os.close(self._w)
            raise
        finally:
            for fd in (r, me, *fds.values()):
                os.close(fd)
        self.sock = sock
        self.closed = False

    def tell(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        with contextlib.suppress(OSError):  # a guard that is gone cannot help: ckpt goes on
            os.write(self._w, line(msg))

    def add(self, pids: Sequence[int]) -> None:
        """More targets (a tree's members), told with their start times (see `targets`)."""
        known = [[p, st] for p in pids if (st := start_time(p)) is not None]
        for i in range(0, len(known), 100):  # (each message below PIPE_BUF)
            self.tell({"targets": known[i : i + 100]})

    def members(self, known: Sequence[tuple[int, int]]) -> None:
        """The targets are exactly these from now on (a tree as dumped; the root among them), each
        with its start time as the dump read it in its freeze: nothing is read here, in the
        downtime (the guard checks each after its own pidfd_open, off ckpt's path). Each message
        below PIPE_BUF: all but the last only gathered by the guard, the last applies them all."""
        pairs = [[p, st] for p, st in known]
        for i in range(0, len(pairs) - 100, 100):
            self.tell({"members_more": pairs[i : i + 100]})
        self.tell({"members": pairs[max(len(pairs) - 1, 0) // 100 * 100 :]})

    def stopped(self, pids: Sequence[int]) -> None:
        """The processes (one, or a tree's) the final dump's thaw stops with ckpt's SIGSTOP (added
        to): continuing, the guard sends SIGCONT to these only (and the duty cycle's), not to one in
        a stop of someone else's."""
        for i in range(0, len(pids), 100):  # (each message below PIPE_BUF)
            self.tell({"ckpt_stopped": list(pids[i : i + 100])})

    def phase(self, name: str) -> None:
        """The hand-over's phase (the module's doc). "commit" carries the socket's mark itself."""
        if name == "commit" and self.sock is not None:
            try:
                self.tell({"phase": name, "mark": written(self.sock)})
                return
            except OSError:
                pass  # no count: the guard treats the send as unknown (below)
        self.tell({"phase": name})

    def close(self) -> None:
        """Nothing is left to undo: the guard exits doing nothing, and is reaped here, so that ckpt
        leaves no process behind it (a subreaper above ckpt would otherwise inherit a guard still
        starting). Woken by its exit (a pidfd), bounded: one still not gone after CLOSE_WAIT s is
        killed, having nothing left to do. Safe to call again."""
        if self.closed:
            return
        self.tell({"done": True})
        self.closed = True
        os.close(self._w)
        try:
            fd = os.pidfd_open(self.proc.pid)
        except OSError:  # (reaped already)
            fd = -1
        if fd >= 0:
            try:
                p = select.poll()
                p.register(fd, select.POLLIN)
                if not p.poll(int(CLOSE_WAIT * 1000)):
                    self.proc.kill()
            finally:
                os.close(fd)
        self.proc.wait()


def line(msg: dict[str, Any]) -> bytes:
    """A message as written to the guard: whole only up to select.PIPE_BUF bytes (a longer write
    may interleave with another thread's, and the guard then drops both lines)."""
    return (json.dumps(msg) + "\n").encode()


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): with the pid, who it is."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _only(targets: dict[str, int], known: Any) -> None:
    """The targets become exactly the processes named (a tree's members as dumped): a process that
    left the tree since the first walk (a daemon's double fork) is not the migration's."""
    names = {str(e[0]) for e in known if isinstance(e, list) and e} if isinstance(known, list) else set()
    for pid in [p for p in targets if p not in names]:
        os.close(targets.pop(pid))
    _adopt(targets, known)


def _adopt(targets: dict[str, int], known: Any) -> None:
    """pidfds of the processes ckpt named, each checked against its start time after the open."""
    for pid, start in known if isinstance(known, list) else []:
        if not isinstance(pid, int) or str(pid) in targets:
            continue
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        if start_time(pid) == start:
            targets[str(pid)] = fd
        else:
            os.close(fd)


def descendants(targets: dict[str, int], root: int) -> None:
    """Every process below `root` now, added to the targets by pidfd. A pid read from a children
    file is taken only if, after its pidfd is open, its parent is still the one read (alive, by its
    own pidfd, after the read: its pid not reused meanwhile), so a reused pid is never taken."""
    todo, seen = [root], {root}
    while todo and len(targets) < MAX_WALK:
        parent = todo.pop()
        pfd = targets.get(str(parent))
        if pfd is None:
            continue
        kids: list[int] = []
        with contextlib.suppress(OSError, ValueError):
            for tid in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids += [int(k) for k in f.read().split()]
        for k in kids:
            if k in seen:
                continue
            seen.add(k)
            if str(k) not in targets:
                try:
                    fd = os.pidfd_open(k)
                except OSError:
                    continue
                if _ppid(k) != parent or not _alive(pfd):
                    os.close(fd)
                    continue
                targets[str(k)] = fd
            todo.append(k)


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except OSError:
        return False
    return True


def _write(path: str, s: str) -> None:
    with open(path, "w") as f:
        f.write(s)


def _signal(targets: dict[str, int], pids: Collection[int] | None, sig: int) -> None:
    """`sig` by pidfd to the targets (those of `pids` only, where given): never a recycled pid."""
    for pid, fd in targets.items():
        if pids is None or int(pid) in pids:
            with contextlib.suppress(OSError):  # exited: nothing to do
                signal.pidfd_send_signal(fd, sig)


def _committed(state: dict[str, Any], sock: int | None) -> bool | None:
    """Whether the COMMIT left; None where it cannot be told (no mark, no socket)."""
    phase = state.get("phase")
    if phase == "committed":
        return True
    if phase != "commit":
        return False
    mark = state.get("mark")
    if not isinstance(mark, int) or sock is None:
        return None
    try:
        acked, queued = _sent(sock)
    except OSError:
        return None
    if acked + queued <= mark:
        return False  # not a byte of the COMMIT left ckpt: the destination cannot commit
    if queued == 0:
        return True  # all of it acknowledged by the destination's kernel: it commits
    # Queued, not all acknowledged (the connection reset, or ckpt died a moment after the send):
    # the destination may or may not have it. Neither kill nor continue: kept stopped, as ckpt
    # itself keeps it when the COMMIT left and no answer came.
    return None


def decide(
    state: dict[str, Any],
    targets: dict[str, int],
    sock: int | None,
    before_cont: Callable[[], None] | None = None,
) -> str:
    """What the guard does with the original when ckpt died: one copy, running. `before_cont`:
    what must be given back to the original before it is continued (its TCP connections)."""
    phase = state.get("phase")
    if phase == "hold":
        return "held"
    committed = _committed(state, sock)
    if committed:
        _signal(targets, None, signal.SIGKILL)
        return "killed"
    if committed is None:
        return "held"  # (the COMMIT's fate unknown: as ckpt does, kept stopped for a person)
    duty = _pids(state.get("stop"))  # the duty cycle's own SIGSTOP may be in effect
    if phase in ("handover", "commit", "let-go"):
        if isinstance(state.get("tree"), int):
            # A process forked since the first walk, stopped by a tree dump that ckpt died inside,
            # is known to no message yet: the tree is walked again now, from the root's pidfd.
            descendants(targets, state["tree"])
        # Only the stops that are ckpt's: those the final dump's thaw made (told before its
        # SIGSTOP), and the duty cycle's. One stopped by someone else (a shell's job control, a
        # debugger) stays stopped. None told: the dump stopped none yet (its freeze is a
        # ptrace-stop, which ckpt's death ended).
        ours = _pids(state.get("ckpt_stopped")) | duty
        if before_cont is not None:
            with contextlib.suppress(Exception):  # (whatever it says: the original runs on)
                before_cont()
        continue_ours(targets, ours)
        return "continued"
    continue_ours(targets, duty)
    return "throttle"


def _pids(v: Any) -> set[int]:
    return {p for p in v if isinstance(p, int) and not isinstance(p, bool)} if isinstance(v, list) else set()


# SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU as bits of /proc/PID/status's signal masks
STOP_BITS = sum(1 << (s - 1) for s in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU))


def stopped_by_another(pid: int) -> bool:
    """Whether process `pid`, in a job-control stop (state T), has a stop signal pending: sent while
    it was stopped (the stop signal that stopped it was taken by then), so not the stop ckpt made,
    and discarded by the SIGCONT that would end ckpt's (the kernel's prepare_signal flushes pending
    stop signals). Someone else (a shell's job control, a debugger) asked for it stopped: it stays
    so. (A stop of someone else's sent before the process had taken ckpt's own SIGSTOP merges with
    it, and cannot be told: the window docs/migrate.md names.) One rule, for ckpt and its guard."""
    return _pending(pid, STOP_BITS, in_stop=True)


def job_stopped(pid: int) -> bool:
    """In a job-control stop (state T; a freeze's ptrace-stop is t). False where it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


SIGSTOP_BIT = 1 << (signal.SIGSTOP - 1)


def sigstop_on_its_way(pid: int) -> bool:
    """Whether a SIGSTOP is pending on process `pid` (not yet taken: the process was in a syscall
    that does not take signals, frozen, not scheduled yet). For the duty cycle before its own: one
    pending then is someone else's, and the kernel would merge the cycle's into it (a signal already
    pending is not queued again), so the cycle's SIGCONT would end both. (Only SIGSTOP: it cannot be
    blocked or caught; the other stop signals are not merged with the cycle's SIGSTOP, and one left
    pending is found by `stopped_by_another`.)"""
    return _pending(pid, SIGSTOP_BIT, in_stop=False)


def _pending(pid: int, bits: int, in_stop: bool) -> bool:
    """One of `bits` pending on the process (ShdPnd) or one of its threads (SigPnd); with `in_stop`,
    only while it is in a job-control stop (state T). False where it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(ln.split(":", 1) for ln in f if ":" in ln)
        if in_stop and not fields.get("State", "").strip().startswith("T"):
            return False
        if int(fields.get("ShdPnd", "0"), 16) & bits:
            return True
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
                for ln in f:
                    if ln.startswith("SigPnd:") and int(ln.split()[1], 16) & bits:
                        return True
    except (OSError, ValueError):
        return False  # gone: nothing to continue
    return False


def continue_ours(targets: dict[str, int], pids: Collection[int]) -> list[int]:
    """SIGCONT by pidfd to those of `pids` that are targets, ending a stop of ckpt's; not to one that
    someone else stopped meanwhile (`stopped_by_another`). The pids left stopped so."""
    kept = [p for p in pids if str(p) in targets and stopped_by_another(p)]
    _signal(targets, set(pids) - set(kept), signal.SIGCONT)
    return kept


def give_back_policies(sched: Any, targets: dict[str, int]) -> list[int]:
    """The target's threads that ckpt raised for its final seize (targetboost.py), back to their own
    policy where they still run under the raise's (SCHED_FIFO|SCHED_RESET_ON_FORK, priority 1) and
    still belong to a target; the thread ids given back."""
    done: list[int] = []
    for entry in sched if isinstance(sched, list) else []:
        with contextlib.suppress(OSError, ValueError, TypeError):
            tid, policy = int(entry[0]), int(entry[1])
            slack = int(entry[2]) if len(entry) > 2 else None
            if not any(os.path.exists(f"/proc/{int(p)}/task/{tid}") for p in targets):
                continue
            raised = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
            if os.sched_getscheduler(tid) == raised and os.sched_getparam(tid).sched_priority == 1:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
                done.append(tid)
                if slack is not None:
                    # SCHED_OTHER comes back with the default slack, not the thread's own.
                    with open(f"/proc/{tid}/timerslack_ns", "w") as f:
                        f.write(str(slack))
    return done


def undo(state: dict[str, Any], targets: dict[str, int] | None = None, sock: int | None = None) -> str:
    """What the guard does when ckpt died: the target's threads given their own policy back, the
    original decided (`decide`), its TCP connections given back or their lock lifted (`_tcp`), the
    throttle lifted."""
    targets = targets or {}
    give_back_policies(state.get("sched"), targets)
    if state.get("tcp"):
        done = decide(state, targets, sock, lambda: _tcp("take-back", state, targets))
        if done == "killed":
            _tcp_after_commit(state, targets, sock)
        with contextlib.suppress(OSError, TypeError):
            os.unlink(state.get("tcp_records") or "")  # (the connections' data: not left behind)
    else:
        done = decide(state, targets, sock)
    child, home = state.get("cg"), state.get("home")
    if not child or not home:
        return done
    with contextlib.suppress(OSError, TypeError):  # the freezer's cycle: thawed (cgthrottle.FreezeCycle)
        _write(os.path.join(child, "cgroup.freeze"), "0")
    empty_cgroup(child, home, bool(state.get("enabled")))
    with contextlib.suppress(OSError):
        os.rmdir(child)
    return done


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ckpt's own


def guardtcp_argv(args: dict[str, Any]) -> list[str]:
    """guardtcp.py run by module name, but never from the inherited working directory (-m puts it
    first on sys.path: a root ckpt started in a directory holding a ckpt/ of someone else's would
    run that): -P (Python 3.11, as pyproject.toml requires) leaves it out; ckpt's own root comes
    from PYTHONPATH (guardtcp_env)."""
    return [sys.executable, "-P", "-m", "ckpt.migrate.guardtcp", json.dumps(args)]


def guardtcp_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


def _tcp(action: str, state: dict[str, Any], targets: dict[str, int]) -> None:
    """ckpt's own code (guardtcp.py) in an interpreter of its own, with site (it needs ckpt's
    libraries), given the targets' pidfds: "take-back" (the original's connections as they were,
    before it is continued) or "unlock" (the locks lifted)."""
    import subprocess

    pidfds = {str(e[0]): targets[str(e[0])] for e in state["tcp"] if str(e[0]) in targets}
    args = {
        "action": action,
        "tcp": state["tcp"],
        "pidfds": pidfds,
        "records": state.get("tcp_records"),
        "on_abort": state.get("tcp_moved"),
    }
    subprocess.run(
        guardtcp_argv(args),
        pass_fds=tuple(pidfds.values()),
        env=guardtcp_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=TCP_WAIT,
        check=False,
    )


def _tcp_after_commit(state: dict[str, Any], targets: dict[str, int], sock: int | None) -> None:
    """The original killed after the COMMIT: its locks are lifted once the destination is done.
    Not before: on one machine the lock is the copy's too, lifted by its restore once its sockets
    hold the connections; lifted earlier, a packet of the peer meeting no socket is answered by a
    reset. So the destination is told the end (the write side shut: EOF where it waits for DONE)
    and its own end awaited (bounded), then each lock is lifted where it is still here (on
    another machine or network namespace the source's lock is the source's to lift)."""
    import socket
    import time

    if sock is not None:
        with contextlib.suppress(OSError):
            s = socket.socket(fileno=os.dup(sock))
            with s:
                s.shutdown(socket.SHUT_WR)
                end = time.monotonic() + TCP_WAIT
                while (left := end - time.monotonic()) > 0:
                    s.settimeout(left)
                    if not s.recv(65536):
                        break
    with contextlib.suppress(Exception):
        _tcp("unlock", state, targets)


def empty_cgroup(cg: str, home: str, cpu_on: bool) -> tuple[bool, list[int]]:
    """Every process of cgroup `cg` moved back into `home`, its parent, ahead of the rmdir (the
    caller's: it says what is left): (whether home still gives cpu to its children, which `cpu_on`
    says it did, the pids moved). Here, in the stdlib-only guard, for cgthrottle.py too."""
    if cpu_on:
        # Home may take processes back only once it gives cpu to no child.
        with contextlib.suppress(OSError):
            _write(os.path.join(home, "cgroup.subtree_control"), "-cpu")
            cpu_on = False
    moved: list[int] = []
    # Also what the target forked meanwhile; bounded, for a process forking as fast as it is moved.
    for _ in range(100):
        try:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                left = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            break
        if not left:
            break
        for p in left:
            # Any failure (gone, or EBUSY where home still gives cpu to a child): go on, so the
            # caller's failure path still lets its target go; rmdir says what is left.
            with contextlib.suppress(OSError):
                _write(os.path.join(home, "cgroup.procs"), str(p))
                moved.append(p)
    return cpu_on, moved


STAGING_PREFIX = "ckpt-migrate-"  # source.py _staging: the only directories the guard removes


def remove_staging(path: Any) -> bool:
    """The staging directory of a dead ckpt removed (its records of TCP connections too, used by
    then): only a real directory named as source.py names them, never what a symlink points at."""
    import shutil
    import stat

    if not isinstance(path, str) or not os.path.basename(path).startswith(STAGING_PREFIX):
        return False
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def serve(
    rfd: int,
    pidfd: int,
    targets: dict[str, int] | None = None,
    sock: int | None = None,
    staging: str | None = None,
) -> int:
    """The guard's loop: 0 when told "done", 1 when it acted for a dead ckpt."""
    state: dict[str, Any] = {}
    targets = {} if targets is None else targets
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
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    msg = json.loads(line)
                    if msg.get("done"):
                        return 0
                    if "phase" in msg:
                        state.pop("mark", None)
                    if "targets" in msg:
                        _adopt(targets, msg.pop("targets"))
                    if "members_more" in msg:
                        more = msg.pop("members_more")
                        state.setdefault("more", []).extend(more if isinstance(more, list) else [])
                    if "members" in msg:
                        last = msg.pop("members")
                        _only(targets, state.pop("more", []) + (last if isinstance(last, list) else []))
                    if "ckpt_stopped" in msg:  # (added to, not replaced)
                        more = msg.pop("ckpt_stopped")
                        state.setdefault("ckpt_stopped", []).extend(more if isinstance(more, list) else [])
                    if "tcp" in msg:  # (one process's sockets: added to, not replaced)
                        t = msg.pop("tcp")
                        if isinstance(t, list) and len(t) in (3, 4) and isinstance(t[0], int):
                            state.setdefault("tcp", []).append(t)
                    state.update(msg)
            if chunk == b"":
                closed = True  # ckpt is exiting; wait for its exit to finish before acting
                p.unregister(rfd)
            elif not dead:
                break  # one read per wake-up while ckpt lives; once dead, drain
    try:
        undo(state, targets, sock)
    finally:
        remove_staging(staging)
    return 1


def main(argv: list[str]) -> int:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
    args = json.loads(argv[3]) if len(argv) > 3 else {}
    return serve(int(argv[1]), int(argv[2]), args.get("targets") or {}, args.get("sock"), args.get("staging"))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
