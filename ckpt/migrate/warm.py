"""Warm restore: the destination builds the process while the rounds arrive.

After the first round a restore helper is made and given every mapping and page (the first half of
a restore, ckpt.restore.restorer.prepare); each later round writes only the pages it changed. At the
final layer only its pages, the protections, mm, fds, signals, credentials and registers remain
(restorer.complete): the downtime depends on the final dirty set, not on the memory size.

When the mappings change between rounds, the helper is rebuilt from the chain at that round; when
the final layer's mappings differ from the helper's, the final restore is an ordinary (cold) one.
ptrace requests must come from the thread that attached, so one thread owns the helper.

The receiving (main) thread hands work to that thread through a C SimpleQueue and waits for its
answers on an Outcome (a Latch): never through queue.Queue or concurrent.futures.Future, whose
Python-level Condition a Ctrl-C can leave locked by the main thread (ckpt/threadpool.py, Latch),
and close() then waited for ever on a thread that waited for that lock."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from _queue import SimpleQueue
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import xxhash

from ckpt import ranges
from ckpt.image import STATE_ABSENT, STATE_DATA, Layer, MergedView
from ckpt.image.chain import PageTable, require_consistent
from ckpt.image.format import PAGE_SIZE
from ckpt.migrate.boost import Boost, raise_task
from ckpt.migrate.boost import enabled as boost_enabled
from ckpt.migrate.chaintable import advance as _advance
from ckpt.migrate.chaintable import top_table as _top_table
from ckpt.migrate.chaintable import vma_key as _vma_key
from ckpt.migrate.pin import pin_helper
from ckpt.migrate.stream import Arrived, check_arrived
from ckpt.migrate.timeline import mark
from ckpt.restore.handoff import Outcome
from ckpt.restore.memory import _runs_array, fill_pages
from ckpt.restore.objects import objects_key
from ckpt.restore.plan import Machine, RestorePlan, make_plan
from ckpt.restore.props import set_vma_flags, verify_vmflags
from ckpt.restore.restorer import Prepared, RestoredProcess, complete, prepare, restore_process
from ckpt.restore.resume import exits_after, thread_pidfd, wait_gone
from ckpt.threadpool import start as start_thread

ZERO_RUN = bytes(PAGE_SIZE * 64)
MAX_QUEUED = 64  # chunks waiting for the helper; beyond, a round's pages come from its file at its end
STREAM_KINDS = ("anon", "copy", "file", "shm")  # mappings a streamed chunk may be written into


def _key(plan: RestorePlan) -> tuple[Any, ...]:
    """What the helper's mappings were built from: equal keys, equal address spaces."""
    return (
        tuple(
            (
                p.vma.start,
                p.vma.end,
                p.vma.perms,
                p.vma.offset,
                p.vma.path,
                p.kind,
                p.prot,
                p.growsdown,
                p.anon_name,
                p.fill,
                p.direct,
            )
            for p in plan.vmas
        )
        + tuple((v.start, v.end) for v in plan.vdso)
        + objects_key(plan)
    )


