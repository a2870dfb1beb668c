"""Reading one /proc file of a target whole, with the errors a dump reports.

A file that vanished (FileNotFoundError, or ProcessLookupError from a task that is exiting) means
the process or thread is gone: TargetExited with `gone`, or "process PID does not exist". A file
we may not read is a TargetError naming it, unless `denied=False` leaves the PermissionError to the
caller.
"""

from __future__ import annotations

import locale
import os

from ckpt.errors import TargetError, TargetExited
from ckpt.proc.grab import take_file, take_link

CHUNK = 1 << 16
# What open() decodes text with (the locale's, UTF-8 here), taken once.
ENCODING = locale.getpreferredencoding(False)


def slurp(path: str) -> bytes:
    """The whole file, by os.open and os.read until end of file: a freeze reads some thirty /proc
    files, and open()'s buffered file object costs ~10 us more each (24 against 10 here). In a
    freeze's collect, the bytes ckpt/proc/grab.py read of it in the same freeze, where it did."""
    got = take_file(path)
    if got is not None:
        return got
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        first = os.read(fd, CHUNK)
        if not first:
            return first
        parts = [first]
        while chunk := os.read(fd, CHUNK):  # a seq_file may hand out less than asked before its end
            parts.append(chunk)
        return first if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def readlink(path: str) -> str:
    """os.readlink, or in a freeze's collect the text ckpt/proc/grab.py read of it there."""
    got = take_link(path)
    return os.readlink(path) if got is None else got


def as_text(data: bytes, errors: str = "strict") -> str:
    """``data`` decoded as open() in text mode would: the locale's encoding, universal newlines."""
    text = data.decode(ENCODING, errors)
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _gone(pid: int, gone: str | None) -> TargetExited:
    return TargetExited(gone or f"process {pid} does not exist (or exited)")


def read_bytes(path: str, pid: int, *, gone: str | None = None, denied: bool = True) -> bytes:
    try:
        return slurp(path)
    except (FileNotFoundError, ProcessLookupError):
        raise _gone(pid, gone) from None
    except PermissionError:
        if not denied:
            raise
        raise TargetError(f"cannot read {path}: permission denied") from None


def read_text(
    path: str,
    pid: int,
    *,
    errors: str = "strict",
    gone: str | None = None,
    denied: bool = True,
    missing_ok: bool = False,
) -> str | None:
    """The file as text (text mode, as open() reads it); None if it does not exist and `missing_ok`
    (a file this kernel may not have). Use `read_str` where the file always exists."""
    try:
        return as_text(slurp(path), errors)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise _gone(pid, gone) from None
    except ProcessLookupError:
        raise _gone(pid, gone) from None
    except PermissionError:
        if not denied:
            raise
        raise TargetError(f"cannot read {path}: permission denied") from None


def read_str(path: str, pid: int, *, errors: str = "strict", gone: str | None = None) -> str:
    text = read_text(path, pid, errors=errors, gone=gone)
    assert text is not None  # not missing_ok
    return text
