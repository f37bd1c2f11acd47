"""Format probing and protocol detection (blockexport.block.probe)."""
from __future__ import annotations

import subprocess

import pytest

from blockexport.block.graph import BlockGraph
from blockexport.block.probe import probe_format, probe_node_format, protocol_options
from blockexport.errors import Error


def test_probe_format():
    assert probe_format(b"") == "raw"
    assert probe_format(b"QFI\xfb\x00\x00\x00\x03" + bytes(100)) == "qcow2"
    assert probe_format(b"QFI\xfb\x00\x00\x00\x01" + bytes(100)) == "qcow"
    assert probe_format(b"QFI\xfb") == "raw"            # too short to tell the version
    assert probe_format(b"\x00" * 2048) == "raw"
    assert probe_format(b"conectix" + bytes(8)) == "vpc"
    assert probe_format(b"vhdxfile") == "vhdx"
    assert probe_format(bytes(0x40) + (0xbeda107f).to_bytes(4, "little")) == "vdi"


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vpc", "vdi", "vhdx", "qed", "parallels"])
def test_probe_node_format_on_images_made_by_qemu_img(tmp_path, fmt):
    img = tmp_path / ("img." + fmt)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), "1M"], check=True)
    graph = BlockGraph()
    try:
        node = graph.blockdev_add({"driver": "file", "node-name": "f", "filename": str(img),
                                   "read-only": True})
        assert probe_node_format(node) == fmt
    finally:
        graph.close()


def test_probe_node_format_on_an_empty_node():
    graph = BlockGraph()
    try:
        node = graph.blockdev_add({"driver": "null-co", "node-name": "n", "size": 0})
        assert probe_node_format(node) == "raw"
    finally:
        graph.close()


@pytest.mark.parametrize("name,options", [
    ("disk.img", {"driver": "file", "filename": "disk.img"}),
    ("/abs/disk.img", {"driver": "file", "filename": "/abs/disk.img"}),
    ("file:disk.img", {"driver": "file", "filename": "disk.img"}),
    ("file:", {"driver": "file", "filename": ""}),
    ("./x:y", {"driver": "file", "filename": "./x:y"}),   # a '/' before the ':'
    ("null-co://", {"driver": "null-co"}),
    ("null-aio://", {"driver": "null-aio"}),
])
def test_protocol_options(name, options):
    assert protocol_options(name) == options


@pytest.mark.parametrize("name,message", [
    ("nbd://host/x", "Unknown protocol 'nbd'"),
    ("x:y", "Unknown protocol 'x'"),
    ("null-co://x", "The only allowed filename for this driver is 'null-co://'"),
])
def test_protocol_options_errors(name, message):
    with pytest.raises(Error) as ei:
        protocol_options(name)
    assert ei.value.message == message
