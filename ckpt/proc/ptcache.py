"""The page-table walks of a dump (smaps' VmFlags, the guard regions), kept from one dump to the
next of the same process while its mappings stay the same.

smaps walks every page-table entry (~20-40 ms per GiB present, here) and a migration's live round
would pay it every round. A pre-dump layer is no moment of the process and is never restored on its
own: what it records of VmFlags only lets the destination set them early into its warm helper.

A dump that is a moment of the process (an incremental, a migration's final round) reuses the walks
only on the word of ckpt/proc/flagwatch.py: counters of every call that can change a flag, opened
while the process was frozen, all at zero since the reading, and the maps lines the same. Without
the counters (no tracefs, no permission), a pre-dump reuses on equal maps lines alone (a madvise()
over a whole mapping, invisible in maps, then leaves a stale record there: the destination whose
warm helper holds other flags restores cold, ckpt/migrate/warm.py) and every other dump reads."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ckpt.errors import CkptError
from ckpt.proc.flagwatch import (
    FlagWatch,
    Unavailable,
    foreign_fds,
    foreign_flags,
    open_watch,
    prefetch_ids,
    restarting_threads,
)
from ckpt.proc.maps import Vma, read_maps
from ckpt.proc.props import read_guards, read_vmflags
from ckpt.proc.stat import read_status

Walks = tuple[dict[int, str], list[list[int]]]  # (VmFlags by mapping start, guard regions)
# Resident bytes below which a dump with no walk of its own keeps reading it in the freeze (~0.5 ms
# at 8 MiB here): switching the syscall tracepoints on costs the kernel 1-15 ms before the freeze,
# and every syscall on the machine is slower while they are on.
LIVE_WALK_MIN = 16 << 20


def _key(vmas: list[Vma]) -> tuple[Any, ...]:
    return tuple((v.start, v.end, v.perms, v.offset, v.dev, v.inode, v.path) for v in vmas)


class Known:
    """A finished walk, shaped as PageTableReads (its result, no thread). ``validated``: the
    counters vouch for it (else only the maps lines do)."""

    def __init__(self, walks: Walks, validated: bool = False) -> None:
        self._walks = walks
        self.validated = validated

    def result(self) -> Walks:
        return self._walks


class PageTablesCache:
    """The last walks of one process, and the counters that say whether they still hold.
    ``watch`` False: no counters (pre-dumps reuse on equal maps lines, nothing else reuses); None:
    unless CKPT_FLAGWATCH=0 (a way out, and the "before" of a benchmark)."""

    def __init__(self, watch: bool | None = None) -> None:
        if watch is None:
            watch = os.environ.get("CKPT_FLAGWATCH", "1") != "0"
        self._key: tuple[Any, ...] | None = None
        self._walks: Walks | None = None
        self._use_watch = watch
        self._watch: FlagWatch | None = None
        self._trusted = False  # the counters have run since the stored walks were read
        self._foreign: str | None = None
        self.hits = 0  # walks reused (on the counters' word, or a pre-dump's on equal maps lines)
        self.skips = 0  # walks reused on the counters' word
        self.why: str | None = None  # why the last validate() did not vouch (None: it did)
        self._vouched = False  # validate() vouched in this dump's freeze (rearm() clears it)
        self._fds_pending: list[int] | None = None  # validate(fds_later=True): validate_fds() checks

    def lookup(self, vmas: list[Vma]) -> Known | None:
        """The walks if the maps lines are the same (a pre-dump without counters)."""
        if self._walks is None or _key(vmas) != self._key:
            return None
        self.hits += 1
        return Known(self._walks)

    @property
    def watching(self) -> bool:
        return self._watch is not None

    @property
    def ready(self) -> bool:
        """Walks stored and counters running since: the next freeze may keep them."""
        return self._trusted and self._walks is not None and self._watch is not None

    def validate(
        self,
        pid: int,
        vmas: list[Vma],
        tids: Iterable[int],
        ours: Iterable[int] = (),
        start_time: int | None = None,
        fds_later: bool = False,
    ) -> Known | None:
        """At the start of a freeze, before anything is injected: the last walks if they still
        hold, else None (read them again). ``ours``: the tracker's userfaultfd; ``start_time``: the
        process's as the freeze read it (Frozen.start_time; else read here). ``fds_later``: the
        fd table is not looked at here: the caller hands the freeze's own read of it to
        validate_fds() before it uses the walks (none of its injected calls makes an fd)."""
        w = self._watch
        if self._walks is None:
            self.why = "no earlier walk"
        elif w is None or w.pid != pid or not self._trusted:
            self.why = self.why if w is None and self.why else "no counters since the last walk"
        elif self._foreign is not None:
            self.why = self._foreign
        elif _key(vmas) != self._key:
            self.why = "the mappings changed"
        else:
            self.why = w.changed(tids, ours, start_time, fds=not fds_later)
        self._vouched = self.why is None
        self._fds_pending = list(ours) if self._vouched and fds_later else None
        if self.why is not None:
            return None
        self.hits += 1
        self.skips += 1
        assert self._walks is not None
        return Known(self._walks, validated=True)

    def validate_fds(self, pid: int, links: Iterable[tuple[int, str]] | None) -> bool:
        """validate(fds_later=True)'s fd check, on ``links`` ((fd, link) of every fd, read in this
        freeze; None: read now): False where it no longer vouches (the walks must be read). Also
        where the caller no longer wants the walks: rearm() trusts a freeze that vouched."""
        ours, self._fds_pending = self._fds_pending, None
        if ours is None:
            return True  # (nothing left to check)
        why = foreign_fds(pid, ours, links)
        if why is not None:
            self.why, self._vouched = why, False
            self.hits -= 1
            self.skips -= 1
        return why is None

    def prefetch(self) -> None:
        """The tracepoint ids, before the freeze and before the "seize" note (a migration counts
        its downtime from there): with no tracefs mounted they cost a detached tracefs mount (~0.5 ms;
        where the kernel lacks the new mount API, a child in a private mount namespace: ~40-60 ms
        of wall time), once per ckpt process (flagwatch._find_ids)."""
        if self._use_watch:
            why = prefetch_ids()
            if why is not None:
                self.why = why

    def prewarm(self, pid: int, tids: Iterable[int] | None = None) -> None:
        """Before the freeze: open the counters on the threads seen running, so that the freeze
        only adds those of threads made meanwhile (the first counter on a tracepoint costs the
        kernel ~1-15 ms to switch it on; each thread's ~0.25 ms)."""
        if not self._use_watch or (self._watch is not None and self._watch.pid == pid):
            return
        self.close()
        self._trusted = False  # counters opened on a running process vouch for nothing yet
        if tids is None:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                return  # the freeze that follows says why
        got = open_watch(pid, tids)
        if isinstance(got, str):
            self.why = got
        else:
            self._watch = got

    def rearm(
        self,
        pid: int,
        tids: Iterable[int],
        trusted: bool,
        pending: bool = False,
        threads: Iterable[dict[str, Any]] = (),
    ) -> None:
        """At the end of a freeze, after the last injected call: count from here. ``trusted``: the
        walks this dump records were read in this freeze, will be read after the thaw, or were
        vouched for (``validated``); otherwise the stored walks are no longer known to hold.
        ``pending``: they will be read after the thaw (store() then): until then none to reuse.
        ``threads``: the dump's thread records (their registers: which will restart a sleep)."""
        vouched, self._vouched = self._vouched, False
        self._trusted = False
        if pending:
            self._key = self._walks = None
        if not (trusted and self._use_watch):
            return
        tids = sorted(tids)
        if self._watch is None or self._watch.pid != pid:
            self.prewarm(pid, tids)
        if self._watch is None:
            return
        try:
            # A freeze vouched for saw no clone, execve or io_uring_setup since the last look.
            self._watch.cover(tids, check=not vouched, restarts=restarting_threads(threads))
        except (Unavailable, OSError) as e:
            self.why = str(e)
            self.close()
            return
        self._trusted = True

    def baseline_live(self, pid: int) -> None:
        """For a dump with no earlier walk of its own (`ckpt dump --incremental` from the shell): the
        counters opened and zeroed on every thread of the running process (cover_running), then
        the walks read while it runs, so that its freeze keeps them if nothing changed meanwhile.
        The walks cost the same CPU, now before the freeze."""
        if not self._use_watch:
            return
        try:
            rss = int((read_status(pid).get("VmRSS") or "0").split()[0]) << 10
        except (OSError, CkptError, ValueError):
            return
        if rss < LIVE_WALK_MIN:
            self.why = "a small process: its walk stays in the freeze"
            return
        self.prewarm(pid)
        if self._watch is None:
            return
        try:
            self._watch.cover_running()
            vmas = read_maps(pid)
            flags = read_vmflags(pid)
            walks = (flags, read_guards(pid, vmas, flags))
            moved = _key(read_maps(pid)) != _key(vmas)
        except (Unavailable, OSError, CkptError) as e:
            self.why = str(e)
            return
        if moved:
            self.why = "the mappings changed while they were read"
            return
        self.store(vmas, walks)
        self._trusted = True

    def store(self, vmas: list[Vma], walks: Walks) -> None:
        self._key, self._walks = _key(vmas), walks
        self._foreign = foreign_flags(walks[0])

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
