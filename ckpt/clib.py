"""ckpt's own small C libraries, built by scripts/setup.sh beside their sources (pagework.c,
procgrab.c, quickstops.c): each loaded on first use, refused where its ABI number is not the one its
Python side was written for (a library built from another version of the source), and turned off
by an environment variable (``CKPT_PAGEWORK=0``...): then its Python side does the work itself, as
it does where the library is not built. The tests turn one off and on again (``reset``) to compare
the two paths."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path


class Library:
    """One of them. ``builds``: the first is the library; each next one replaces it where
    ``better(so)`` says the one loaded wants it (pagework's AVX2 build). ``setup(so)`` declares its
    functions and says whether it is usable."""

    def __init__(
        self,
        env: str,
        builds: Sequence[Path],
        abi_fn: str,
        abi: int,
        setup: Callable[[ctypes.CDLL], bool],
        better: Callable[[ctypes.CDLL], bool] | None = None,
    ) -> None:
        self.env = env
        self.builds = tuple(builds)
        self._abi_fn, self._abi = abi_fn, abi
        self._setup, self._better = setup, better
        self._lock = threading.Lock()
        self._loaded = False
        self._lib: ctypes.CDLL | None = None

    def _open(self, path: Path) -> ctypes.CDLL | None:
        try:
            so = ctypes.CDLL(str(path))
            version = getattr(so, self._abi_fn)
            version.restype = ctypes.c_int
            version.argtypes = []
            if version() != self._abi or not self._setup(so):
                return None
        except (OSError, AttributeError):
            return None
        return so

    def get(self) -> ctypes.CDLL | None:
        """The library, loaded on first use; None where it is not built, not usable, or turned off."""
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    so = None
                    if os.environ.get(self.env, "1") != "0" and self.builds[0].exists():
                        so = self._open(self.builds[0])
                        for path in self.builds[1:]:
                            wanted = so is not None and self._better is not None and self._better(so)
                            if wanted and path.exists():
                                so = self._open(path) or so
                    self._lib = so
                    self._loaded = True
        return self._lib

    def reset(self, enabled: bool) -> None:
        """Load again on next use, turned on or off (the environment variable set or dropped)."""
        with self._lock:
            if enabled:
                os.environ.pop(self.env, None)
            else:
                os.environ[self.env] = "0"
            self._loaded, self._lib = False, None
