"""Asyncio wrappers around the (blocking, thread-safe) node methods.

For control-plane and FUSE code running in an event loop: each call runs the node method in
the default executor via :func:`asyncio.to_thread`.  The NBD data path must not use these (one
executor hop per request costs far more than the I/O; see shared/spec/performance.md).
"""

from __future__ import annotations

import asyncio

from blockexport.block.node import BlockNode

_to_thread = asyncio.to_thread


async def length(node: BlockNode) -> int:
    return node.length()


async def read_into(node: BlockNode, offset: int, buf) -> None:
    await _to_thread(node.read_into, offset, buf)


async def read(node: BlockNode, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    await _to_thread(node.read_into, offset, memoryview(buf))
    return buf


async def write(node: BlockNode, offset: int, buf, fua: bool = False) -> None:
    await _to_thread(node.write, offset, buf, fua)


async def flush(node: BlockNode) -> None:
    await _to_thread(node.flush)


async def discard(node: BlockNode, offset: int, length: int) -> None:
    await _to_thread(node.discard, offset, length)


async def write_zeroes(node: BlockNode, offset: int, length: int, may_unmap: bool = False,
                       fast: bool = False, fua: bool = False) -> None:
    await _to_thread(node.write_zeroes, offset, length, may_unmap, fast, fua)


async def block_status(node: BlockNode, offset: int, length: int) -> tuple[int, int]:
    return await _to_thread(node.block_status, offset, length)


async def cache(node: BlockNode, offset: int, length: int) -> None:
    await _to_thread(node.cache, offset, length)
