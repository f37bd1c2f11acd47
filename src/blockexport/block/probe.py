"""Format probing and protocol detection for image file names (QEMU's ``block.c``:
``find_image_format`` and ``bdrv_find_protocol``).

The legacy way of opening an image — a plain FILE on qemu-nbd's command line, and later the
backing file names that qcow2 images carry — names a file, not a node: the protocol comes from
the name (``file:``, ``null-co://``, or a plain path), the format from the first bytes when
none is given.
"""
from __future__ import annotations

import os

from blockexport.errors import Error

#: How many leading bytes format probing looks at.
PROBE_BUF_SIZE = 2048

#: Block drivers QEMU 7.2 knows: a format or driver name outside this set is "Unknown driver".
#: Names we do not implement are handed to the block graph, which reports them its own way.
QEMU_BLOCK_DRIVERS = frozenset("""
    blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write
    copy-on-read dmg file ftp ftps gluster host_cdrom host_device http https iscsi iser luks
    nbd nfs null-aio null-co nvme nvme-io_uring parallels preallocate qcow qcow2 qed quorum raw
    rbd replication snapshot-access ssh throttle vdi vhdx virtio-blk-vfio-pci
    virtio-blk-vhost-user virtio-blk-vhost-vdpa vmdk vpc vvfat
""".split())

#: The protocol drivers among the drivers we open by file name.
PROTOCOL_DRIVERS = frozenset(("file", "host_device", "host_cdrom", "null-co", "null-aio",
                              "blkdebug"))

_NULL_FILENAMES = {"null-co": "null-co://", "null-aio": "null-aio://"}


def probe_format(buf: bytes) -> str:
    """The format QEMU's probing picks for an image starting with ``buf`` (among the formats
    it knows; raw when none matches)."""
    if buf[:4] == b"QFI\xfb" and len(buf) >= 8:
        version = int.from_bytes(buf[4:8], "big")
        if version >= 2:
            return "qcow2"
        if version == 1:
            return "qcow"
    if buf[:4] == b"QED\x00":
        return "qed"
    if buf[:6] == b"LUKS\xba\xbe":
        return "luks"
    if buf[:4] == b"KDMV" or buf[:4] == b"COWD" or buf.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if buf[:8] == b"conectix":
        return "vpc"
    if buf[:8] == b"vhdxfile":
        return "vhdx"
    if len(buf) >= 0x44 and int.from_bytes(buf[0x40:0x44], "little") == 0xbeda107f:
        return "vdi"
    if buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        return "parallels"
    return "raw"


def probe_node_format(node) -> str:
    """:func:`probe_format` over the first bytes of the (protocol) node ``node``."""
    length = min(node.length(), PROBE_BUF_SIZE)
    buf = bytearray(length)
    if length:
        try:
            node.read_into(0, memoryview(buf))
        except OSError as e:
            raise Error("Could not read image for determining its format: %s"
                        % os.strerror(e.errno)) from None
    return probe_format(bytes(buf))


def protocol_options_for(driver: str, filename: str) -> dict:
    """Options of a ``driver`` protocol node opened on ``filename`` (``-f file``, ``-f
    blkdebug``...): the driver's own file name syntax."""
    if driver == "blkdebug":
        # blkdebug:[CONFIG]:IMAGE, or (-f blkdebug) just the image's name
        opts: dict = {"driver": "blkdebug"}
        if filename.startswith("blkdebug:"):
            rest = filename[len("blkdebug:"):]
            colon = rest.find(":")
            if colon < 0:
                raise Error("blkdebug requires both config file and image path")
            if colon:
                opts["config"] = rest[:colon]
            filename = rest[colon + 1:]
        opts["image"] = protocol_options(filename)
        return opts
    opts = protocol_options(filename)
    opts["driver"] = driver
    return opts


def protocol_options(filename: str) -> dict:
    """Options of the protocol node for the image file name ``filename``: a ``proto:``
    prefix names the protocol (an unknown one is QEMU's error), a plain path is a file."""
    p = len(filename)
    for k, c in enumerate(filename):
        if c in ":/":
            p = k
            break
    if p < len(filename) and filename[p] == ":":
        proto = filename[:p]
        if proto == "file":
            return {"driver": "file", "filename": filename[len("file:"):]}
        if proto == "blkdebug":
            return protocol_options_for("blkdebug", filename)
        if proto in _NULL_FILENAMES:
            if filename != _NULL_FILENAMES[proto]:
                raise Error("The only allowed filename for this driver is '%s'"
                            % _NULL_FILENAMES[proto])
            return {"driver": proto}
        raise Error("Unknown protocol '%s'" % proto)
    return {"driver": "file", "filename": filename}
