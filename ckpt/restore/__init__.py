"""Rebuild a process from a merged view (`ckpt restore`), the way CRIU does it: a helper process
taken under ptrace is turned into the checkpointed one through injected syscalls.

plan.py (every check, before anything changes), helper.py (the helper and its pid), remote.py
(syscalls inside the helper), layout.py (where the restore's own pages go), memory.py (mappings and
pages), files.py (fds, cwd), task.py (mm fields, signals, registers), restorer.py (the order of it
all), run.py (waiting or detaching). docs/restore.md tells the story.
"""

from ckpt.restore.plan import RestorePlan, make_plan
from ckpt.restore.restorer import RestoredProcess, restore_process
from ckpt.restore.run import restore, wait_status

__all__ = ["RestorePlan", "RestoredProcess", "make_plan", "restore", "restore_process", "wait_status"]
