"""One dump at a time per directory, and which dump last re-armed a chain's dirty tracker.

A tracker that lives in the target (uffd-wp's write-protection, soft-dirty's bits) is re-armed by
every dump that reads it: its dirty set holds the pages written since the *last* re-arming, so it can
only stack on the layer that dump wrote. An incremental dump on an older layer of the chain, or two
incremental dumps of one chain at once, would otherwise lose every page written in between (issue 13,
item 1). So:

- every dump holds an exclusive lock on `DIR/.ckpt-lock` for its whole run (and on the directory of
  its chain's root layer, when that is another one); a second dump is refused at once;
- every dump that arms or re-arms a tracker draws a fresh `arm_id`, keeps it in its layer's
  tracker_state, and records it before the freeze in `.ckpt-armed` beside the chain's root layer
  (a JSON map: root layer name -> {arm_id, layer}). An incremental dump goes ahead only when its
  parent's arm_id is the recorded one. Recording before the freeze means a dump that dies part-way
  leaves a record naming a layer that never appeared: later incrementals are refused, never wrong.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt.errors import CkptError, TrackerError

LOCK_NAME = ".ckpt-lock"
ARMED_NAME = ".ckpt-armed"
MAX_RECORD = 1 << 20  # bytes: the record is a few hundred; anything larger is not ours


class DumpBusy(CkptError):
    """Another dump holds the directory's lock."""


class DirLock:
    """flock(LOCK_EX | LOCK_NB) on DIR/.ckpt-lock; released by close() (or when ckpt dies)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        path = directory / LOCK_NAME
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
            self.fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise CkptError(f"cannot lock dump directory {directory}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(self.fd)
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DumpBusy(
                    f"another ckpt dump is working in {directory}{holder}: dumps of one directory "
                    "(and of one chain) run one at a time; try again when it has finished"
                ) from None
            raise CkptError(f"cannot lock dump directory {directory}: {e.strerror}") from None
        # Who holds it, for the message a second dump prints (the lock itself is the flock).
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _holder(fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    return f" (pid {pid})"


def new_arm_id() -> str:
    return os.urandom(8).hex()  # not secrets.token_hex: importing secrets (hmac, random) costs ~6 ms


@dataclass
class ArmRecord:
    arm_id: str
    layer: str  # the layer that carries it (relative to the record's directory when inside it)


def _read(directory: Path) -> dict[str, Any]:
    try:
        fd = os.open(directory / ARMED_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise TrackerError(f"cannot read {directory / ARMED_NAME}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TrackerError(f"{directory / ARMED_NAME} is not a regular file; make a full dump")
        raw = os.read(fd, MAX_RECORD + 1)
    except OSError as e:
        raise TrackerError(f"cannot read {directory / ARMED_NAME}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        d = json.loads(raw) if len(raw) <= MAX_RECORD else None
    except ValueError:
        d = None
    if not isinstance(d, dict):
        raise TrackerError(f"{directory / ARMED_NAME} is damaged; make a full dump to start a new chain")
    return d


def read_record(root: Path) -> ArmRecord | None:
    """The record of the chain whose root layer is `root`; None if there is none."""
    e = _read(root.parent).get(root.name)
    if not isinstance(e, dict) or not isinstance(e.get("arm_id"), str) or not isinstance(e.get("layer"), str):
        return None
    return ArmRecord(e["arm_id"], e["layer"])


def write_record(root: Path, rec: ArmRecord | None) -> None:
    """Set (or with None, drop) the chain's record: a new file renamed over the old one, so a reader
    never sees half of it. The caller holds the lock of root's directory."""
    directory = root.parent
    d = _read(directory)
    if rec is None:
        d.pop(root.name, None)
    else:
        d[root.name] = {"arm_id": rec.arm_id, "layer": rec.layer}
    tmp = directory / f".{ARMED_NAME}.tmp.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(d, sort_keys=True).encode())
        finally:
            os.close(fd)
        os.rename(tmp, directory / ARMED_NAME)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CkptError(f"cannot record the tracker's arming in {directory}: {e.strerror}") from None


def layer_ref(layer: Path, root: Path) -> str:
    return layer.name if layer.parent.resolve() == root.parent.resolve() else str(layer.resolve())


def check_parent(pid: int, parent: Path, state: dict[str, Any] | None, root: Path) -> None:
    """TrackerError unless `parent` is the layer of the dump that last re-armed its chain's tracker."""
    token = (state or {}).get("arm_id")
    if not isinstance(token, str):
        raise TrackerError(
            f"the parent layer {parent} does not record when it armed the dirty tracking (an older ckpt "
            "made it), so a later re-arming that would lose writes cannot be ruled out; make a full dump"
        )
    rec = read_record(root)
    if rec is None:
        raise TrackerError(
            f"there is no record of which dump last re-armed the dirty tracking of the chain of {parent} "
            f"({root.parent / ARMED_NAME}); make a full dump"
        )
    if rec.arm_id == token:
        return
    last = Path(rec.layer) if Path(rec.layer).is_absolute() else root.parent / rec.layer
    if last.exists():
        raise TrackerError(
            f"the dirty tracking of pid {pid} was re-armed by {last}, after {parent}: an incremental dump "
            f"on {parent} would miss every page written in between; dump incrementally on {last} (the "
            "newest layer of the chain), or make a full dump"
        )
    raise TrackerError(
        f"the dirty tracking of pid {pid} was re-armed by a dump that did not finish ({last} is missing): "
        "the pages written before it are known to no layer; make a full dump"
    )


__all__ = [
    "ARMED_NAME",
    "LOCK_NAME",
    "ArmRecord",
    "DirLock",
    "DumpBusy",
    "check_parent",
    "layer_ref",
    "new_arm_id",
    "read_record",
    "write_record",
]
