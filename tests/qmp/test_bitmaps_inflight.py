"""Dirty bitmaps see writes that are in flight when the bitmap is added or cleared, and mark the
range the driver really wrote (padded to the request alignment): QEMU marks a write when it
completes.  Same script on qemu-storage-daemon 7.2 and ours, same counts.

"In flight" is established without timing guesses: the node is a null-co with a long
``latency-ns``, and the test waits until the server has taken the whole request off the
socket (the client socket's unsent/unread byte count, SIOCOUTQ, is 0) before it sends the QMP
command; the write then completes ``latency`` later.
"""
from __future__ import annotations

import time

import pytest

from helpers.daemons import bitmap_count as _count, serve_nbd
from helpers.nbd_clients import wait_sent

nbd = pytest.importorskip("nbd")

KiB = 1024
LATENCY_NS = 1_500_000_000


def _wait_done(h, cookie: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not h.aio_command_completed(cookie):
        assert time.monotonic() < deadline, "write did not complete"
        h.poll(1000)


@pytest.fixture
def slow_export(qmp, tmp_path):
    qmp.cmd("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 64 * 1024 * KiB,
                             "latency-ns": LATENCY_NS})
    h = serve_nbd(qmp, tmp_path / "nbd.sock", "n", "n")
    try:
        yield qmp, h
    finally:
        h.shutdown()


def test_bitmap_added_during_write_marks_it(slow_export):
    q, h = slow_export
    cookie = h.aio_pwrite(b"\x5a" * (64 * KiB), 128 * KiB)
    wait_sent(h)
    q.cmd("block-dirty-bitmap-add", {"node": "n", "name": "b"})
    assert _count(q, "n", "b") == 0          # still in flight
    _wait_done(h, cookie)
    assert _count(q, "n", "b") == 64 * KiB


def test_bitmap_cleared_during_write_marks_it(slow_export):
    q, h = slow_export
    q.cmd("block-dirty-bitmap-add", {"node": "n", "name": "b"})
    h.pwrite(b"\x01" * 4096, 0)              # an earlier, completed write
    assert _count(q, "n", "b") == 64 * KiB
    cookie = h.aio_zero(4096, 1024 * KiB)
    wait_sent(h)
    q.cmd("block-dirty-bitmap-clear", {"node": "n", "name": "b"})
    assert _count(q, "n", "b") == 0
    _wait_done(h, cookie)
    assert _count(q, "n", "b") == 64 * KiB   # the zeroed granule, not the cleared one


def test_bitmap_disabled_during_write_does_not_mark(slow_export):
    """The mirror case: the bitmaps enabled at completion are the ones marked."""
    q, h = slow_export
    q.cmd("block-dirty-bitmap-add", {"node": "n", "name": "b"})
    cookie = h.aio_pwrite(b"\x5a" * 4096, 0)
    wait_sent(h)
    q.cmd("block-dirty-bitmap-disable", {"node": "n", "name": "b"})
    _wait_done(h, cookie)
    assert _count(q, "n", "b") == 0


@pytest.mark.parametrize("bitmap_node", ["dbg", "fmt"])
def test_unaligned_write_marks_aligned_range(qmp, tmp_path, bitmap_node):
    """A 512-byte write at 512 on a node with a 4096-byte request alignment (blkdebug
    ``align``, standing in for O_DIRECT on a 4K disk) is a read-modify-write of [0, 4096) and
    marks that whole range on the aligned node; a bitmap on the format node above it sees
    only the bytes the client wrote."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    qmp.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    qmp.cmd("blockdev-add", {"driver": "blkdebug", "node-name": "dbg", "image": "f",
                             "align": 4096})
    qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "fmt", "file": "dbg"})
    qmp.cmd("block-dirty-bitmap-add", {"node": bitmap_node, "name": "b", "granularity": 512})
    h = serve_nbd(qmp, tmp_path / "nbd.sock", "fmt", "d")
    try:
        h.pwrite(b"\x77" * 512, 512)
        h.flush()
        assert h.pread(4096, 0) == b"\0" * 512 + b"\x77" * 512 + b"\0" * 3072
    finally:
        h.shutdown()
    assert _count(qmp, bitmap_node, "b") == (4096 if bitmap_node == "dbg" else 512)
