"""Reading /proc: mappings, threads, fds, stat and mm fields. No ptrace here.

Like psutil's per-platform modules, this is the one place that knows the text formats of Linux's
/proc; everything above it deals in dataclasses.
"""

from ckpt.proc.fds import FdInfo, list_fds
from ckpt.proc.maps import Vma, read_maps
from ckpt.proc.stat import (
    ProcStat,
    boot_id,
    check_dumpable,
    list_threads,
    read_stat,
    read_status,
)
from ckpt.proc.task import TaskInfo, list_children, read_task

__all__ = [
    "FdInfo",
    "ProcStat",
    "TaskInfo",
    "Vma",
    "boot_id",
    "check_dumpable",
    "list_children",
    "list_fds",
    "list_threads",
    "read_maps",
    "read_stat",
    "read_status",
    "read_task",
]
