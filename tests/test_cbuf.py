"""ctypes buffers whose array types outlive a garbage collection (ckpt/cbuf.py).

ctypes' own cache holds array types weakly and a type lives in a reference cycle, so after every
collection `create_string_buffer(n)` and `(T * n)()` build the type again (~20 us each): a dump's
freeze, after whose end the collector runs, built ~7 of them in every freeze. Counted here, not
timed: the array types made anew during a real incremental freeze.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt import cbuf
from ckpt.dump import dump
from ckpt.ptrace import Frozen
from tests.util import Target

Spawn = Callable[..., Target]
ARRAY_TYPE = type(ctypes.c_char * 1)


def test_a_buffer_is_create_string_buffers() -> None:
    for size, init in [(1, b""), (16, b"abc"), (128, bytes(range(128))), (4096, b"\xff" * 17)]:
        ours, theirs = cbuf.char_buffer(size, init), ctypes.create_string_buffer(init, size)
        assert type(ours)._length_ == size and ours.raw == theirs.raw
    with pytest.raises(ValueError, match="do not fit"):
        cbuf.char_buffer(4, b"12345")


def test_array_types_outlive_a_collection() -> None:
    t = cbuf.array_type(ctypes.c_uint64, 7)
    a = t(1, 2, 3, 4, 5, 6, 7)
    assert list(a) == [1, 2, 3, 4, 5, 6, 7] and type(a) is t
    gc.collect()
    assert cbuf.array_type(ctypes.c_uint64, 7) is t
    assert type(cbuf.char_buffer(129)) is cbuf.array_type(ctypes.c_char, 129)


def test_a_vector_is_a_power_of_two_long() -> None:
    for n in (1, 2, 3, 5, 16, 17):
        v = cbuf.vector(ctypes.c_uint64, list(range(1, n + 1)))
        assert len(v) == 1 << (n - 1).bit_length() and len(v) >= n
        assert list(v[:n]) == list(range(1, n + 1)) and all(x == 0 for x in v[n:])
    assert len(cbuf.vector(ctypes.c_uint64, [])) == 1


def test_warm_types_are_the_ones_used_later() -> None:
    cbuf.warm(ctypes.c_char, 777)
    t = cbuf._types[(ctypes.c_char, 777)]
    gc.collect()
    assert type(cbuf.char_buffer(777)) is t


def test_the_held_types_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cbuf, "_types", {})
    monkeypatch.setattr(cbuf, "MAX_TYPES", 3)
    for n in range(1, 10):
        assert len(cbuf.char_buffer(n)) == n
    assert len(cbuf._types) == 3


def test_a_freeze_makes_no_array_type(spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three threads (one blocked in read(), one spinning): an incremental freeze makes none once
    each size has been seen."""
    t = spawn("memtarget", "64")
    made: list[list[str]] = []
    before: dict[str, set[int]] = {}

    def types() -> dict[int, Any]:
        return {id(o): o for o in gc.get_objects() if type(o) is ARRAY_TYPE}

    real_freeze, real_end = Frozen.freeze, Frozen._unblock_sigchld

    def freeze(self: Frozen) -> None:
        if not self.frozen:
            before["ids"] = set(types())
        real_freeze(self)

    def end(self: Frozen) -> None:
        # Before the collector is given back (gcpause): what the freeze made is still alive here.
        ids = before.pop("ids", None)
        if ids is not None:
            made.append(
                sorted(f"{o._type_.__name__} * {o._length_}" for i, o in types().items() if i not in ids)
            )
        real_end(self)

    monkeypatch.setattr(Frozen, "freeze", freeze)
    monkeypatch.setattr(Frozen, "_unblock_sigchld", end)
    dump(t.pid, tmp_path)
    for i in range(3):
        assert t.cmd(f"write {i} {i + 7}") == "ok"
        dump(t.pid, tmp_path, incremental=True)
        gc.collect()  # as the thaw's end lets the collector do
    assert len(made) >= 4
    assert made[-1] == [] and made[-2] == [], made
    assert t.cmd("info").startswith("region ")
