"""asyncio wrappers of the block layer."""

import asyncio

from blockexport.block import aio
from blockexport.block.graph import BlockGraph
from blockexport.block.node import BS_DATA


def test_aio_wrappers(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"\x11" * 8192)
    g = BlockGraph()
    node = g.blockdev_add({"driver": "raw", "node-name": "r", "discard": "unmap",
                           "file": {"driver": "file", "filename": str(path)}})

    async def main():
        assert await aio.length(node) == 8192
        await aio.write(node, 0, b"abc", fua=True)
        assert bytes(await aio.read(node, 0, 4)) == b"abc\x11"
        buf = bytearray(2)
        await aio.read_into(node, 1, memoryview(buf))
        assert buf == b"bc"
        await aio.flush(node)
        await aio.write_zeroes(node, 4096, 4096)
        await aio.discard(node, 0, 4096)
        await aio.cache(node, 0, 8192)
        n, flags = await aio.block_status(node, 0, 8192)
        assert 0 < n <= 8192 and (flags & BS_DATA or n == 4096)
        assert bytes(await aio.read(node, 0, 8192)) == bytes(8192)

    asyncio.run(main())
    g.close()
