"""`ckpt` with a Ctrl-C at a chosen instruction of its main thread (tests only): a real SIGINT,
raised by the process itself (signal.raise_signal: the kernel delivers it, Python's handler raises
KeyboardInterrupt right there), where a Ctrl-C from outside lands only once in many runs.

    python tests/sigint_at.py ARGS...   (the arguments of `ckpt`)

CKPT_TEST_SIGINT_IN=QUALNAME (e.g. WarmRestore.round): the first call of the function of that
qualified name in the main thread is watched (CKPT_TEST_SIGINT_NTH=N: the N-th);
CKPT_TEST_SIGINT_AT=K: the SIGINT comes as the K-th function called inside it returns (Python
code only, any module: the standard library's threading and queue included), or, past its last,
as the watched call itself returns. Where it came goes to the file CKPT_TEST_SIGINT_LOG: "inner
QUALNAME" or "end QUALNAME".

A return is where a signal lands with the most taken and not yet handed back: a lock acquired
by the function (threading.Condition.__enter__ is Python code), a thread started, an item queued.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

# Weak references' callbacks, run by the garbage collector wherever it runs: no step of the call,
# and a KeyboardInterrupt raised there is only printed ("Exception ignored").
GC_CALLBACKS = ("_weakrefset.py", "weakref.py")
WATCH = os.environ["CKPT_TEST_SIGINT_IN"]
AT = int(os.environ["CKPT_TEST_SIGINT_AT"])
NTH = int(os.environ.get("CKPT_TEST_SIGINT_NTH", "1"))
LOG = os.environ["CKPT_TEST_SIGINT_LOG"]
_state: dict[str, Any] = {"frame": None, "returns": 0, "done": False, "calls": 0}


def _fire(what: str) -> None:
    _state["done"] = True
    sys.settrace(None)
    with open(LOG, "w") as f:
        f.write(what + "\n")
    signal.raise_signal(signal.SIGINT)  # (KeyboardInterrupt from here, in the traced frame)


def _local(frame: FrameType, event: str, arg: object) -> Any:
    if _state["done"]:
        return None
    if event == "return":
        if frame is _state["frame"]:
            _fire(f"end {WATCH}")
        elif not frame.f_code.co_filename.endswith(GC_CALLBACKS):
            _state["returns"] += 1
            if _state["returns"] == AT:
                _fire(f"inner {frame.f_code.co_qualname}")
    return _local


def _global(frame: FrameType, event: str, arg: object) -> Any:
    if _state["done"]:
        return None
    if _state["frame"] is None:
        if frame.f_code.co_qualname != WATCH:
            return None
        _state["calls"] += 1
        if _state["calls"] < NTH:
            return None
        _state["frame"] = frame
    return _local  # (the watched call, and every call below it)


def main() -> None:
    sys.argv = ["ckpt", *sys.argv[1:]]
    from ckpt.cli import run

    sys.settrace(_global)  # (this thread only: the main thread, where a Ctrl-C is handled)
    run()


if __name__ == "__main__":
    main()
