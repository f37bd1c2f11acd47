"""block-export-add ``writethrough``: every write is made durable before its reply.

The daemon runs in-process (its asyncio loop in a thread) so the test can watch the calls the
NBD data path makes on the block node: with writethrough every WRITE and WRITE_ZEROES reaches
the node as a FUA write (durable before return, by the node contract in
docs/architecture.md) and every TRIM is followed by a flush; without it, plain writes stay
plain.  The client is libnbd.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

nbd = pytest.importorskip("nbd")

from blockexport.daemon import Daemon  # noqa: E402


class InProcessDaemon:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.daemon = self._call(self._make())

    async def _make(self):
        return Daemon()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def cmd(self, name, args=None):
        return self._call(self.daemon.execute(name, args))

    def close(self):
        self._call(self.daemon.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def daemon(tmp_path):
    d = InProcessDaemon()
    yield d
    d.close()


def _watch(node):
    """Record (call, fua) for the node's write paths; the node still does the I/O."""
    calls = []
    write, zeroes, discard, flush = node.write, node.write_zeroes, node.discard, node.flush

    def w(offset, buf, fua=False):
        calls.append(("write", bool(fua)))
        write(offset, buf, fua)

    def z(offset, length, may_unmap=False, fast=False, fua=False):
        calls.append(("zero", bool(fua)))
        zeroes(offset, length, may_unmap, fast, fua)

    def d(offset, length):
        calls.append(("trim", False))
        discard(offset, length)

    def f():
        calls.append(("flush", False))
        flush()
    node.write, node.write_zeroes, node.discard, node.flush = w, z, d, f
    return calls


@pytest.mark.parametrize("writethrough", [True, False])
def test_writethrough_makes_every_write_durable(daemon, tmp_path, writethrough):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    sock = str(tmp_path / "nbd.sock")
    daemon.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    daemon.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    daemon.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "f",
                                    "writable": True, "writethrough": writethrough})
    calls = _watch(daemon.daemon.graph.get("f"))
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///f?socket={sock}")
    try:
        h.pwrite(b"a" * 4096, 0)
        h.pwrite(b"b" * 65536, 65536)
        h.zero(4096, 8192)
        h.trim(4096, 131072)
        assert h.pread(4096, 0) == b"a" * 4096
    finally:
        h.shutdown()
    if writethrough:
        assert calls == [("write", True), ("write", True), ("zero", True), ("trim", False),
                         ("flush", False)]
    else:
        assert calls == [("write", False), ("write", False), ("zero", False), ("trim", False)]
    assert img.read_bytes()[65536:65536 + 65536] == b"b" * 65536
