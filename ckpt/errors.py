"""Errors that reach the user as one line on stderr.

Every failure ckpt expects (bad input, a target that goes away, a damaged image) is a CkptError;
the CLI prints ``ckpt: <message>`` and exits with ``exit_code``. Anything else is a bug: one
``ckpt: internal error: ...`` line and exit 70, the traceback with --debug or CKPT_DEBUG=1.
"""

from __future__ import annotations


class CkptError(Exception):
    """A failure with a message fit for the user."""

    exit_code = 1


class TargetError(CkptError):
    """The target process cannot be dumped (missing, kernel thread, zombie, ourselves, exited)."""


class TargetExited(TargetError):
    """The target exited while we worked on it."""


class FreezeError(TargetError):
    """Seizing or interrupting a thread failed."""


class InjectionError(TargetError):
    """A syscall injected into the target failed or could not be run."""


class LayerError(CkptError):
    """A layer is missing, damaged, of an unknown version, or its chain is broken."""


class CorruptLayer(LayerError):
    """A checksum or structural check failed; the message names the layer and the part."""


class VersionError(LayerError):
    """The layer's format version is not one this ckpt reads."""


class ChainError(LayerError):
    """A parent is missing, or its digest no longer matches what the child recorded."""


class NotMapped(CkptError):
    """An address asked for was not mapped in the checkpointed process."""


class TrackerError(CkptError):
    """Dirty tracking is unavailable, not armed, lost, or differs from the parent's."""


class RestoreError(CkptError):
    """A restore was refused up front or failed."""


class Unsupported(RestoreError):
    """The image holds resources the restorer cannot rebuild; the message lists them."""
