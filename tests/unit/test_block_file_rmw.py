"""O_DIRECT read-modify-write is serialised against every overlapping request (QEMU's
serialising requests): an unaligned write reads its padding blocks, merges and writes them
back; a write-zeroes, discard or write that lands in between must not be undone."""
from __future__ import annotations

import threading

import pytest

from blockexport.block.graph import BlockGraph
from blockexport.block.node import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE

BLOCKS = 128     # alignment blocks
ROUNDS = 4      # read-modify-writes per block, while the other change happens


@pytest.fixture
def node(tmp_path):
    """An O_DIRECT node on the test disk (tmpfs has no O_DIRECT), every byte 0xff."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xff" * (BLOCKS * 4096))   # alignment is at most 4096
    g = BlockGraph()
    n = g.blockdev_add({"driver": "file", "node-name": "f", "filename": str(path),
                        "discard": "unmap", "cache": {"direct": True}})
    n.attach("an unnamed block device", PERM_CONSISTENT_READ | PERM_WRITE,
             PERM_ALL & ~PERM_RESIZE)
    try:
        yield n
    finally:
        g.close()


def hammer(node, other):
    """Block after block (in step, by a barrier), one thread rewrites the first 100 bytes
    ROUNDS times, unaligned (a read-modify-write each time), while another changes the rest
    of the block once with ``other(offset, length)``."""
    a = node.request_alignment
    assert a > 1
    barrier = threading.Barrier(2, timeout=30)
    errors = []

    def rmw():
        try:
            for k in range(BLOCKS):
                barrier.wait()
                for i in range(ROUNDS):
                    node.write(k * a, bytes([i]) * 100)
        except BaseException as e:      # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    def change():
        try:
            for k in range(BLOCKS):
                barrier.wait()
                other(k * a + 100, a - 100)
        except BaseException as e:      # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rmw), threading.Thread(target=change)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return a


def check(node, a, rest: bytes):
    buf = bytearray(BLOCKS * a)
    node.read_into(0, memoryview(buf))
    lost = [k for k in range(BLOCKS)
            if buf[k * a:k * a + a] != bytes([ROUNDS - 1]) * 100 + rest]
    assert not lost, f"{len(lost)} blocks lost a concurrent change, e.g. block {lost[0]}"


def test_write_zeroes_is_not_undone_by_a_concurrent_rmw(node):
    a = hammer(node, lambda off, n: node.write_zeroes(off, n))
    check(node, a, bytes(a - 100))


def test_discard_is_not_undone_by_a_concurrent_rmw(node):
    a = hammer(node, lambda off, n: node.discard(off, n))
    check(node, a, bytes(a - 100))


def test_unaligned_writes_do_not_undo_each_other(node):
    a = hammer(node, lambda off, n: node.write(off, b"\x77" * n))
    check(node, a, b"\x77" * (a - 100))
