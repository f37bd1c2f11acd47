"""The ``raw`` format driver: windows (offset/size), pass-through, QEMU's open errors."""

import errno
import json
import os
import random
import subprocess

import pytest

from blockexport.block.node import BS_ALLOCATED, BS_DATA, BS_ZERO
from blockexport.errors import Error

MiB = 1 << 20


@pytest.fixture
def data():
    return random.Random(3).randbytes(MiB)


@pytest.fixture
def img(tmp_path, data):
    p = tmp_path / "img"
    p.write_bytes(data)
    return str(p)


def raw(graph, img, name="r", **opts):
    o = {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": img}}
    o.update(opts)
    return graph.blockdev_add(o)


def read(node, off, n):
    buf = bytearray(n)
    node.read_into(off, memoryview(buf))
    return bytes(buf)


def qemu_virtual_size(opts):
    res = subprocess.run(["qemu-img", "info", "--output=json", "--image-opts", opts],
                         check=True, capture_output=True, text=True)
    return json.loads(res.stdout)["virtual-size"]


def test_filter_mode_binds_child_functions(graph, img, data):
    r = raw(graph, img)
    child = r.children["file"]
    assert r.is_filter and r.driver == "raw" and r.filename == img
    # Zero-cost pass-through: the raw node's hot methods are the child's own.
    assert r.read_into is child.read_into
    assert r.write is child.write
    assert r.file_range is child.file_range
    assert r.block_status == child.block_status  # a bound method of the child
    assert r.length() == MiB
    assert read(r, 1000, 100) == data[1000:1100]
    r.write(0, b"xyz", fua=True)
    assert read(child, 0, 3) == b"xyz"
    assert r.file_range(0, 4096) == (child.fd, 0)
    r.flush()


@pytest.mark.parametrize("offset, size", [(1000, None), (4096, 8192), (0, 512 * 1024),
                                          (MiB, None)])
def test_window(graph, img, data, offset, size):
    opts = {"offset": offset}
    qopts = f"driver=raw,offset={offset},file.driver=file,file.filename={img}"
    if size is not None:
        opts["size"] = size
        qopts += f",size={size}"
    r = raw(graph, img, **opts)
    assert r.length() == qemu_virtual_size(qopts)
    end = MiB if size is None else offset + size
    n = min(r.length(), 4096)
    expect = data[offset:offset + n]
    assert read(r, 0, n) == expect + bytes(n - len(expect))
    if r.length() == 0:
        return
    r.write(0, b"W" * 10)
    assert read(r.children["file"], offset, 10) == b"W" * 10
    fr = r.file_range(0, 10)
    assert fr is not None and fr[1] == offset
    n, flags = r.block_status(0, r.length())
    assert flags == BS_DATA | BS_ALLOCATED and n == min(r.length(), end - offset)
    if size is not None:
        with pytest.raises(OSError) as e:
            r.read_into(size - 512, memoryview(bytearray(1024)))
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            r.write(size - 1, b"ab")
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            r.write_zeroes(size, 512)
        assert e.value.errno == errno.ENOSPC
        assert r.block_status(size - 512, 4096) == (512, BS_DATA | BS_ALLOCATED)


# Messages observed with QEMU 7.2 (qemu-img info --image-opts and QMP blockdev-add).
@pytest.mark.parametrize("opts, message", [
    ({"offset": 2 * MiB},
     "Offset (2097152) cannot be greater than size of the containing file (1048576)"),
    ({"offset": 512, "size": 1000}, "Specified size is not multiple of 512"),
    ({"offset": 0, "size": 2 * MiB},
     "The sum of offset (0) and size (2097152) has to be smaller or equal to the  actual "
     "size of the containing file (1048576)"),
    ({"offset": 512 * 1024, "size": 513 * 1024},
     "The sum of offset (524288) and size (525312) has to be smaller or equal to the  actual "
     "size of the containing file (1048576)"),
])
def test_open_errors(graph, img, opts, message):
    with pytest.raises(Error) as e:
        raw(graph, img, **opts)
    assert str(e.value) == message
    assert graph.nodes() == []


def test_window_over_null(graph):
    with pytest.raises(Error) as e:
        graph.blockdev_add({"driver": "raw", "node-name": "a5", "offset": 512, "size": 4096,
                            "file": {"driver": "null-co", "size": 4096}})
    assert str(e.value) == ("The sum of offset (512) and size (4096) has to be smaller or "
                            "equal to the  actual size of the containing file (4096)")
    r = graph.blockdev_add({"driver": "raw", "node-name": "a", "offset": 1 << 30,
                            "file": {"driver": "null-co"}})
    assert r.length() == 0


def test_discard_policy_of_the_raw_node(graph, tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"\x77" * MiB)
    # raw discard=ignore (qemu-nbd's default): discard does not reach the file, but a zero
    # write that may unmap does (the file child has discard=unmap): qemu-nbd 7.2 punches too
    r = raw(graph, str(path), "ign")
    assert r.children["file"].discard_mode == "unmap"
    r.discard(0, MiB)
    assert os.stat(path).st_blocks * 512 >= MiB
    r.write_zeroes(0, 65536, may_unmap=True)
    assert read(r, 0, 65536) == bytes(65536)
    assert read(r, 65536, 4096) == b"\x77" * 4096
    assert os.stat(path).st_blocks * 512 < MiB
    graph.blockdev_del("ign")
    # raw discard=unmap: discards and unmapping zero writes punch holes in the file
    r = raw(graph, str(path), "unmap", discard="unmap", offset=4096)
    r.discard(0, 256 * 1024)
    assert read(r, 0, 256 * 1024) == bytes(256 * 1024)
    assert read(r.children["file"], 4096 + 256 * 1024, 4096) == b"\x77" * 4096
    r.write_zeroes(512 * 1024, 256 * 1024, may_unmap=True)
    assert os.stat(path).st_blocks * 512 <= MiB - 512 * 1024
    assert r.block_status(0, 4096) == (4096, BS_ZERO | BS_ALLOCATED)


def test_detect_zeroes_on_raw(graph, tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"\x77" * MiB)
    r = raw(graph, str(path), discard="unmap", **{"detect-zeroes": "unmap"})
    assert r.write is not r.children["file"].write
    r.write(0, bytes(512 * 1024))
    r.write(512 * 1024, b"\1" * 4096)
    assert os.stat(path).st_blocks * 512 <= MiB - 512 * 1024 + 4096
    assert read(r, 0, 512 * 1024 + 4096) == bytes(512 * 1024) + b"\1" * 4096


def test_read_only_raw(graph, img):
    r = raw(graph, img, **{"read-only": True})
    assert r.children["file"].read_only
    with pytest.raises(OSError) as e:
        r.write(0, b"x")
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        r.write_zeroes(0, 512)
    assert e.value.errno == errno.EROFS


def test_raw_over_raw_and_cache(graph, img, data):
    graph.blockdev_add({"driver": "raw", "node-name": "base", "offset": 512,
                        "file": {"driver": "file", "filename": img}})
    top = graph.blockdev_add({"driver": "raw", "node-name": "top", "file": "base",
                              "offset": 512})
    assert top.length() == MiB - 1024
    assert read(top, 0, 100) == data[1024:1124]
    top.cache(0, 4096)
    assert top.file_range(0, 100)[1] == 1024
