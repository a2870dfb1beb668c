"""Work kept across freezes or made cheaper (issue 9 part 2, branch freeze9c): each way gives what
the way before it gave.

- the batch's chunks: calls that fit one run are that run, as the cut search made them;
- the last blob assembled is kept for the same calls and addresses, and made anew for any other;
- the results are unpacked signed in one go, as one by one;
- ParentInfo.fresh keeps its last answer for the same mappings, and answers anew for others;
- the mapping properties asked per mapping answer as the ones they were written with;
- the freeze's last liveness check reads three fields of status, as read_status gives them;
- the props' and signal actions' questions kept for the same threads, timers, spot and plan.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.proc import props
from ckpt.proc.maps import SPECIAL_SKIP, Vma
from ckpt.proc.stat import read_status, status_fields
from ckpt.ptrace import batch as bt
from ckpt.ptrace import inject
from ckpt.track.base import ParentInfo, fresh_ranges
from tests.test_freeze_cheap import _calls, _layout, _reference


def _chunks_reference(calls: Sequence[bt.Call]) -> list[list[bt.Call]]:
    """chunks() as it was: the cut search whatever the size."""
    n = len(calls)
    barred = [False] * (n + 1)
    pre = [0] * (n + 1)
    for j, c in enumerate(calls):
        pre[j + 1] = pre[j] + 8 + c.buf
        for a in c.args:
            if isinstance(a, bt.Ref) and 0 <= a.index < j:
                for k in range(a.index + 1, j + 1):
                    barred[k] = True
    out: list[list[bt.Call]] = []
    start = 0
    for i in range(n):
        while i > start and (i + 1 - start > bt.MAX_CALLS or pre[i + 1] - pre[start] > bt.MAX_DATA):
            cut = next(k for k in range(i, start, -1) if not barred[k])
            out.append([bt._shifted(c, start) for c in calls[start:cut]])
            start = cut
    if n > start:
        out.append([bt._shifted(c, start) for c in calls[start:]])
    return out


@settings(max_examples=200, deadline=None)
@given(_calls(), st.integers(1, 120))
def test_chunks_as_before(calls: list[bt.Call], times: int) -> None:
    many = (calls * times)[:200]  # past MAX_CALLS too (Refs stay within their copy: index < own)
    for cs in (calls, many):
        try:
            want = _chunks_reference(cs)
        except StopIteration:  # Refs spanning more than a run: chunks() refuses those
            continue
        assert bt.chunks(cs) == want


def test_call_buf_is_made_with_the_call() -> None:
    c = bt.Call(1, (2, 3), out=20)
    assert c.buf == 32 and bt.Call(1, inp=b"x" * 33).buf == 48 and bt.Call(1).buf == 0
    assert c == bt.Call(1, (2, 3), out=20) and hash(c) == hash(bt.Call(1, (2, 3), out=20))
    assert bt._shifted(bt.Call(1, (bt.Ref(3),), out=17), 2).buf == 32


@settings(max_examples=200, deadline=None)
@given(_calls(), _calls(), st.integers(0x10000, 1 << 46), st.integers(0x10000, 1 << 46), st.data())
def test_kept_blob_only_for_the_same_inputs(
    a: list[bt.Call], b: list[bt.Call], code_at: int, data_at: int, data: st.DataObject
) -> None:
    args = (code_at, data_at, 1234, 1235, 64)
    first = bt.assemble(a, *args)
    assert bt.assemble(list(a), *args) is first  # equal calls, equal addresses: the kept one
    # Any one input different: made anew, the bytes of its own.
    k = data.draw(st.integers(0, 4))
    other = list(args)
    other[k] += data.draw(st.integers(1, 1 << 20))
    for calls, at in ((a, other), (b, list(args))):
        got = bt.assemble(calls, *at)
        assert got.code == _reference(calls, *at)
        assert got.at == at[0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-(1 << 63), (1 << 63) - 1), st.sampled_from([0, 8, 20])), max_size=30))
def test_parse_as_before(rows: list[tuple[int, int]]) -> None:
    calls = [bt.Call(0, (), out=out, out_arg=1) for _, out in rows]
    data = b"".join(struct.pack("<q", r) for r, _ in rows)
    bufs = b"".join(bytes([i % 251]) * c.buf for i, c in enumerate(calls))
    got = bt.parse(calls, data + bufs)
    off = 8 * len(calls)
    for (ret, _), c, r in zip(rows, calls, got, strict=True):
        assert r.ret == ret and r.data == (data + bufs)[off : off + c.out]
        off += c.buf


def _records(vmas: Sequence[Vma]) -> list[dict[str, Any]]:
    return [
        {
            "start": v.start,
            "end": v.end,
            "inode": v.inode,
            "offset": v.offset,
            "path": v.path,
            "status": "dumped",
        }
        for v in vmas
    ]


@settings(max_examples=300, deadline=None)
@given(_layout(), _layout(), _layout())
def test_parent_fresh_kept_for_the_same_mappings(before: list[Vma], now: list[Vma], later: list[Vma]) -> None:
    parent = _records(before)
    info = ParentInfo(parent, None)
    assert info.fresh(now) == fresh_ranges(now, parent)
    assert info.fresh(list(now)) == fresh_ranges(now, parent)  # kept: same records
    assert info.fresh(later) == fresh_ranges(later, parent)  # others: anew
    assert info.fresh(now) == fresh_ranges(now, parent)
    got = info.fresh(now)
    got.append((0, 1))  # the caller's own list: the kept answer is not changed through it
    assert info.fresh(now) == fresh_ranges(now, parent)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["rw-p", "r--p", "---p", "-w-p", "--xp", "r-xs"]),
    st.sampled_from(["", "[heap]", "/lib/x.so", *SPECIAL_SKIP]),
)
def test_vma_kinds_as_written(perms: str, path: str) -> None:
    v = Vma(0x1000, 0x3000, perms, 0, "00:00", 0, path)
    assert v.dumpable == (v.readable and not v.is_special)
    assert v.forced == (not v.readable and not v.is_special)
    assert v.copied == (not v.is_special)


def test_status_fields_as_read_status() -> None:
    """Read twice, so of processes whose status cannot change between the reads: this one (always
    running as it reads) and a stopped child (the parent's State moved from R to S between the two
    reads once, under two workers)."""
    keys = ("Name", "State", "SigPnd", "ShdPnd", "Cpus_allowed_list", "NoSuchField", "VmFlags")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        os.kill(child.pid, signal.SIGSTOP)
        os.waitpid(child.pid, os.WUNTRACED)
        for pid in (os.getpid(), child.pid):
            whole = read_status(pid)
            got = status_fields(pid, keys)
            assert got == {k: whole[k] for k in keys if k in whole}
            assert "State" in got and "NoSuchField" not in got
    finally:
        child.kill()
        child.wait()


def _asked_fresh(pre: int, tids: list[int], timers: list[dict[str, Any]], vmas: list[Vma]) -> Any:
    plan = bt.Plan()
    for i in range(pre):  # calls a tracker put in first: the mlockall probe's Refs count past them
        plan.add(("pre", i), bt.Call(39))
    props.ask(plan, tids, timers, vmas)
    wanted = inject.ask_sigactions(plan, [2, 10, 17] if pre % 2 else None)
    return plan._calls, wanted


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.lists(st.integers(1, 5), max_size=3), st.integers(0, 2)), max_size=6
    ),
    _layout(),
)
def test_questions_kept_only_for_the_same_inputs(
    cases: list[tuple[int, list[int], int]], vmas: list[Vma]
) -> None:
    for pre, ids, ntids in cases:
        tids = [100 + i for i in range(ntids + 1)]
        timers = [{"id": i} for i in ids]
        kept = _asked_fresh(pre, tids, timers, vmas)
        props._asked = inject._asked = None  # as made anew
        assert kept == _asked_fresh(pre, tids, timers, vmas)
