"""The flags an fd is opened again with, from the flags fdinfo showed for it.

fdinfo shows the flags the file was opened with, creation flags included. Those that only act at
the open that made the file are dropped: O_CREAT, O_EXCL, O_TRUNC (it would empty the file),
O_NOCTTY; and O_TMPFILE, which the kernel keeps in f_flags together with the O_DIRECTORY it is made
of (`O_TMPFILE = __O_TMPFILE | O_DIRECTORY`): an unnamed file made that way (python's
`tempfile.TemporaryFile()`, pytest's capture files) is a regular file, and reopening it, or the
file it was linked as, with those flags asks for a directory (ENOTDIR) or a new unnamed file.
"""

from __future__ import annotations

import os

OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY
O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY  # __O_TMPFILE
O_DIRECTORY = os.O_DIRECTORY


def reopen_flags(flags: int) -> int:
    """`flags` without what only the first open of the file meant."""
    flags &= ~OPEN_ONLY
    if flags & O_TMPFILE_BIT:
        flags &= ~(O_TMPFILE_BIT | O_DIRECTORY)
    return flags
