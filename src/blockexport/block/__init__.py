"""The block layer: nodes, drivers and the graph (see docs/architecture.md)."""

from blockexport.block.node import (
    BS_ALLOCATED, BS_DATA, BS_ZERO, PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE,
    PERM_WRITE_UNCHANGED, Attachment, BlockNode, perm_names,
)
from blockexport.block.graph import BlockGraph

__all__ = [
    "BS_ALLOCATED", "BS_DATA", "BS_ZERO", "PERM_ALL", "PERM_CONSISTENT_READ", "PERM_RESIZE",
    "PERM_WRITE", "PERM_WRITE_UNCHANGED", "Attachment", "BlockNode", "BlockGraph",
    "perm_names",
]
