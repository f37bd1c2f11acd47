"""Creating an empty qcow2 image (what ``qemu-img create -f qcow2`` writes, without
preallocation): the header with its extensions and backing file name, the refcount table
and blocks, an empty L1 table.

Written from the published format specification (``docs/interop/qcow2.txt``).  The layout
is QEMU's for small images: cluster 0 the header, then the refcount table, the refcount
blocks and the L1 table, each starting on a cluster boundary; the file ends where the L1
table ends.  Every cluster up to there has refcount 1 and nothing else is allocated, so
``qemu-img check`` finds the image clean.

:func:`create_image` is used by ``blockexport-nbd -s`` for its temporary overlay.  Errors are
:class:`blockexport.errors.Error` worded as QEMU's ``qemu-img create`` words them; I/O errors
are ``OSError``.
"""
from __future__ import annotations

import os
import struct

from blockexport.block.drivers.qcow2.header import (
    EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, MAGIC, MAX_BACKING_FILE_NAME, MAX_L1_SIZE,
    MAX_REFTABLE_SIZE, V2_HEADER_SIZE,
)
from blockexport.errors import Error

SECTOR_SIZE = 512
MIN_CLUSTER_SIZE = 512
MAX_CLUSTER_SIZE = 2 * 1024 * 1024
#: header_length of the v3 headers we write: the 104 bytes of fields, the compression type
#: byte and padding to a multiple of 8
V3_HEADER_LENGTH = 112

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQIIB7x")
_EXT = struct.Struct(">II")
_U64 = struct.Struct(">Q")
_TOO_LARGE = ("The image size is too large for file format 'qcow2' (try using a larger "
              "cluster size)")

#: QEMU's feature name table: (type, bit, name); type 0 incompatible, 1 compatible,
#: 2 autoclear
FEATURE_NAMES = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _extension(ext_type: int, data: bytes) -> bytes:
    return _EXT.pack(ext_type, len(data)) + data + bytes(_pad8(len(data)) - len(data))


def _feature_table() -> bytes:
    return b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in FEATURE_NAMES)


def _check(size: int, cluster_size: int, backing_file, backing_fmt, refcount_bits: int,
           compat: str) -> int:
    """The option checks; returns the qcow2 version."""
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise Error("Parameter 'version' does not accept value '%s'" % compat)
    if (cluster_size < MIN_CLUSTER_SIZE or cluster_size > MAX_CLUSTER_SIZE
            or cluster_size & (cluster_size - 1)):
        raise Error("Cluster size must be a power of two between 512 and 2048k")
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise Error("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise Error("Different refcount widths than 16 bits require compatibility level "
                    "1.1 or above (use version=v3 or greater)")
    if size < 0:
        raise Error("Image size must be a multiple of %d bytes" % SECTOR_SIZE)
    if backing_fmt is not None and backing_file is None:
        raise Error("Backing format cannot be used without backing file")
    if backing_file is not None and len(os.fsencode(backing_file)) > MAX_BACKING_FILE_NAME:
        raise Error("Backing file name too long")
    return version


def _layout(size: int, cs: int, refcount_bits: int) -> tuple[int, int, int, int]:
    """(l1_size, reftable clusters, refcount blocks, L1 clusters) so that the refcount
    blocks cover every cluster of the header, tables and L1."""
    cluster_bits = cs.bit_length() - 1
    l2_bits = cluster_bits - 3
    l1_size = -(-size // (1 << (cluster_bits + l2_bits)))
    if l1_size * 8 > MAX_L1_SIZE:
        raise Error(_TOO_LARGE)
    l1_clusters = -(-(l1_size * 8) // cs)
    per_block = cs * 8 // refcount_bits
    rt_clusters, blocks = 1, 1
    while True:
        total = 1 + rt_clusters + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_rt = -(-(need_blocks * 8) // cs)
        if need_blocks == blocks and need_rt == rt_clusters:
            break
        blocks, rt_clusters = max(blocks, need_blocks), max(rt_clusters, need_rt)
    if rt_clusters * cs > MAX_REFTABLE_SIZE:
        raise Error(_TOO_LARGE)
    return l1_size, rt_clusters, blocks, l1_clusters


def _refcount_block(first: int, count: int, cs: int, bits: int) -> bytes:
    """A refcount block whose entries ``first .. first + count - 1`` are 1."""
    block = bytearray(cs)
    if bits >= 8:
        width = bits // 8
        one = (1).to_bytes(width, "big")
        for i in range(count):
            pos = (first + i) * width
            block[pos:pos + width] = one
    else:
        for i in range(count):
            bit = (first + i) * bits
            block[bit // 8] |= 1 << (bit % 8)       # least significant bits first
    return bytes(block)


def create_image(path, size: int, *, cluster_size: int = 65536,
                 backing_file: str | None = None, backing_fmt: str | None = None,
                 refcount_bits: int = 16, compat: str = "1.1") -> None:
    """Write an empty qcow2 image of virtual size ``size`` (rounded up to 512 bytes, as
    qemu-img does) to ``path`` (created, or truncated when it exists).  ``backing_file`` is
    stored as given (a relative name is relative to the image's directory)."""
    size = -(-size // SECTOR_SIZE) * SECTOR_SIZE        # qemu-img create rounds up
    version = _check(size, cluster_size, backing_file, backing_fmt, refcount_bits, compat)
    cs = cluster_size
    cluster_bits = cs.bit_length() - 1
    l1_size, rt_clusters, blocks, l1_clusters = _layout(size, cs, refcount_bits)
    rt_offset = cs
    rb_offset = rt_offset + rt_clusters * cs
    l1_offset = rb_offset + blocks * cs if l1_size else 0
    total_clusters = 1 + rt_clusters + blocks + l1_clusters
    end = l1_offset + l1_size * 8 if l1_size else rb_offset + blocks * cs

    # header cluster: fields, extensions, backing file name
    exts = b""
    if backing_fmt is not None:
        exts += _extension(EXT_BACKING_FORMAT, backing_fmt.encode())
    header_length = V3_HEADER_LENGTH if version == 3 else V2_HEADER_SIZE
    name = os.fsencode(backing_file) if backing_file is not None else b""
    features = _extension(EXT_FEATURE_TABLE, _feature_table()) if version == 3 else b""
    if header_length + len(exts) + len(features) + 8 + len(name) <= cs:
        exts += features
    exts += _EXT.pack(0, 0)
    backing_offset = header_length + len(exts) if backing_file is not None else 0
    if backing_offset + len(name) > cs:
        raise Error("Backing file name too long")
    order = refcount_bits.bit_length() - 1
    head = _V2.pack(MAGIC, version, backing_offset, len(name), cluster_bits, size, 0,
                    l1_size, l1_offset, rt_offset, rt_clusters, 0, 0)
    if version == 3:
        head += _V3.pack(0, 0, 0, order, header_length, 0)
    head += exts + name

    per_block = cs * 8 // refcount_bits
    table = bytearray(rt_clusters * cs)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                 0o644)
    try:
        os.ftruncate(fd, end)
        os.pwrite(fd, head, 0)
        for b in range(blocks):
            first = b * per_block
            count = min(per_block, total_clusters - first)
            _U64.pack_into(table, b * 8, rb_offset + b * cs)
            os.pwrite(fd, _refcount_block(0, count, cs, refcount_bits), rb_offset + b * cs)
        os.pwrite(fd, bytes(table), rt_offset)
        # the L1 table: all zeroes (the file is sparse there already)
    finally:
        os.close(fd)
