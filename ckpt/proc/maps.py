"""/proc/PID/maps as Vma records."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckpt.errors import TargetError, TargetExited
from ckpt.proc.procfs import as_text, slurp
from ckpt.sysvmap import is_sysv_path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Mappings whose contents are not the process's data: reading [vvar] gives EIO, [vsyscall] is a
# fixed kernel page. They are recorded but never read.
SPECIAL_SKIP = frozenset({"[vvar]", "[vvar_vclock]", "[vsyscall]"})


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    perms: str  # "rwxp" / "r--s" as in /proc/PID/maps
    offset: int
    dev: str  # "fd:01"
    inode: int
    path: str  # "" for anonymous, "[heap]", "/usr/lib/..."; " (deleted)" kept as the kernel gives it

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def npages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def is_sysv(self) -> bool:
        """A SysV segment, whose inode column is its id: 0 for a namespace's first (ckpt/sysvmap.py)."""
        return is_sysv_path(self.path)

    @property
    def is_file(self) -> bool:
        """Backed by a file (the inode is set, or a SysV segment of any id), as opposed to anonymous
        or a kernel special."""
        return self.inode != 0 or self.is_sysv

    @property
    def is_special(self) -> bool:
        return self.path in SPECIAL_SKIP

    @property
    def dumpable(self) -> bool:
        """Whether ckpt copies this mapping's pages and the dirty trackers follow them: readable, and
        the process's own memory (not a kernel special mapping)."""
        # (not through readable and is_special: asked for every mapping, several times a freeze)
        return self.perms[0] == "r" and self.path not in SPECIAL_SKIP

    @property
    def forced(self) -> bool:
        """Not readable (PROT_NONE, write- or execute-only) yet the process's own memory: pages it
        wrote and then mprotect()ed are still its data. process_vm_readv refuses them; a dump reads
        them through /proc/PID/mem (FOLL_FORCE). The trackers leave them out: uffd-wp would put a
        marker, and so page tables, under every page of a large PROT_NONE reservation. Instead every
        dump takes their present pages, and an untouched reservation has none."""
        return self.perms[0] != "r" and self.path not in SPECIAL_SKIP

    @property
    def copied(self) -> bool:
        """Whether a dump copies this mapping's present pages (dumpable or forced)."""
        return self.path not in SPECIAL_SKIP


def copied_vmas(vmas: list[Vma]) -> list[Vma]:
    """The mappings whose present pages a dump copies, in address order."""
    return [v for v in vmas if v.copied]


def parse_maps_line(line: str) -> Vma:
    # "start-end perms offset dev inode   path" — path may contain spaces, so split at most 5 times.
    parts = line.rstrip("\n").split(None, 5)
    rng, perms, off, dev, ino = parts[:5]
    path = parts[5] if len(parts) > 5 else ""
    lo, hi = rng.split("-")
    return Vma(int(lo, 16), int(hi, 16), perms, int(off, 16), dev, int(ino), path)


# The last text parsed and its records: a dump reads maps before its freeze and again inside it,
# where an idle process's text is the same bytes, and parsing them (~5 us a line) is most of the read.
# Keyed by the bytes alone: the records are a function of them, whichever process they came from.
# Only texts up to KEEP_MAX are kept (~2500 mappings): what a long-lived caller holds stays small.
_last: tuple[bytes, list[Vma]] = (b"", [])
KEEP_MAX = 256 << 10


def read_maps(pid: int) -> list[Vma]:
    global _last
    try:
        data = slurp(f"/proc/{pid}/maps")
        last = _last
        if data == last[0]:
            return list(last[1])
        # surrogateescape: a mapped file's name is bytes, not always UTF-8; kept exact end to end.
        text = as_text(data, "surrogateescape")
        vmas = [parse_maps_line(ln) for ln in text.split("\n") if ln.strip()]
        if len(data) <= KEEP_MAX:
            _last = (data, vmas)
        return list(vmas)
    except FileNotFoundError:
        raise TargetExited(f"process {pid} does not exist (or exited)") from None
    except ProcessLookupError:
        raise TargetExited(f"process {pid} exited") from None
    except PermissionError:
        raise TargetError(f"cannot read /proc/{pid}/maps: permission denied") from None