class WarmRestore:
    def __init__(self) -> None:
        self._q: SimpleQueue[tuple[str, Any, Outcome[Any] | None]] = SimpleQueue()
        self.prep: Prepared | None = None
        self.plan: RestorePlan | None = None
        self.key: tuple[Any, ...] | None = None
        self.vkey: tuple[Any, ...] | None = None
        self.table: PageTable | None = None  # the merged page table of the chain the helper holds
        # The chain received so far, kept open: each round's view takes its layers over instead of
        # decoding their metadata again (30 ms for a GiB's first layer).
        self.view: MergedView | None = None
        self.applied = 0  # layers of the chain the helper holds
        self.rebuilds = 0
        self.notes: list[str] = []
        self.warm_final = False
        self.gen = 0  # helpers built so far: a streamed chunk counts only for the one it went into
        self.spans: tuple[np.ndarray, np.ndarray] | None = None  # where streamed chunks may go
        self.streamed_pages = 0
        # The VmFlags (madvise, mlock, guards) set into the helper and checked (smaps: a walk of its
        # page tables, ~20-40 ms for a GiB) at SYNC, before the source's final freeze: the final
        # restore skips both when its layer asks for the same.
        self.flags_set: tuple[Any, ...] | None = None
        # The machine's limits and ckpt's capabilities that the final plan checks, read at SYNC too
        # (plan.Machine): ~0.5 ms of /proc reads out of the downtime.
        self.machine: Machine | None = None
        self._thread = threading.Thread(target=self._run, name="ckpt-warm-restore", daemon=True)
        start_thread(self._thread)

    # -- called from the receiving thread ------------------------------------------------------
    def chunk(self, a: Arrived) -> bool:
        """A chunk of the layer arriving now: written into the helper as soon as it can be.
        False when it is not taken (no helper yet, or the helper is busy with a long step)."""
        if self.prep is not None and self._q.qsize() < MAX_QUEUED:
            self._q.put(("chunk", a, None))
            return True
        return False

    def round(self, layer: Layer | Path, chunks: list[Arrived] | None = None) -> None:
        """The next layer of the chain (an open Layer this object now owns, or its path)."""
        self._q.put(("round", (_layer(layer), chunks), None))

    def finish(
        self,
        layer: Layer | Path,
        chunks: list[Arrived] | None = None,
        before_run: Callable[[int], None] | None = None,
    ) -> RestoredProcess:
        fut: Outcome[RestoredProcess] = Outcome()
        gone = thread_pidfd(self._thread.native_id)
        self._q.put(("final", (_layer(layer), chunks, before_run), fut))
        try:
            return fut.result()
        finally:
            # The helper's thread ends with the final restore: once it is gone from the kernel,
            # every restored thread is inside its syscall (restore/resume.py).
            self._thread.join()
            wait_gone(gone)

    def join_boost(self, boost: Boost) -> None:
        """This object's thread joins the downtime's boost (boost.py) before the final layer's chunks:
        it applies them, then builds the copy."""
        self._q.put(("boost", boost, None))

    def drain(self) -> bool:
        """Wait until every round given so far is in the helper; whether the helper is warm."""
        fut: Outcome[bool] = Outcome()
        self._q.put(("drain", None, fut))
        return fut.result()

    def close(self) -> None:
        self._q.put(("stop", None, None))
        self._thread.join()

    # -- the helper's own thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            op, path, fut = self._q.get()
            if op == "stop":
                self._drop()
                return
            if op == "boost":
                path.join()
                continue
            if op == "drain":
                assert fut is not None
                self._early_flags()
                fut.set_result(self.prep is not None)
                self.machine = Machine().prefetch()  # (after: the SYNCED does not wait for it)
                continue
            if op == "chunk":
                try:
                    self._chunk(path)
                except Exception as e:
                    self.notes.append(f"warm restore stopped at a streamed chunk: {e}")
                    self._drop()
            elif op == "round":
                try:
                    self._apply(*path)
                except Exception as e:  # the final restore will be a cold one, and say why if it fails
                    self.notes.append(f"warm restore stopped at {Path(path[0].path).name}: {e}")
                    self._drop()
            else:
                assert fut is not None
                exits_after()  # the last op: this thread ends with it (restore/resume.py)
                try:
                    rp = self._final(*path)
                except BaseException as e:
                    self._drop()
                    fut.set_exception(e)
                    return
                self._drop()
                fut.set_result(rp)
                return

    def _drop(self, keep_view: bool = False) -> None:
        """Kill the helper; `keep_view`: the chain stays open (it is about to be built from)."""
        if self.prep is not None:
            with contextlib.suppress(Exception):
                self.prep.abandon()
        if self.view is not None and not keep_view:
            self.view.close()
            self.view = None
        self.prep = self.plan = self.key = self.spans = None
        self.flags_set = None
        self.applied = 0

    def _open(self, top: Layer) -> MergedView:
        """The chain under `top`, on top of the one already open when it is its parent."""
        try:
            view = MergedView(top, below=self.view)
        except BaseException:
            top.close()
            raise
        if self.view is not None and (len(view.layers) < 2 or view.layers[1] is not self.view.top):
            self.view.close()  # not stacked: the view opened its own chain
        self.view = view
        return view

    def _chunk(self, a: Arrived) -> None:
        """Write a streamed chunk's pages into the helper, if they all fall in mappings it holds
        writable; otherwise the round's end writes them from the layer file."""
        if self.prep is None or self.spans is None:
            a.release()  # the file has it; only what was checked is kept
            return
        starts, ends = self.spans
        if not bool(ranges.in_spans(a.addrs, starts, ends).all()):
            a.release()
            return
        pages = a.pages_bytes()
        # (Without a Python step per run: a chunk of scattered pages has up to 256 runs.)
        runs = _runs_array(a.addrs, np.arange(len(a.addrs)))
        self.prep.remote.write_runs(cast(bytes, pages), runs)  # any buffer: np.frombuffer reads it
        # A raw chunk's pages are its stored bytes, whose xxh3 was taken on arrival.
        a.pxxh3 = a.xxh3 if a.raw else xxhash.xxh3_64_intdigest(pages)
        a.applied = True
        a.helper = self.gen
        a.release()  # the file holds it; only what was checked is kept (its buffer is reused)
        self.prep.pages_written += len(a.addrs)
        self.streamed_pages += len(a.addrs)

    def _streamed(self, view: MergedView, chunks: list[Arrived] | None) -> bool:
        """Whether every chunk of the top layer is already in the helper (checked against the
        layer's own records first: a difference ends the migration)."""
        if chunks is None:
            return False
        check_arrived(view.top, chunks)
        return all(c.applied and c.helper == self.gen for c in chunks)

    def _set_plan(self, plan: RestorePlan) -> None:
        self.plan = plan
        ok = [p for p in plan.vmas if p.fill and p.kind in STREAM_KINDS and not p.direct]
        self.spans = (
            np.array([p.vma.start for p in ok], dtype=np.uint64),
            np.array([p.vma.end for p in ok], dtype=np.uint64),
        )

    def _apply(self, layer: Layer, chunks: list[Arrived] | None = None) -> None:
        view = self._open(layer)
        if (
            self.prep is not None
            and self.plan is not None
            and len(view.layers) == self.applied + 1
            and not view.top.pages.fresh
            and _vma_key(view) == self.vkey
        ):
            # The usual round: one new layer over unchanged mappings. Its own page index says
            # everything; no plan of the whole chain (which grows with the memory) is needed.
            self._write(view, self.plan, _top_table(view), skip_data=self._streamed(view, chunks))
            self.table = _advance(self.table, view)
            self.applied += 1
            return
        plan = make_plan(view, check_data=False)  # chunks are verified as the fill reads them
        key = _key(plan)
        if self.prep is None or key != self.key:
            if self.prep is not None:
                self.rebuilds += 1
            self._drop(keep_view=True)
            self.prep = prepare(view, plan)
            self.gen += 1
        else:
            self._delta(view, plan, skip_data=self._streamed(view, chunks))
        self._set_plan(plan)
        self.key, self.applied = key, len(view.layers)
        self.vkey = _vma_key(view)
        self.table = plan.table

    def _final(
        self,
        layer: Layer,
        chunks: list[Arrived] | None = None,
        before_run: Callable[[int], None] | None = None,
    ) -> RestoredProcess:
        t0 = time.perf_counter()
        mark("dst final-start")  # (after the hand-over from the receiving thread)
        view = self._open(layer)
        require_consistent(view, "restore")
        streamed = self._streamed(view, chunks)
        table = None
        if (
            self.table is not None
            and len(view.layers) == self.applied + 1
            and not view.top.pages.fresh
            and _vma_key(view) == self.vkey
        ):
            table = _advance(self.table, view)  # not a walk of every page: O(final layer)
        # Chunks are verified as the fill reads them; the older ones were read into the helper.
        plan = make_plan(view, check_data=False, table=table, machine=self.machine)
        t_plan = time.perf_counter()
        if self.flags_set is not None and self.flags_set != _flags_key(plan):
            # Flags set early cannot all be taken back (a guard, a lock): build afresh.
            self.notes.append("the VmFlags changed in the final round: restored cold")
            self._drop(keep_view=True)
        if self.prep is None or _key(plan) != self.key:
            if self.prep is not None:
                self.notes.append("the mappings changed in the final round: restored cold")
            self._drop(keep_view=True)
            return restore_process(view, plan=plan, before_run=before_run)
        self._delta(view, plan, skip_data=streamed)
        t_delta = time.perf_counter()
        mark("dst complete-start")
        prep, self.prep = self.prep, None
        self.warm_final = True
        # (Set early and unequal was dropped above: set early here means the same VmFlags.)
        flags_done = self.flags_set is not None
        prep.timings = {
            "check": round((t_plan - t0) * 1e3, 3),
            "delta": round((t_delta - t_plan) * 1e3, 3),
        }
        prep.t0 = t0
        raised = False
        if plan.thread.props is not None and boost_enabled():
            # The helper's ptrace round trips are the downtime's; the restore sets the dumped
            # policy and nice from plan.thread.props before it runs (boost.py), and keeps it
            # raised up to its last stop (restore/lastsched.py).
            raised = raise_task(prep.pid) is not None
        pin_helper(prep.pid, plan)  # its ptrace stops on this CPU, until its own affinity (pin.py)
        return complete(prep, plan, before_run, vmflags_done=flags_done, raised=raised)

    def _early_flags(self) -> None:
        """Set and check the helper's VmFlags now, off the downtime (protections excepted: those
        are set by the final restore, and mprotect says whether it did)."""
        if self.prep is None or self.plan is None or self.flags_set is not None:
            return
        try:
            set_vma_flags(self.prep.remote, self.plan)
            verify_vmflags(self.prep.pid, self.plan, ignore=PROT_VMFLAGS)
        except Exception as e:  # the final restore sets and checks them itself, as a cold one does
            self.notes.append(f"VmFlags not set early: {e}")
            return
        self.flags_set = _flags_key(self.plan)

    def _delta(self, view: MergedView, plan: RestorePlan, skip_data: bool = False) -> None:
        """Write the pages the layers since the helper's last update decided."""
        assert self.prep is not None
        n_new = len(view.layers) - self.applied
        if n_new <= 0:
            return
        t = plan.table
        rows = t.layer < n_new
        sub = PageTable(t.addr[rows], t.state[rows], t.layer[rows], t.index[rows], t.digest[rows])
        self._write(view, plan, sub, skip_data)

    def _write(self, view: MergedView, plan: RestorePlan, sub: PageTable, skip_data: bool = False) -> None:
        """Write the pages of `sub` (rows of the merged page table that changed) into the helper;
        `skip_data`: the top layer's data pages are there already (streamed)."""
        assert self.prep is not None
        if skip_data:
            keep = ~((sub.layer == 0) & (sub.state == STATE_DATA))
            sub = PageTable(
                sub.addr[keep], sub.state[keep], sub.layer[keep], sub.index[keep], sub.digest[keep]
            )
        if not len(sub.addr):
            # Nothing changed that the stream did not bring already (an idle process's final
            # round): fill_pages and the loop below would look at every mapping for no page,
            # 0.5-1 ms of the downtime on a 2-vCPU EPYC.
            return
        stats = fill_pages(self.prep.remote, view, dataclasses.replace(plan, table=sub))
        written = stats.pages
        # fill_pages writes data (and, in file mappings, pages that differ from the file); pages
        # that became zero or absent since must be put back too: zeros in anonymous memory, the
        # file's bytes in file mappings.
        remote = self.prep.remote
        for p in plan.vmas:
            if not p.fill or p.kind == "shared":
                continue
            lo, hi = np.searchsorted(sub.addr, np.array([p.vma.start, p.vma.end], dtype=np.uint64))
            st, addrs = sub.state[lo:hi], sub.addr[lo:hi]
            if p.kind == "file":
                for a in addrs[st == STATE_ABSENT]:
                    off = p.vma.offset + int(a) - p.vma.start
                    with open(p.vma.path, "rb") as f:
                        f.seek(off)
                        remote.write(int(a), f.read(PAGE_SIZE).ljust(PAGE_SIZE, b"\0"))
                    written += 1
                continue
            for a in addrs[st != STATE_DATA]:
                remote.write(int(a), ZERO_RUN[:PAGE_SIZE])
                written += 1
        self.prep.pages_written += written


PROT_VMFLAGS = frozenset(["rd", "wr", "ex"])  # what the final mprotect changes


def _flags_key(plan: RestorePlan) -> tuple[Any, ...]:
    """What set_vma_flags does to a helper: equal keys, equal VmFlags."""
    guards = tuple(tuple(g) for g in (plan.props.guards if plan.props else []))
    return tuple((p.vma.start, p.vma.end, p.vma.flags) for p in plan.vmas), guards


def _layer(x: Layer | Path) -> Layer:
    return x if isinstance(x, Layer) else Layer.open(x)


def enabled() -> bool:
    return os.environ.get("CKPT_WARM_RESTORE", "1") != "0"
