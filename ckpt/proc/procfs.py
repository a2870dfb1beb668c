"""Reading one /proc file of a target whole, with the errors a dump reports.

A file that vanished (FileNotFoundError, or ProcessLookupError from a task that is exiting) means
the process or thread is gone: TargetExited with `gone`, or "process PID does not exist". A file
we may not read is a TargetError naming it, unless `denied=False` leaves the PermissionError to the
caller.
"""

from __future__ import annotations

from ckpt.errors import TargetError, TargetExited


def _gone(pid: int, gone: str | None) -> TargetExited:
    return TargetExited(gone or f"process {pid} does not exist (or exited)")


def read_bytes(path: str, pid: int, *, gone: str | None = None, denied: bool = True) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
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
        with open(path, errors=errors) as f:
            return f.read()
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
