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

import ctypes
import os
import threading
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
    import ipaddress  # here: only a process with TCP connections to lock needs it (~5 M instructions)

    out = []
    for f in flows:
        ip = "ip6" if f.family == 10 else "ip"
        a, p = ipaddress.ip_address(f.addr), ipaddress.ip_address(f.peer)
        # Both directions: on loopback the peer is on this host too, and its packets pass here.
        out.append(f"{ip} saddr {a} tcp sport {f.port} {ip} daddr {p} tcp dport {f.peer_port} drop")
        out.append(f"{ip} saddr {p} tcp sport {f.peer_port} {ip} daddr {a} tcp dport {f.port} drop")
    return out


def _nft_path() -> str | None:
    import shutil  # here: with bz2 and lzma, ~1% of the start of a dump that locks nothing

    # /usr/sbin may be missing from a user's PATH (sudo keeps it, a login shell may not).
    return shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None
    )


class _Lib:
    """libnftables (the library the nft command is built on; Debian's libnftables1, which nftables
    depends on), called in this process: a lock made or lifted in 0.3-0.9 ms here, against 5-20 ms
    for a run of the nft command, and both are inside a migration's downtime."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        except OSError:  # another soname: find_library asks ldconfig (a process: only then)
            from ctypes.util import find_library  # here: it imports subprocess, which a dump never needs

            lib = ctypes.CDLL(find_library("nftables") or "libnftables.so", use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib = lib
        self.ctx: int | None = None
        self.mutex = threading.Lock()

    def run(self, script: str) -> str | None:
        """None on success, else nft's error text. One context for the process, never freed:
        nft_ctx_free takes 10-15 ms here (the run itself 0.5 ms)."""
        with self.mutex:
            if not self.ctx:
                self.ctx = self.lib.nft_ctx_new(0)
                if not self.ctx:
                    return "nft_ctx_new failed"
                self.lib.nft_ctx_buffer_error(self.ctx)
                self.lib.nft_ctx_buffer_output(self.ctx)
            self.lib.nft_ctx_get_error_buffer(self.ctx)  # (reading a buffer empties it)
            ok = self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode()) == 0
            self.lib.nft_ctx_get_output_buffer(self.ctx)  # (a listing's text: not wanted)
            if ok:
                return None
            return (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace") or "failed"


_lib: list[_Lib | None] = []


def _library() -> _Lib | None:
    if not _lib:
        if os.environ.get("CKPT_NETLOCK_COMMAND") == "1":  # the nft command only (tests, benches)
            _lib.append(None)
            return None
        try:
            _lib.append(_Lib())
        except (OSError, AttributeError):
            _lib.append(None)
    return _lib[0]


def prepare() -> None:
    """Load libnftables and open its context now, before a freeze needs them."""
    lib = _library()
    if lib is not None:
        lib.run("list tables\n")


def _available() -> bool:
    return _library() is not None or _nft_path() is not None


def _nft(script: str, what: str) -> None:
    lib = _library()
    if lib is not None:
        err = lib.run(script)
        if err is not None:
            msg = " ".join(err.split())[:300]
            raise CkptError(f"{what}: nft failed (does this kernel have nf_tables?): {msg}")
        return
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


def _script(name: str, flows: Sequence[Flow], create: bool) -> str:
    body = "\n".join(f"    {r}" for r in _rules(flows))
    return (
        f"{'create table' if create else 'table'} inet {name} {{\n"
        f"  chain input {{\n    type filter hook input priority -150; policy accept;\n{body}\n  }}\n"
        f"  chain output {{\n    type filter hook output priority -150; policy accept;\n{body}\n  }}\n"
        "}\n"
    )


OWNER_ENV = "CKPT_LOCK_OWNER"  # 1-8 hex digits: whose locks these are (a test run's, a job's)


def owner() -> str:
    """The first 8 hex digits of a lock's name: who made it. CKPT_LOCK_OWNER where it is set (so a
    test run can tell its own locks from those of runs beside it), else this ckpt's pid. The rest
    of the name is random: two dumps of one owner never share a lock."""
    tag = os.environ.get(OWNER_ENV, "")
    if 0 < len(tag) <= 8 and all(c in "0123456789abcdef" for c in tag):
        return tag.rjust(8, "0")
    return f"{os.getpid() & 0xFFFFFFFF:08x}"


def new_name() -> str:
    """A fresh lock name: `ckpt_lock_` + owner() + 16 random hex digits (within image/tcp.py's
    LOCK_NAME)."""
    return f"ckpt_lock_{owner()}{os.urandom(8).hex()}"  # secrets.token_hex, without its imports


def lock(flows: Sequence[Flow], name: str = "") -> str:
    """Drop every packet of `flows` from now on; the lock's name (for unlock, and the image):
    `name` where the caller chose it first (new_name(): a migration tells its guard before the
    lock exists), else a new one."""
    name = name or new_name()
    _nft(_script(name, flows, False), "locking the network for the dump of established TCP connections")
    return name


def ensure(name: str, flows: Sequence[Flow]) -> bool:
    """The lock `name` over `flows`, made here unless it is here already (a migration on one machine:
    the source's lock is the destination's); whether it was made here. A listing first (the one
    nft run when it is here), then "create" (which fails on a table that exists). Without nft:
    False (a restore on another machine than the dump, with no lock to take: as before locks
    existed there)."""
    if not name.startswith("ckpt_lock_"):
        raise CkptError(f"{name!r} is not a network lock of ckpt's")
    if not _available():
        return False
    if _exists(name):  # (a failed "create" costs 7-16 ms here: the kernel undoes the batch)
        return False
    try:
        _nft(_script(name, flows, True), "locking the network for the restore of TCP connections")
    except CkptError as e:
        if "File exists" in str(e):
            return False
        raise
    return True


def _exists(name: str) -> bool:
    try:
        _nft(f"list table inet {name}\n", "")
    except CkptError:
        return False
    return True


def unlock(name: str) -> None:
    """Lift a lock (an nftables table named by lock()); one already gone is not an error."""
    if not name.startswith("ckpt_lock_"):
        raise CkptError(f"{name!r} is not a network lock of ckpt's")
    if not _available():
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
