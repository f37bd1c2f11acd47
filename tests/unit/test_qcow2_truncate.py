"""Qcow2Node.truncate: growth (header size, L1 entries inside the table's clusters), and what
it refuses (shrinking, unaligned sizes, backing files, preallocation, read-only nodes)."""
import errno
import subprocess

import pytest

from blockexport.block.graph import BlockGraph


def qcow2_node(tmp_path, size="4M", backing=None, read_only=False):
    img = tmp_path / "d.qcow2"
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", str(backing), "-F", "raw"]
    subprocess.run(cmd + [str(img), size], check=True)
    g = BlockGraph()
    g.blockdev_add({"driver": "file", "node-name": "p", "filename": str(img),
                    "read-only": read_only})
    opts = {"driver": "qcow2", "node-name": "q", "file": "p", "read-only": read_only}
    if not backing:
        opts["backing"] = None
    return g, g.blockdev_add(opts), img


def test_grow_and_check(tmp_path):
    g, node, img = qcow2_node(tmp_path)
    node.truncate(8 << 20)
    assert node.length() == 8 << 20
    node.truncate(3 << 30)                      # 6 L1 entries with 64 KiB clusters
    node.write((3 << 30) - 512, b"z" * 512)
    buf = bytearray(1024)
    node.read_into((3 << 30) - 1024, memoryview(buf))
    assert buf == bytes(512) + b"z" * 512
    g.close()
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    out = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True).stdout
    assert "virtual size: 3 GiB" in out


@pytest.mark.parametrize("size,prealloc,err", [
    (2 << 20, "off", errno.ENOTSUP),            # shrinking
    ((8 << 20) + 1, "off", errno.EINVAL),
    (8 << 20, "falloc", errno.ENOTSUP),
])
def test_refused(tmp_path, size, prealloc, err):
    g, node, _img = qcow2_node(tmp_path)
    with pytest.raises(OSError) as ei:
        node.truncate(size, prealloc)
    assert ei.value.errno == err
    assert node.length() == 4 << 20
    g.close()


def test_refused_with_backing_or_read_only(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    g, node, _img = qcow2_node(tmp_path, "1M", backing=base)
    with pytest.raises(OSError) as ei:
        node.truncate(2 << 20)
    assert ei.value.errno == errno.ENOTSUP
    g.close()
    (tmp_path / "d.qcow2").unlink()
    g, node, _img = qcow2_node(tmp_path, read_only=True)
    with pytest.raises(OSError) as ei:
        node.truncate(8 << 20)
    assert ei.value.errno == errno.EACCES
    g.close()
