"""ckpt: checkpoint/restore of Linux processes, with incremental layers found by dirty-page tracking.

The Python surface is in ckpt.api; `import ckpt` gives the common entry points lazily, so that the
CLI's error paths stay fast and light.
"""

from __future__ import annotations

from typing import Any

from ckpt import recorddoc

recorddoc.import_dataclasses()  # first, without inspect (recorddoc.py)

from ckpt import codecache  # noqa: E402

codecache.install()  # before any module of ckpt creates its records

__version__ = "0.1.0"

_API = ("dump", "untrack", "open_layer", "check", "diff", "merge", "restore", "verify")


def __getattr__(name: str) -> Any:
    if name in _API:
        from ckpt import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["__version__", *_API]
