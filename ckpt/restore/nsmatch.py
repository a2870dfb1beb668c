"""A namespace of the process's own (props.namespaces) is given back when the restore runs in it.

The restored process inherits ckpt restore's namespaces (its helper is forked from ckpt; a time
namespace from ckpt's time_for_children). So a namespace the process had of its own comes back
exactly when ckpt restore runs in that very namespace (`nsenter --uts=/proc/PID/ns/uts ckpt
restore ...` while some process holds it), which the namespace's id tells (ckpt/proc/nsid.py);
anywhere else the restore refuses, naming it."""

from __future__ import annotations

from ckpt.proc.nsid import ns_id


def restored_inside(kind: str, dumped_id: int | None) -> bool:
    """Whether a restore run here puts the process back in the namespace of that id."""
    if dumped_id is None:
        return False  # (a version-7 layer, or a kernel without NS_GET_ID: cannot tell)
    mine = "time_for_children" if kind == "time" else kind
    return ns_id(f"/proc/self/ns/{mine}") == dumped_id


def refusal(kind: str, ino: int) -> str:
    return (
        f"a {kind} namespace of its own ({kind}:[{ino}]; namespaces are not restored: a restore run "
        "inside it keeps it)"
    )
