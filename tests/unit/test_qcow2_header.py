"""qcow2 header parsing (blockexport.block.drivers.qcow2.header) on hand-built headers."""
from __future__ import annotations

import struct

import pytest

from blockexport.block.drivers.qcow2 import header as H
from blockexport.errors import Error

CB = 16
CS = 1 << CB


def ext(t: int, data: bytes) -> bytes:
    return struct.pack(">II", t, len(data)) + data + bytes(-len(data) % 8)


def build(version=3, cluster_bits=CB, size=1 << 30, incompat=0, compat=0, autoclear=0,
          refcount_order=4, header_length=112, compression=0, exts=b"", backing=None,
          l1_size=None, l1_offset=3 * CS, crypt=0, file_length=None):
    if l1_size is None:
        l2_bits = cluster_bits - (4 if incompat & H.INCOMPAT_EXTL2 else 3)
        l1_size = -(-size // (1 << (cluster_bits + l2_bits)))
    body = bytearray(1 << cluster_bits)
    bf_off = bf_len = 0
    hl = 72 if version == 2 else header_length
    tail = exts + ext(0, b"")
    if backing is not None:
        bf_off = hl + len(tail)
        bf_len = len(backing)
    struct.pack_into(">4sIQIIQIIQQIIQ", body, 0, H.MAGIC, version, bf_off, bf_len,
                     cluster_bits, size, crypt, l1_size, l1_offset, CS if cluster_bits == CB
                     else 1 << cluster_bits, 1, 0, 0)
    if version == 3:
        struct.pack_into(">QQQII", body, 72, incompat, compat, autoclear, refcount_order,
                         header_length)
        if header_length > 104:
            body[104] = compression
    body[hl:hl + len(tail)] = tail
    if backing is not None:
        body[bf_off:bf_off + bf_len] = backing
    flen = file_length if file_length is not None else 8 << cluster_bits
    return bytes(body), flen


def parse(**kw):
    buf, flen = build(**kw)
    return H.parse_header(buf, flen)


def test_v3_defaults_and_fields():
    h = parse()
    assert (h.version, h.cluster_size, h.size, h.refcount_bits, h.header_length) == \
        (3, CS, 1 << 30, 16, 112)
    assert not h.extended_l2 and not h.dirty and not h.corrupt and not h.lazy_refcounts
    assert h.compression_type == H.COMPRESSION_ZLIB and h.backing_file is None


def test_v2_defaults_for_v3_fields():
    h = parse(version=2, refcount_order=6, incompat=0xFFFF)      # v3 fields are not read
    assert (h.incompatible_features, h.compatible_features, h.autoclear_features) == (0, 0, 0)
    assert (h.refcount_order, h.header_length, h.compression_type) == (4, 72, 0)


def test_extensions_known_and_unknown_in_order():
    table = bytes([0, 0]) + b"dirty bit".ljust(46, b"\0") + \
        bytes([1, 0]) + b"lazy refcounts".ljust(46, b"\0")
    unknown = b"\x01\x02\x03"
    exts = (ext(H.EXT_BACKING_FORMAT, b"raw") + ext(0x12345678, unknown)
            + ext(H.EXT_FEATURE_TABLE, table)
            + ext(H.EXT_BITMAPS, struct.pack(">IIQQ", 2, 0, 96, 5 * CS)))
    h = parse(exts=exts, backing=b"../base.img", autoclear=H.AUTOCLEAR_BITMAPS,
              compat=H.COMPAT_LAZY_REFCOUNTS)
    assert h.backing_file == "../base.img" and h.backing_format == "raw"
    assert h.feature_names == {(0, 0): "dirty bit", (1, 0): "lazy refcounts"}
    assert h.bitmaps == H.BitmapsExtension(2, 96, 5 * CS)
    assert h.lazy_refcounts
    assert [t for t, _ in h.extensions] == [H.EXT_BACKING_FORMAT, 0x12345678,
                                             H.EXT_FEATURE_TABLE, H.EXT_BITMAPS]
    assert h.unknown_extensions == [(0x12345678, unknown)]


@pytest.mark.parametrize("kw, message", [
    (dict(version=1), "Unsupported qcow2 version 1"),
    (dict(version=4), "Unsupported qcow2 version 4"),
    (dict(cluster_bits=8), "Unsupported cluster size: 2^8"),
    (dict(cluster_bits=22), "Unsupported cluster size: 2^22"),
    (dict(header_length=100), "qcow2 header too short"),
    (dict(incompat=1 << 7), "Unsupported qcow2 feature(s): Unknown incompatible feature: 80"),
    (dict(refcount_order=7), "Reference count entry width too large; may not exceed 64 bits"),
    (dict(incompat=H.INCOMPAT_DATA_FILE),
     "qcow2 images with an external data file are not supported"),
    (dict(exts=ext(H.EXT_DATA_FILE, b"data.raw")),
     "qcow2 images with an external data file are not supported"),
    (dict(crypt=2), "qcow2 encryption (LUKS) is not supported"),
    (dict(crypt=1), "qcow2 encryption (AES) is not supported"),
    (dict(crypt=3), "Unsupported encryption method: 3"),
    (dict(compression=1), "qcow2: Compression type incompatible feature bit must be set"),
    (dict(incompat=H.INCOMPAT_COMPRESSION),
     "qcow2: Compression type incompatible feature bit must not be set"),
    (dict(compression=2, incompat=H.INCOMPAT_COMPRESSION), "qcow2: unknown compression type: 2"),
    (dict(cluster_bits=13, incompat=H.INCOMPAT_EXTL2),
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    (dict(l1_offset=3 * CS + 8), "Active L1 table offset invalid"),
    (dict(l1_offset=100 * CS), "Active L1 table lies past the end of the image file"),
    (dict(l1_size=0), "L1 table is too small"),
    (dict(exts=ext(H.EXT_BACKING_FORMAT, b"x" * 16)),
     "ERROR: ext_backing_format: len=16 too large (>=16)"),
])
def test_refused(kw, message):
    with pytest.raises(Error) as ei:
        parse(**kw)
    assert str(ei.value) == message


def test_bad_magic_and_short_input():
    buf, flen = build()
    with pytest.raises(Error, match="^Image is not in qcow2 format$"):
        H.parse_header(b"XFI\xfb" + buf[4:], flen)
    with pytest.raises(Error, match="^Image is not in qcow2 format$"):
        H.parse_header(b"", 0)
    with pytest.raises(Error):
        H.parse_header(buf[:80], 80)          # v3 header cut short


def test_corrupt_bit_only_refuses_writable():
    buf, flen = build(incompat=H.INCOMPAT_CORRUPT)
    assert H.parse_header(buf, flen).corrupt
    with pytest.raises(Error, match="^qcow2: Image is corrupt; cannot be opened read/write$"):
        H.parse_header(buf, flen, writable=True)


def test_zstd_and_extended_l2_accepted():
    h = parse(compression=1, incompat=H.INCOMPAT_COMPRESSION | H.INCOMPAT_EXTL2)
    assert h.compression_type == H.COMPRESSION_ZSTD and h.extended_l2
    assert h.extra_fields == bytes(7)       # padding up to header_length kept


def test_named_unknown_features():
    table = bytes([0, 9]) + b"future".ljust(46, b"\0") + bytes([0, 10]) + b"x" * 46
    with pytest.raises(Error) as ei:
        parse(exts=ext(H.EXT_FEATURE_TABLE, table), incompat=(1 << 9) | (1 << 10) | (1 << 12))
    assert str(ei.value) == ("Unsupported qcow2 feature(s): future, " + "x" * 46
                             + ", Unknown incompatible feature: 1000")


def test_header_bytes_needed():
    buf, _ = build(cluster_bits=12)
    assert H.header_bytes_needed(buf[:72]) == 4096
    assert H.header_bytes_needed(b"QFI\xfb" + bytes(16) + b"\0\0\0\x40") == 72
