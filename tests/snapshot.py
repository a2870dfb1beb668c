"""The machine's persistent state that a test run could leave behind it, as sets of lines to diff.

Each kind is what outlives the processes that made it: POSIX message queues, SysV IPC objects,
/dev/shm entries (tmpfs: memory), ckpt's and the tests' directories in /tmp, network namespaces,
links, nft tables, iptables rules, cgroups, mounts, and processes left running: those reparented to
init and those carrying a test run's CKPT_LOCK_OWNER (tests/conftest.py sets it; every ckpt, guard
and target a run starts inherits it, so a survivor names its run).

    python -m tests.snapshot > before.json          # ... a run ...
    python -m tests.snapshot > after.json
    python -m tests.snapshot --diff before.json after.json

Other runs may share the machine: an entry new in `after` is this run's only where its name says so
(a pid of the run, its CKPT_LOCK_OWNER, a time inside the run)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

OWNER_ENV = "CKPT_LOCK_OWNER"


def _run(argv: list[str], timeout: float = 30) -> list[str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return p.stdout.splitlines() if p.returncode == 0 else []


def mqueues() -> list[str]:
    # Listed through an mqueue mount in a mount namespace of its own (ends with the command).
    return _run(["unshare", "-m", "sh", "-c", "mount -t mqueue none /mnt && ls -1 /mnt"])


def sysvipc() -> list[str]:
    """One line per object: kind, key, id, and the pids /proc/sysvipc gives (creator, last user)."""
    out = []
    for kind, cols in (("shm", ("key", "shmid", "size", "cpid", "lpid", "nattch")),
                       ("sem", ("key", "semid", "nsems")),
                       ("msg", ("key", "msqid", "qnum", "lspid", "lrpid"))):  # fmt: skip
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except OSError:
            continue
        head = lines[0].split() if lines else []
        for ln in lines[1:]:
            row = dict(zip(head, ln.split(), strict=False))
            out.append(f"{kind} " + " ".join(f"{c}={row.get(c, '?')}" for c in cols))
    return out


def _entries(d: str, prefixes: tuple[str, ...] = ()) -> list[str]:
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return [os.path.join(d, n) for n in names if not prefixes or n.startswith(prefixes)]


def shm() -> list[str]:
    return _entries("/dev/shm")


def tmp() -> list[str]:
    return _entries("/tmp", ("ckpt", "zdtm"))


def netns() -> list[str]:
    return sorted(set(_run(["ip", "netns", "list"])) | set(_entries("/run/netns")))


def links() -> list[str]:
    return [ln.split(":")[1].strip().split("@")[0] for ln in _run(["ip", "-o", "link"]) if ln.count(":") >= 2]


def nft() -> list[str]:
    return _run(["nft", "list", "tables"])


def iptables() -> list[str]:
    return [ln for ln in _run(["iptables-save"]) if not ln.startswith("#") and not ln.startswith(":")]


def cgroups() -> list[str]:
    out = []
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        out += [os.path.join(root, d) for d in dirs]
    return out


def mounts() -> list[str]:
    """Mount point, type and source of each mount of this mount namespace (ids change, not these)."""
    out = []
    with contextlib.suppress(OSError):
        for ln in Path("/proc/self/mountinfo").read_text().splitlines():
            f = ln.split()
            sep = f.index("-")
            out.append(f"{f[4]} {f[sep + 1]} {f[sep + 2]}")
    return out


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def owner_of(pid: str) -> str | None:
    """The CKPT_LOCK_OWNER in a process's environment: the test run that started it."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    key = OWNER_ENV.encode() + b"="
    return next((e[len(key) :].decode(errors="replace") for e in env if e.startswith(key)), None)


def processes() -> list[str]:
    """Processes reparented to init, and processes of a test run (its CKPT_LOCK_OWNER), each with
    its start time: the same pid reused is another line."""
    out = []
    me = str(os.getpid())
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and p != me):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ppid, start = stat[1], stat[19]
        owner = owner_of(pid)
        if ppid == "1" or owner is not None:
            cmd = _cmdline(pid)[:160]
            out.append(f"{pid}@{start} ppid={ppid} owner={owner or '-'} {cmd}")
    return out


KINDS: dict[str, Callable[[], list[str]]] = {
    "mqueue": mqueues,
    "sysvipc": sysvipc,
    "shm": shm,
    "tmp": tmp,
    "netns": netns,
    "links": links,
    "nft": nft,
    "iptables": iptables,
    "cgroups": cgroups,
    "mounts": mounts,
    "processes": processes,
}


def snapshot() -> dict[str, list[str]]:
    return {k: sorted(f()) for k, f in KINDS.items()}


def diff(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """Per kind, what appeared ("+") and what went ("-") between two snapshots."""
    out: dict[str, dict[str, list[str]]] = {}
    for k in sorted(set(before) | set(after)):
        b, a = set(before.get(k, [])), set(after.get(k, []))
        if a - b or b - a:
            out[k] = {"+": sorted(a - b), "-": sorted(b - a)}
    return out


def report(before: dict[str, list[str]], after: dict[str, list[str]], owner: str) -> list[str]:
    """What a run seems to have left, one line each: its processes still running (those carrying
    its CKPT_LOCK_OWNER: certainly its own), and every other object new since it began (its own or
    a concurrent run's: a warning to look at, not proof)."""
    out = []
    for kind, ch in diff(before, after).items():
        for e in ch["+"]:
            if kind != "processes":
                out.append(f"{kind}: {e}")
            elif f" owner={owner} " in e:
                out.append(f"process of this run still running: {e}")
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--diff"] and len(argv) == 3:
        d = diff(*(json.loads(Path(p).read_text()) for p in argv[1:]))
        for kind, ch in d.items():
            print(f"== {kind}: +{len(ch['+'])} -{len(ch['-'])}")
            for sign in "+-":
                for e in ch[sign]:
                    print(f"{sign} {e}")
        return 0
    if argv:
        print("usage: python -m tests.snapshot [--diff BEFORE.json AFTER.json]", file=sys.stderr)
        return 2
    json.dump(snapshot(), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
