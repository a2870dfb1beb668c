"""Records checked once for layers that repeat them (ckpt/image/recmemo.py): a section whose bytes
were checked before gives the same records; any other bytes are checked again, even those Python
calls equal (1 and True), so a layer opened with a memo is refused exactly when one opened
without it is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ckpt.errors import CorruptLayer
from ckpt.image import Layer
from ckpt.image.recmemo import RecordMemo
from tests.test_image import anon, build, meta_dict, reassemble, records


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two layers with the same records (a copy, as two rounds of a migration are)."""
    a = build(tmp_path / "d", "layer-0001.ckpt", vmas=[anon(0, 16), anon(20, 4)], extra=records())
    b = tmp_path / "e" / "layer-0001.ckpt"
    b.parent.mkdir(mode=0o700)
    shutil.copy(a, b)
    return a, b


def test_equal_sections_give_the_same_records(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    memo = RecordMemo()
    with Layer.open(a, memo=memo) as la, Layer.open(b, memo=memo) as lb, Layer.open(b) as plain:
        assert memo.hits >= 6  # vmas, threads, sigactions, fds, mm, task (props, pipes, anonfds too)
        assert lb.meta.sigactions[0] is la.meta.sigactions[0]
        assert lb.meta.sigactions is not la.meta.sigactions  # the lists are each layer's own
        assert lb.meta.to_dict().keys() == plain.meta.to_dict().keys()
        for k in ("vmas", "threads", "sigactions", "fds", "mm", "task", "props"):
            assert getattr(lb.meta, k) == getattr(plain.meta, k), k


@pytest.mark.parametrize(("seen", "bad"), [(1, True), (2, 2.0)])
def test_a_value_python_calls_equal_is_checked_again(tmp_path: Path, seen: int, bad: object) -> None:
    """A signal number read before as `seen`, then `bad` where it stood (== `seen` to Python, but no
    integer): refused with the memo as without it."""
    a, b = _pair(tmp_path)
    for path, sig in ((a, seen), (b, bad)):
        d = meta_dict(path)
        d["sigactions"][0]["sig"] = sig
        reassemble(path, d)
    with pytest.raises(CorruptLayer, match=r"sigactions\[0\]\.sig"):
        Layer.open(b)
    memo = RecordMemo()
    Layer.open(a, memo=memo).close()
    assert memo.hits == 0
    with pytest.raises(CorruptLayer, match=r"sigactions\[0\]\.sig"):
        Layer.open(b, memo=memo)


def test_the_checks_across_sections_still_run(tmp_path: Path) -> None:
    """The records of every section seen before, but a pending signal for a thread that is not
    there any more: refused, as without the memo."""
    a, b = _pair(tmp_path)
    d = meta_dict(b)
    d["threads"] = d["threads"][:1]  # 4243 gone, its pending signal stays
    reassemble(b, d)
    memo = RecordMemo()
    Layer.open(a, memo=memo).close()
    with pytest.raises(CorruptLayer, match=r"task\.pending"):
        Layer.open(b, memo=memo)
