"""The TCP connections of a migration whose `ckpt migrate` died (`--tcp-established`): run by the
guard (guard.py, stdlib only) in an interpreter of its own, with ckpt's code and libraries, only
after such a death.

What ckpt left, and who owns it then (docs/migrate.md, "When `ckpt migrate` itself dies"):
  - from the final freeze until the commit's let-go, the original's sockets are in repair mode,
    still connected, behind the network lock: the original owns them again. "take-back": repair
    mode off (nothing sent), the lock lifted, before the guard continues it.
  - from the let-go (the sockets disconnected in repair mode, the --on-commit hook run) until the
    COMMIT leaves: the original still owns them, but their state is gone from the kernel. The
    records the final dump read (stashed by ckpt before READY, tcpmove.py stash) connect them
    again, as ckpt's own take_back does; --on-abort first where --on-commit ran.
  - after the COMMIT: the copy owns the connections; the guard kills the original (its sockets,
    in repair mode, go silently) and, once the destination is done, "unlock": the source's lock
    lifted where it is still here.
Each socket is found by its inode in the target's fd table, through the guard's pidfd of the
target (pidfd_getfd), and checked by fstat: a reused pid is never taken for the target."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
from typing import Any

from ckpt import netlock
from ckpt.errors import CkptError, RestoreError
from ckpt.image.tcp import TcpRecord
from ckpt.migrate.netmove import run_hook
from ckpt.proc.pipes import pidfd_getfd
from ckpt.proc.tcp import SOL_TCP, TCP_ESTABLISHED, TCP_INFO, TCP_REPAIR, repair_off
from ckpt.restore.tcp import go_live, prepare, rebuild

SOCKET_LINK = re.compile(r"socket:\[(\d+)\]\Z")
MAX_RECORDS = 1 << 26  # bytes of the stash read at most (ckpt's own file, bounded all the same)


def sockets(pidfds: dict[str, int], entries: list[Any]) -> list[tuple[int, socket.socket]]:
    """(inode, a copy of the socket) of each socket named, from the process its pidfd names."""
    out: list[tuple[int, socket.socket]] = []
    for pid, _lock, inos, *_reuse in entries:
        pfd = pidfds.get(str(pid))
        want = {int(i) for i in inos}
        if pfd is None or not want:
            continue
        try:
            names = os.listdir(f"/proc/{int(pid)}/fd")
        except OSError:
            continue
        for n in names:
            try:
                m = SOCKET_LINK.match(os.readlink(f"/proc/{int(pid)}/fd/{n}"))
            except OSError:
                continue
            if m is None or int(m.group(1)) not in want:
                continue
            try:
                fd = pidfd_getfd(pfd, int(n))
            except OSError:
                continue
            ino = int(m.group(1))
            if os.fstat(fd).st_ino != ino:  # (the pid reused: another process's fd)
                os.close(fd)
                continue
            want.discard(ino)
            out.append((ino, socket.socket(fileno=fd)))
    return out


def _records(path: str | None) -> dict[int, TcpRecord]:
    if not path:
        return {}
    import msgpack

    try:
        with open(path, "rb") as f:
            recs = msgpack.unpackb(f.read(MAX_RECORDS), raw=False)
    except (OSError, ValueError):
        return {}
    return {int(r["ino"]): TcpRecord.from_dict(r, "tcp") for r in recs if isinstance(r, dict) and "ino" in r}


def take_back(args: dict[str, Any]) -> list[str]:
    """The original's connections as they were before the final freeze; what failed."""
    failed: list[str] = []
    records = _records(args.get("records"))
    hook = args.get("on_abort")
    if hook:  # the addresses moved back before the sockets are connected again
        try:
            run_hook(hook, "abort", list(records.values()))
        except CkptError as e:
            failed.append(str(e))
    # SO_REUSEADDR on before repair mode (told with the inodes: the stash may not exist yet).
    reuse = {int(i) for e in args["tcp"] if len(e) > 3 for i in e[3]}
    for ino, s in sockets(args["pidfds"], args["tcp"]):
        with s:
            try:
                if not s.getsockopt(SOL_TCP, TCP_REPAIR):
                    continue  # never put in repair mode (ckpt died first), or given back already
                if s.getsockopt(SOL_TCP, TCP_INFO, 1)[0] == TCP_ESTABLISHED:
                    repair_off(s, 1 if ino in reuse else 0)
                elif ino in records:  # disconnected at the let-go: connected again, as it was
                    r = records[ino]
                    prepare(s, r, beside_listener=True)
                    rebuild(s, r)
                    s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # (the disconnect's ECONNABORTED)
                    go_live(s, r)
                else:
                    failed.append(f"socket {ino}: disconnected, and no record of it")
            except (OSError, RestoreError) as e:
                failed.append(f"socket {ino}: {getattr(e, 'strerror', None) or e}")
    failed += unlock(args)
    return failed


def unlock(args: dict[str, Any]) -> list[str]:
    failed = []
    for name in sorted({str(e[1]) for e in args["tcp"]}):
        try:
            netlock.unlock(name)
        except CkptError as e:
            failed.append(str(e))
    return failed


def main(argv: list[str]) -> int:
    args = json.loads(argv[1])
    failed = take_back(args) if args.get("action") == "take-back" else unlock(args)
    for f in failed:  # (the guard's stderr is /dev/null: for a person running this by hand)
        print(f"ckpt: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv))
