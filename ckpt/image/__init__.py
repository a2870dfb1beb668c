"""The layer image format: writer, reader, chain resolution (merged view), integrity checks.

images/FORMAT.md describes the bytes (format version 2; version 1 is still read).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt.image.chain import (
    MAX_CHAIN,
    STATE_ABSENT,
    STATE_DATA,
    STATE_NAMES,
    STATE_ZERO,
    MergedView,
    PageTable,
)
from ckpt.image.format import (
    DEFAULT_CHUNK_PAGES,
    FORMAT_VERSION,
    PAGE_SIZE,
    READ_VERSIONS,
    ZERO_PAGE_DIGEST,
    ChunkRecord,
    FdRecord,
    FileId,
    Inventory,
    LayerMeta,
    MetaError,
    MmRecord,
    PageIndex,
    ParentRef,
    SigactionRecord,
    ThreadRecord,
    VmaRecord,
    page_digests,
)
from ckpt.image.merge import merge
from ckpt.image.names import find_layers, next_layer_name, parent_ref
from ckpt.image.reader import Layer

if TYPE_CHECKING:
    from ckpt.image.writer import LayerWriter


def __getattr__(name: str) -> Any:
    # The writer (and its sink) only for the commands that write: a restore or a show reads.
    if name == "LayerWriter":
        from ckpt.image.writer import LayerWriter

        return LayerWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_layer(path: str | Path) -> MergedView:
    """Open the layer at `path` and its whole chain."""
    top = Layer.open(path)
    try:
        return MergedView(top)
    except BaseException:
        top.close()
        raise


__all__ = [
    "DEFAULT_CHUNK_PAGES",
    "FORMAT_VERSION",
    "MAX_CHAIN",
    "PAGE_SIZE",
    "READ_VERSIONS",
    "STATE_ABSENT",
    "STATE_DATA",
    "STATE_NAMES",
    "STATE_ZERO",
    "ZERO_PAGE_DIGEST",
    "ChunkRecord",
    "FdRecord",
    "FileId",
    "Inventory",
    "Layer",
    "LayerMeta",
    "LayerWriter",
    "MergedView",
    "MetaError",
    "MmRecord",
    "PageIndex",
    "PageTable",
    "ParentRef",
    "SigactionRecord",
    "ThreadRecord",
    "VmaRecord",
    "find_layers",
    "merge",
    "next_layer_name",
    "open_layer",
    "page_digests",
    "parent_ref",
]
