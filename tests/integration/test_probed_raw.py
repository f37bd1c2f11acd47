"""A raw image whose format was probed (no -f) is sector-based in qemu-nbd 7.2: minimum block
size 512, unaligned writes and write-zeroes rewrite whole sectors (so a 1000-byte file grows
to 1024 bytes on the first write near its end), and a write that would make sector 0 look
like another format fails with EPERM.  With -f raw none of this applies.  Same checks on
qemu-nbd and blockexport-nbd."""
from __future__ import annotations

import errno

import nbd
import pytest

QCOW2_HEADER = b"QFI\xfb\x00\x00\x00\x03"


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "small.img"
    p.write_bytes(b"\xab" * 1000)
    return p


def connect(srv):
    h = nbd.NBD()
    h.set_strict_mode(0)        # send unaligned requests anyway
    h.connect_uri(srv.uri())
    return h


def test_probed_raw_is_sector_based(start_server, small):
    srv = start_server(small, fmt=None)
    h = connect(srv)
    try:
        assert h.get_size() == 1024
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.pread(30, 990) == b"\xab" * 10 + bytes(20)
        assert small.stat().st_size == 1000
        h.pwrite(b"x" * 10, 600)                # read-modify-write of sector 1
        assert small.stat().st_size == 1024
        assert h.pread(29, 995) == b"\xab" * 5 + bytes(24)
        with pytest.raises(nbd.Error) as e:
            h.pwrite(QCOW2_HEADER + bytes(1016), 0)
        assert e.value.errnum == errno.EPERM
        with pytest.raises(nbd.Error) as e:
            h.pwrite(QCOW2_HEADER, 0)           # merged with the rest of sector 0
        assert e.value.errnum == errno.EPERM
        h.pwrite(b"QFI\xfb" + bytes(4), 0)      # version 0: no known format
        h.pwrite(QCOW2_HEADER, 512)             # only sector 0 is protected
        h.zero(100, 200)
        assert h.pread(12, 0) == b"QFI\xfb" + bytes(4) + b"\xab" * 4
        assert h.pread(4, 200) == bytes(4) and h.pread(4, 300) == b"\xab" * 4
    finally:
        h.shutdown()
    data = small.read_bytes()
    assert data[512:520] == QCOW2_HEADER and data[600:610] == b"x" * 10


def test_zeroes_near_the_end_rewrite_the_sector(start_server, small):
    srv = start_server(small, fmt=None)
    h = connect(srv)
    try:
        h.zero(10, 600)
        assert small.stat().st_size == 1024
        assert h.pread(20, 595) == b"\xab" * 5 + bytes(10) + b"\xab" * 5
    finally:
        h.shutdown()


def test_explicit_raw_is_byte_based(start_server, small):
    srv = start_server(small, fmt="raw")
    h = connect(srv)
    try:
        assert h.get_size() == 1024
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        h.pwrite(b"x" * 10, 600)
        h.zero(10, 700)
        assert small.stat().st_size == 1000
        h.pwrite(QCOW2_HEADER + bytes(504), 0)
    finally:
        h.shutdown()
