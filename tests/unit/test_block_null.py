"""The ``null-co`` driver (QEMU 7.2 semantics; qemu-img as oracle for sizes and status)."""

import errno
import json
import subprocess
import time

import pytest

from blockexport.block.node import BS_ALLOCATED, BS_ZERO
from blockexport.errors import Error


def qemu_img(*args):
    res = subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


def test_sizes_match_qemu(graph):
    n = graph.blockdev_add({"driver": "null-co", "node-name": "n"})
    assert n.length() == 1 << 30 == qemu_img(
        "info", "--output=json", "--image-opts", "driver=null-co")["virtual-size"]
    m = graph.blockdev_add({"driver": "null-co", "node-name": "m", "size": 1000})
    assert m.length() == 1024 == qemu_img(
        "info", "--output=json", "--image-opts", "driver=null-co,size=1000")["virtual-size"]
    assert n.file_range(0, 512) is None and n.filename == "null-co://"
    with pytest.raises(Error) as e:
        graph.blockdev_add({"driver": "null-co", "node-name": "x", "size": -1})
    assert str(e.value) == "Parameter 'size' expects a non-negative number below 2^64"


@pytest.mark.parametrize("read_zeroes", [False, True])
def test_reads_and_block_status(graph, read_zeroes):
    n = graph.blockdev_add({"driver": "null-co", "node-name": "n", "size": 1 << 20,
                            "read-zeroes": read_zeroes})
    buf = bytearray(b"\xab" * 4096)
    n.read_into(0, memoryview(buf))
    # Without read-zeroes QEMU leaves the buffer alone (contents undefined); so do we.
    assert bytes(buf) == (bytes(4096) if read_zeroes else b"\xab" * 4096)
    flags = BS_ZERO | BS_ALLOCATED if read_zeroes else 0
    assert n.block_status(4096, 1 << 20) == (1 << 20, flags)
    opts = "driver=null-co,size=1M" + (",read-zeroes=on" if read_zeroes else "")
    (ext,) = qemu_img("map", "--output=json", "--image-opts", opts)
    assert (ext["zero"], ext["data"], ext["present"]) == \
        (bool(flags & BS_ZERO), False, bool(flags & BS_ALLOCATED))


def test_writes_are_dropped_and_fast_zero_is_refused(graph):
    n = graph.blockdev_add({"driver": "null-co", "node-name": "n", "read-zeroes": True})
    n.write(0, b"data", fua=True)
    n.flush()
    n.discard(0, 4096)
    n.write_zeroes(0, 4096, may_unmap=True)
    with pytest.raises(OSError) as e:
        n.write_zeroes(0, 4096, fast=True)
    assert e.value.errno == errno.ENOTSUP
    buf = bytearray(4)
    n.read_into(0, memoryview(buf))
    assert buf == bytes(4)
    ro = graph.blockdev_add({"driver": "null-co", "node-name": "ro", "read-only": True})
    with pytest.raises(OSError) as e:
        ro.write(0, b"x")
    assert e.value.errno == errno.EROFS


def test_latency(graph):
    n = graph.blockdev_add({"driver": "null-co", "node-name": "n", "latency-ns": 20_000_000,
                            "read-zeroes": True})
    start = time.monotonic()
    n.read_into(0, memoryview(bytearray(512)))
    n.write(0, b"x")
    n.flush()
    assert time.monotonic() - start >= 0.06


def test_null_aio(graph):
    n = graph.blockdev_add({"driver": "null-aio", "node-name": "n", "size": 4096})
    assert n.driver == "null-aio" and n.length() == 4096
