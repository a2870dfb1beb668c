"""Rebuild a process from a merged view (`ckpt restore`), the way CRIU does it: a helper process
taken under ptrace is turned into the checkpointed one through injected syscalls.

plan.py (every check, before anything changes), helper.py (the helper and its pid), remote.py
(syscalls inside the helper), layout.py (where the restore's own pages go), memory.py (mappings and
pages), files.py (fds, cwd), task.py (mm fields, signals, registers), restorer.py (the order of it
all), run.py (waiting or detaching). docs/restore.md tells the story.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckpt.restore.plan import RestorePlan, make_plan
    from ckpt.restore.restorer import RestoredProcess, restore_process
    from ckpt.restore.run import restore, wait_status

# Loaded on first use: a dump imports restore.plan for its restorability check, and importing the
# package eagerly would bring the whole restorer (and subprocess) into every `ckpt dump` (~20 ms).
_WHERE = {
    "RestorePlan": "plan",
    "make_plan": "plan",
    "RestoredProcess": "restorer",
    "restore_process": "restorer",
    "restore": "run",
    "wait_status": "run",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"ckpt.restore.{_WHERE[name]}"), name)


__all__ = ["RestorePlan", "RestoredProcess", "make_plan", "restore", "restore_process", "wait_status"]
