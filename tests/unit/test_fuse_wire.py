"""The FUSE kernel-protocol codec (blockexport.fuse.wire), byte by byte: header and body
parsing (truncated and garbage input), reply layouts, INIT negotiation."""
import errno
import struct

import pytest

from blockexport.fuse import constants as C
from blockexport.fuse.errors import FuseProtocolError
from blockexport.fuse import wire as W


def header(length, opcode, unique=7, nodeid=1, uid=1000, gid=100, pid=42):
    return struct.pack("<IIQQIIIHH", length, opcode, unique, nodeid, uid, gid, pid, 0, 0)


def test_struct_sizes_match_linux_fuse_h():
    assert (W.IN_HEADER.size, W.OUT_HEADER.size) == (40, 16)
    assert W.READ_IN.size == W.WRITE_IN.size == 40
    assert W.WRITE_DATA_OFFSET == 80
    assert W.SETATTR_IN.size == 88
    assert W.ATTR_OUT.size == 104          # fuse_attr_out with a 88-byte fuse_attr
    assert W.INIT_OUT.size == 64
    assert W.FALLOCATE_IN.size == 32 and W.LSEEK_IN.size == 24 and W.LSEEK_OUT.size == 8
    assert W.OPEN_OUT.size == 16 and W.WRITE_OUT.size == 8 and W.STATFS_OUT.size == 80
    assert C.DEV_IOC_CLONE == 0x8004E500


def test_parse_header():
    buf = header(40 + 40, C.READ) + bytes(40)
    assert W.parse_header(buf, 80) == (C.READ, 7, 1, 1000, 100, 42)


@pytest.mark.parametrize("n", [0, 1, 39])
def test_truncated_header_has_no_unique(n):
    with pytest.raises(FuseProtocolError) as ei:
        W.parse_header(header(80, C.READ)[:n], n)
    assert ei.value.unique is None


def test_length_mismatch_keeps_unique():
    buf = header(4096, C.WRITE, unique=99) + bytes(40)
    with pytest.raises(FuseProtocolError) as ei:
        W.parse_header(buf, 80)
    assert (ei.value.unique, ei.value.errno) == (99, errno.EIO)


def test_parse_body_truncated_and_garbage():
    body = struct.pack("<QQQII", 0, 4096, 8192, C.FALLOC_FL_PUNCH_HOLE, 0)
    assert W.parse_body(C.FALLOCATE, 5, body) == (0, 4096, 8192, 2, 0)
    for cut in (0, 8, 31):
        with pytest.raises(FuseProtocolError) as ei:
            W.parse_body(C.FALLOCATE, 5, body[:cut])
        assert (ei.value.unique, ei.value.errno) == (5, errno.EINVAL)
    assert W.parse_body(C.LOOKUP, 5, b"name\0") == ()
    assert W.parse_body(12345, 5, b"\xff" * 3) == ()       # unknown opcode: no struct


def test_error_reply_bytes():
    out = bytearray(16)
    assert W.pack_error(out, 0x0102030405060708, errno.ENOENT) == 16
    assert bytes(out) == struct.pack("<IiQ", 16, -errno.ENOENT, 0x0102030405060708)
    assert W.error_reply(3, 0) == struct.pack("<IiQ", 16, 0, 3)


def test_attr_reply_layout():
    out = bytearray(256)
    n = W.pack_attr(out, 9, 1, 1, 4 << 20, 144, 1700000000, 0o100600, 0, 0, 1)
    assert n == 120
    length, err, unique = struct.unpack_from("<IiQ", out)
    assert (length, err, unique) == (120, 0, 9)
    valid, valid_ns, _ = struct.unpack_from("<QII", out, 16)
    ino, size, blocks, atime, mtime, ctime = struct.unpack_from("<6Q", out, 32)
    atns, mtns, ctns, mode, nlink, uid, gid, rdev, blksize, flags = \
        struct.unpack_from("<10I", out, 80)
    assert (valid, ino, size, blocks, mode, nlink, blksize) == \
        (1, 1, 4 << 20, 144, 0o100600, 1, 1)
    assert atime == mtime == ctime == 1700000000


def test_small_replies():
    out = bytearray(64)
    assert W.pack_write(out, 1, 4096) == 24
    assert struct.unpack_from("<IiQII", out) == (24, 0, 1, 4096, 0)
    assert W.pack_lseek(out, 2, 1 << 40) == 24
    assert struct.unpack_from("<IiQQ", out) == (24, 0, 2, 1 << 40)
    assert W.pack_open(out, 3, C.FOPEN_DIRECT_IO) == 32
    assert struct.unpack_from("<IiQQII", out) == (32, 0, 3, 0, 1, 0)
    out = bytearray(128)
    assert W.pack_statfs(out, 4) == 96
    assert struct.unpack_from("<5QII", out, 16)[5:] == (512, 255)


def init_body(major=7, minor=38, readahead=1 << 20, flags=0xFFFFFFFF):
    return struct.pack("<IIII", major, minor, readahead, flags) + bytes(48)


def test_init_negotiation():
    reply, params = W.negotiate_init(11, init_body(), max_write=1 << 20,
                                     max_readahead=128 << 10,
                                     want_flags=C.ASYNC_READ | C.MAX_PAGES | C.BIG_WRITES,
                                     max_background=64, congestion_threshold=48)
    assert len(reply) == 80
    assert struct.unpack_from("<IiQ", reply) == (80, 0, 11)
    (major, minor, readahead, flags, max_bg, congestion, max_write, time_gran, max_pages,
     _align, _flags2) = W.INIT_OUT.unpack_from(reply, 16)
    assert (major, minor, readahead, max_bg, congestion, max_write, max_pages) == \
        (7, C.KERNEL_MINOR_VERSION, 128 << 10, 64, 48, 1 << 20, 256)
    assert flags == C.ASYNC_READ | C.MAX_PAGES | C.BIG_WRITES
    assert params["max_write"] == 1 << 20 and params["max_pages"] == 256


def test_init_without_max_pages_limits_max_write():
    _reply, params = W.negotiate_init(1, init_body(flags=C.ASYNC_READ), max_write=1 << 20,
                                      max_readahead=1 << 20, want_flags=C.MAX_PAGES)
    assert params["flags"] == 0 and params["max_write"] == 128 << 10


def test_init_newer_major_answers_version_only():
    reply, params = W.negotiate_init(1, init_body(major=8), max_write=4096,
                                     max_readahead=4096, want_flags=0)
    assert params is None
    assert W.INIT_OUT.unpack_from(reply, 16)[:2] == (7, C.KERNEL_MINOR_VERSION)


@pytest.mark.parametrize("body", [init_body(major=6), init_body(minor=22)])
def test_init_old_protocol_refused(body):
    with pytest.raises(FuseProtocolError) as ei:
        W.negotiate_init(1, body, max_write=4096, max_readahead=4096, want_flags=0)
    assert ei.value.errno == errno.EPROTO and ei.value.unique == 1


def test_init_truncated():
    with pytest.raises(FuseProtocolError) as ei:
        W.negotiate_init(1, init_body()[:15], max_write=4096, max_readahead=4096,
                         want_flags=0)
    assert ei.value.errno == errno.EINVAL
