"""The file node's block-status cache (issue 13): known data extents are answered without a
syscall, and the answers stay true: data is never reported where the file has a hole
after our own discard or write-zeroes, whatever the order of operations."""
from __future__ import annotations

import os
import random

import pytest

from blockexport.block.drivers import file as file_driver
from blockexport.block.graph import BlockGraph
from blockexport.block.node import BS_DATA, BS_ZERO

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def sparse(shm_dir):
    """A 16 MiB tmpfs file with 64 KiB of data at every odd MiB."""
    path = shm_dir / "s.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        for i in range(1, 16, 2):
            f.seek(i * MiB)
            f.write(b"\x01" * 64 * KiB)
    graph = BlockGraph()
    node = graph.blockdev_add({"driver": "file", "node-name": "f", "filename": str(path),
                               "discard": "unmap"})
    try:
        yield node, path
    finally:
        graph.blockdev_del("f")


@pytest.fixture
def lseeks(monkeypatch):
    calls = []
    real = os.lseek

    def counting(fd, pos, how):
        calls.append((pos, how))
        return real(fd, pos, how)
    monkeypatch.setattr(file_driver.os, "lseek", counting)
    return calls


def test_known_extents_cost_no_syscall(sparse, lseeks):
    node, _ = sparse
    for i in range(1, 16, 2):                       # first pass: learn every extent
        assert node.block_status(i * MiB, 4096) == (4096, BS_DATA | 0x4)  # ALLOCATED
    learnt = len(lseeks)
    assert learnt == 2 * 8
    for _ in range(3):                              # jumping between them: all cached
        for i in (15, 1, 7, 3, 13, 9, 5, 11):
            n, st = node.block_status(i * MiB + 8 * KiB, MiB)
            assert (n, st & (BS_DATA | BS_ZERO)) == (56 * KiB, BS_DATA)
    assert len(lseeks) == learnt
    # a hole is asked each time (holes are not cached: another process may fill them)
    n, st = node.block_status(2 * MiB, 4096)
    assert st & BS_ZERO and len(lseeks) == learnt + 1


@pytest.mark.parametrize("seed", range(4))
def test_answers_stay_true_under_writes_discards_and_zeroes(sparse, seed):
    node, path = sparse
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(400):
            off = rng.randrange(0, 16 * MiB // 4096) * 4096
            ln = rng.choice((4096, 8192, 64 * KiB, 256 * KiB))
            ln = min(ln, 16 * MiB - off)
            op = rng.random()
            if op < 0.25:
                node.write(off, b"\x02" * ln)
            elif op < 0.4:
                node.discard(off, ln)
            elif op < 0.5:
                node.write_zeroes(off, ln, may_unmap=True)
            else:
                n, st = node.block_status(off, ln)
                assert 0 < n <= ln
                # the truth, from the file itself
                try:
                    data = os.lseek(fd, off, os.SEEK_DATA)
                except OSError:
                    data = 16 * MiB
                if st & BS_DATA:
                    # reported data: the file has data at off, at least n bytes of it
                    assert data == off, (off, n)
                    assert os.lseek(fd, off, os.SEEK_HOLE) >= off + n
                else:
                    assert data >= off + n, (off, n, data)
    finally:
        os.close(fd)


def test_cache_is_bounded(shm_dir):
    path = shm_dir / "frag.img"
    with open(path, "wb") as f:
        f.truncate(2 * file_driver.BSC_EXTENTS * 8192 + 8192)
        for i in range(file_driver.BSC_EXTENTS + 10):
            f.seek(i * 8192)
            f.write(b"\x01" * 4096)
    graph = BlockGraph()
    node = graph.blockdev_add({"driver": "file", "node-name": "f", "filename": str(path)})
    try:
        for i in range(file_driver.BSC_EXTENTS + 10):
            assert node.block_status(i * 8192, 8192)[0] == 4096
            assert len(node._bsm[0]) <= file_driver.BSC_EXTENTS
    finally:
        graph.blockdev_del("f")
