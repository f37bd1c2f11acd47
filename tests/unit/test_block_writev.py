"""``BlockNode.writev``: several buffers written with one pwritev where ``write`` would be a
plain buffered write (file, raw over one, with its offset/size window), never elsewhere; the
dirty-bitmap wrappers mark what it wrote."""
from __future__ import annotations

import os
import random

import pytest

from blockexport.block import dirty_bitmap

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "img"
    p.write_bytes(bytes(4 * MiB))
    return str(p)


def bufs_of(data: bytes, cuts):
    out, pos = [], 0
    for c in list(cuts) + [len(data)]:
        out.append(memoryview(data)[pos:c])
        pos = c
    return out


def test_file_writev_is_one_pwritev_of_the_concatenation(graph, img):
    node = graph.blockdev_add({"driver": "file", "node-name": "f", "filename": img})
    data = random.Random(1).randbytes(300 * KiB)
    node.writev(12345, bufs_of(data, [1, 4096, 4097, 200 * KiB]))
    with open(img, "rb") as f:
        f.seek(12345)
        assert f.read(len(data)) == data


def test_file_writev_grows_the_file(graph, img):
    node = graph.blockdev_add({"driver": "file", "node-name": "f", "filename": img})
    node.writev(4 * MiB - 10, [b"a" * 10, b"b" * 20])
    assert os.path.getsize(img) == 4 * MiB + 20
    assert node.length() == 4 * MiB + 512      # the node's length is in whole sectors


def test_raw_window_writev(graph, img):
    node = graph.blockdev_add({"driver": "raw", "node-name": "r", "offset": MiB,
                               "size": MiB, "file": {"driver": "file", "filename": img}})
    node.writev(100, [b"xy", b"z" * 1000])
    with open(img, "rb") as f:
        f.seek(MiB + 100)
        assert f.read(1002) == b"xy" + b"z" * 1000
    # past the window: write()'s error, nothing written
    with pytest.raises(Exception):
        node.writev(MiB - 1, [b"1", b"2"])
    with open(img, "rb") as f:
        f.seek(2 * MiB - 1)
        assert f.read(2) == bytes(2)


@pytest.mark.parametrize("opts", [
    {"read-only": True}, {"detect-zeroes": "on"}, {"cache": {"direct": True}}])
def test_not_offered_where_write_is_not_plain(graph, img, opts):
    o = {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": img}}
    o.update(opts)
    node = graph.blockdev_add(o)
    assert node.writev is None
    assert node.children["file"].writev is None or "cache" not in opts


def test_writev_marks_dirty_bitmaps(graph, img):
    graph.blockdev_add({"driver": "raw", "node-name": "r",
                        "file": {"driver": "file", "filename": img}})
    node = graph.get("r")
    dirty_bitmap.bitmap_add(graph, "r", "b0", granularity=64 * KiB)
    node.writev(MiB + 64 * KiB, [b"a" * (64 * KiB), b"b" * (64 * KiB)])
    flat = node.find_dirty_bitmap("b0").extents(0, 4 * MiB, 1000)
    dirty, pos = [], 0
    for n, st in zip(flat[::2], flat[1::2]):
        if st:
            dirty.append((pos, n))
        pos += n
    assert dirty == [(MiB + 64 * KiB, 128 * KiB)]
