"""The network lock of established TCP connections (CRIU's nftables "network lock").

While a connection is dumped, and from `dump --kill` until its restore, no packet of it may reach
either end: an ACK taken in would change the sequence numbers being read, and a segment arriving
while no socket holds the connection would be answered by a reset, which ends it at the peer. An
nftables table of ckpt's own (`inet ckpt_lock_<hex>`) drops both directions of each connection at
input and output; the peer retransmits until the restored socket takes the connection up again.

nftables is the kernel's packet filter since Linux 3.13 (CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET);
the `nft` command (Debian's package nftables) loads the table. Without either, a dump of an
established connection is refused naming what is missing: without a lock the state read could be
stale, and after --kill the peer would see a reset.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt.errors import CkptError

NFT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Flow:
    """One TCP connection as seen by this host: local address and port, remote address and port."""

    family: int  # AF_INET (2) or AF_INET6 (10)
    addr: bytes
    port: int
    peer: bytes
    peer_port: int


def _rules(flows: Sequence[Flow]) -> list[str]:
    out = []
    for f in flows:
        ip = "ip6" if f.family == 10 else "ip"
        a, p = ipaddress.ip_address(f.addr), ipaddress.ip_address(f.peer)
        # Both directions: on loopback the peer is on this host too, and its packets pass here.
        out.append(f"{ip} saddr {a} tcp sport {f.port} {ip} daddr {p} tcp dport {f.peer_port} drop")
        out.append(f"{ip} saddr {p} tcp sport {f.peer_port} {ip} daddr {a} tcp dport {f.port} drop")
    return out


def _nft_path() -> str | None:
    # /usr/sbin may be missing from a user's PATH (sudo keeps it, a login shell may not).
    return shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None
    )


def _nft(script: str, what: str) -> None:
    nft = _nft_path()
    if nft is None:
        raise CkptError(
            f"{what}: the network lock needs the nft command (Debian's package nftables), not found"
        )
    import subprocess  # here: a dump or restore without TCP connections never runs nft (issue 9 part 3)

    try:
        r = subprocess.run(
            [nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CkptError(f"{what}: nft failed ({e})") from None
    if r.returncode != 0:
        err = " ".join(r.stderr.split())[:300] or f"exit status {r.returncode}"
        raise CkptError(f"{what}: nft failed (does this kernel have nf_tables?): {err}")


def lock(flows: Sequence[Flow]) -> str:
    """Drop every packet of `flows` from now on; the lock's name (for unlock, and the image)."""
    name = f"ckpt_lock_{os.urandom(8).hex()}"  # secrets.token_hex, without its hashlib and random imports
    body = "\n".join(f"    {r}" for r in _rules(flows))
    script = (
        f"table inet {name} {{\n"
        f"  chain input {{\n    type filter hook input priority -150; policy accept;\n{body}\n  }}\n"
        f"  chain output {{\n    type filter hook output priority -150; policy accept;\n{body}\n  }}\n"
        "}\n"
    )
    _nft(script, "locking the network for the dump of established TCP connections")
    return name


def unlock(name: str) -> None:
    """Lift a lock (an nftables table named by lock()); one already gone is not an error."""
    if not name.startswith("ckpt_lock_"):
        raise CkptError(f"{name!r} is not a network lock of ckpt's")
    if _nft_path() is None:
        return  # no nft here: no lock of ckpt's either (a restore on another machine than the dump)
    try:
        _nft(f"delete table inet {name}\n", f"lifting the network lock {name}")
    except CkptError as e:
        if "No such file or directory" not in str(e):
            raise


def probe() -> tuple[bool, str]:
    """For `ckpt check`: a lock made and lifted (on a flow no one uses: port 1 to port 1 of 127.0.0.2)."""
    lo = bytes([127, 0, 0, 2])
    try:
        name = lock([Flow(2, lo, 1, lo, 1)])
        unlock(name)
    except CkptError as e:
        return False, str(e)
    return True, "the nftables network lock"
