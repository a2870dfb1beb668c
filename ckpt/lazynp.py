"""numpy, imported on first use (issue 9 part 3).

numpy's import is ~70-130 ms, a third of a small `ckpt dump`'s wall time, and a small process's
page sets never need it (ckpt/pageset.py: `array('Q')` up to `small_max()` pages). Modules on the
dump's path bind `np` to this proxy instead of importing numpy at their top: the first attribute
read imports numpy and keeps the attribute on the proxy, so later reads are plain attribute reads.
For type checkers the modules import numpy itself (under TYPE_CHECKING).
"""

from __future__ import annotations

from typing import Any


class _LazyNumpy:
    def __getattr__(self, name: str) -> Any:
        import numpy

        value = getattr(numpy, name)
        setattr(self, name, value)  # next time found without __getattr__
        return value


np: Any = _LazyNumpy()
