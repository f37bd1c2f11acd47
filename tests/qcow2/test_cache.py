"""The L2 slice cache: bounded by l2-cache-size, slices of l2-cache-entry-size, correct
under eviction and with several threads reading at once (in-process nodes)."""
from __future__ import annotations

import random
import threading

import pytest

from blockexport.block.graph import BlockGraph
from qcow2.qcow2_util import qemu_io, raw_bytes, run

MiB = 1 << 20


@pytest.fixture(scope="module")
def image(tools, tmp_path_factory):
    d = tmp_path_factory.mktemp("qcow2-cache")
    img = d / "c.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=16384,extended_l2=on", img,
        "64M")
    rnd = random.Random(5)
    cmds = ["write -P %d %d %d" % (rnd.randrange(1, 256), rnd.randrange(0, 63 * MiB),
                                   rnd.randrange(1, 300000)) for _ in range(60)]
    cmds += ["write -z %d 70000" % rnd.randrange(0, 63 * MiB) for _ in range(10)]
    qemu_io(img, *cmds)
    return img, raw_bytes(img, d)


def _open(img, **opts):
    g = BlockGraph()
    node = g.blockdev_add(dict({"driver": "qcow2", "node-name": "q", "read-only": True,
                                "file": {"driver": "file", "filename": str(img)}}, **opts))
    return g, node


def _statuses(node):
    out, off, size = [], 0, node.length()
    while off < size:
        n, st = node.block_status(off, size - off)
        if out and out[-1][1] == st:
            out[-1] = (out[-1][0] + n, st)
        else:
            out.append((n, st))
        off += n
    return out


@pytest.mark.parametrize("opts, slices", [
    ({}, None),
    ({"l2-cache-size": 2048}, 2),                      # below the minimum: 2 slices
    ({"l2-cache-entry-size": 512, "l2-cache-size": 4096}, 8),
    ({"cache-size": 65536 + 16384 * 4}, 4),            # 64 KiB for L2 = 4 slices
])
def test_bounded_and_correct(image, opts, slices):
    img, expected = image
    g, node = _open(img, **opts)
    ref_g, ref = _open(img)
    try:
        if slices is not None:
            assert node.l2_cache.capacity == slices
        buf = bytearray(len(expected))
        mv = memoryview(buf)
        for off in range(0, len(buf), 300000):                # crosses slice boundaries
            node.read_into(off, mv[off:off + 300000])
        assert buf == expected
        assert len(node.l2_cache) <= node.l2_cache.capacity
        assert _statuses(node) == _statuses(ref)
    finally:
        g.close()
        ref_g.close()


def test_threads_with_a_tiny_cache(image):
    img, expected = image
    g, node = _open(img, **{"l2-cache-entry-size": 512, "l2-cache-size": 1024})
    errors = []

    def reader(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(300):
                off = rnd.randrange(0, len(expected) - 1)
                n = min(rnd.randrange(1, 100000), len(expected) - off)
                b = bytearray(n)
                node.read_into(off, memoryview(b))
                if b != expected[off:off + n]:
                    errors.append((off, n))
        except Exception as e:          # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    g.close()
    assert not errors
    assert node.l2_cache.capacity == 2
