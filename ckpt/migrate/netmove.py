"""The network's step in a migration of established TCP connections to another host or network
namespace (`ckpt migrate --tcp-established --on-commit CMD [--on-abort CMD]`).

A connection is an address pair: the peer keeps sending to the address the original had, so that
address must be the destination's before the copy's socket is connected there (a repair-mode
connect needs its local address to be one of the host's). ckpt does not own the network: as
P.Haul leaves it to the container's network namespace and CRIU to the cluster, moving the address
is left to the caller (a network manager, a script, a test), at the one moment it is right:

  --on-commit CMD   run by the source after the final freeze (the connections locked and read),
                    when the original's sockets have let go of their address pairs, just before
                    COMMIT goes out. It moves each local address to the destination (and updates
                    the neighbours: a gratuitous ARP, or the router's route). A non-zero exit
                    abandons the migration before the commit: the original takes its connections
                    back (after --on-abort, which must undo what CMD did).
  --on-abort CMD    run by the source if, after --on-commit ran, the original has to take its
                    connections back (CMD failed, or the destination failed after the commit and
                    killed its copy): it moves the addresses back, before the original's sockets
                    are connected again.

Both get the connections in their environment: CKPT_MIGRATE_PHASE (commit | abort),
CKPT_TCP_ADDRESSES (the local addresses, each once, space-separated) and CKPT_TCP_CONNECTIONS
(LOCAL>PEER per connection, space-separated, [v6]:port; one environment string, so at most
128 KiB: a process with more connections is refused before the first round). Packets of the
peer that arrive meanwhile are dropped by the lock on either side and retransmitted by the peer.
The destination binds a connection whose address is not yet its own with IP_FREEBIND
(restore/tcp.py) and connects it only after the commit, when the address is there.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence

from ckpt.errors import CkptError
from ckpt.image.tcp import TcpRecord

HOOK_TIMEOUT = 60.0  # s: inside the downtime; a hook that hangs must not hold the original forever


MAX_ARG_STRLEN = 32 * 4096  # bytes of one environment string of an exec, its NUL included


def check_connections_env(pairs: Sequence[str]) -> None:
    """CKPT_TCP_CONNECTIONS (LOCAL>PEER of each connection) is one environment string of the
    hooks: longer than an exec takes (E2BIG), the hook could not run, and that only at the commit,
    inside the downtime. Refused (CkptError) in one line."""
    n = len(f"CKPT_TCP_CONNECTIONS={' '.join(pairs)}".encode()) + 1
    if n > MAX_ARG_STRLEN:
        raise CkptError(
            f"--on-commit/--on-abort: the process's {len(pairs)} TCP connections make the hooks' "
            f"CKPT_TCP_CONNECTIONS {n} bytes, more than one environment string of an exec takes "
            f"({MAX_ARG_STRLEN}); migrate it without the hooks, or with fewer connections"
        )


def hook_env(records: Sequence[TcpRecord], phase: str) -> dict[str, str]:
    addrs = sorted({str(ipaddress.ip_address(r.addr)) for r in records})
    pairs = " ".join(f"{r.endpoint()}>{r.endpoint(peer=True)}" for r in records)
    return {"CKPT_MIGRATE_PHASE": phase, "CKPT_TCP_ADDRESSES": " ".join(addrs), "CKPT_TCP_CONNECTIONS": pairs}


def run_hook(command: str, phase: str, records: Sequence[TcpRecord]) -> None:
    """`command` by /bin/sh with the connections in its environment; CkptError unless it exits 0."""
    import subprocess  # here: only a migration given a hook runs one
    import tempfile

    opt = f"--on-{phase}"
    # stderr into a file, not a pipe: a process the command leaves in the background (an arping,
    # a daemon) keeps the pipe open, and the wait for its end would last as long as that process
    # (up to HOOK_TIMEOUT, then a failure), inside the downtime.
    with tempfile.TemporaryFile() as err:
        try:
            r = subprocess.run(
                ["/bin/sh", "-c", command],
                env={**os.environ, **hook_env(records, phase)},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=HOOK_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CkptError(f"{opt} command did not finish within {HOOK_TIMEOUT:g} s") from None
        except OSError as e:
            raise CkptError(f"{opt} command could not run: {e.strerror or e}") from None
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if r.returncode != 0:
        tail = " ".join(stderr.split())[-300:]
        raise CkptError(f"{opt} command failed (exit status {r.returncode})" + (f": {tail}" if tail else ""))
