"""Unit tests of the sans-IO transmission core: QEMU's request checks and reply framing."""
import struct

from blockexport.nbd import constants as C
from blockexport.nbd import transmission as T

RW = C.TxFlag.HAS_FLAGS | C.TxFlag.SEND_FLUSH
RO = RW | C.TxFlag.READ_ONLY
MiB = 1 << 20


def tx(flags=RW, structured=True, size=MiB):
    return T.Transmission(size, int(flags), structured)


def test_length_limit_only_for_sized_commands():
    t = tx()
    assert t.check_length(C.CMD_READ, 32 * MiB) is None
    assert t.check_length(C.CMD_READ, 32 * MiB + 1) == "len (33554433 ) is larger than max len (33554432)"
    assert t.check_length(C.CMD_WRITE, 32 * MiB + 1) is not None
    assert t.check_length(C.CMD_CACHE, 32 * MiB + 1) is not None
    assert t.check_length(C.CMD_WRITE_ZEROES, 0xFFFFFFFF) is None
    assert t.check_length(C.CMD_BLOCK_STATUS, 0xFFFFFFFF) is None


def test_read_only_before_past_eof():
    t = tx(RO)
    assert t.check(0, C.CMD_WRITE, 2 * MiB, 1) == "Export is read-only"
    assert t.check(0, C.CMD_TRIM, 0, 1) == "Export is read-only"
    assert t.check(0, C.CMD_WRITE_ZEROES, 0, 1) == "Export is read-only"
    assert t.check(0, C.CMD_READ, 0, 1) is None
    assert t.check(0, C.CMD_CACHE, 0, 1) is None


def test_past_eof_message():
    t = tx()
    assert t.check(0, C.CMD_READ, MiB, 0) is None
    assert t.check(0, C.CMD_READ, MiB - 1, 2) == "operation past EOF; From: 1048575, Len: 2, Size: 1048576"
    assert t.check(0, C.CMD_FLUSH, MiB + 1, 0) is not None


def test_flags_per_command():
    t = tx(structured=False)
    assert t.check(C.CMD_FLAG_DF, C.CMD_READ, 0, 1) == "unsupported flags for command read (got 0x4)"
    t = tx(structured=True)
    assert t.check(C.CMD_FLAG_DF | C.CMD_FLAG_FUA, C.CMD_READ, 0, 1) is None
    assert t.check(C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO, C.CMD_WRITE_ZEROES, 0, 1) is None
    assert t.check(C.CMD_FLAG_REQ_ONE, C.CMD_BLOCK_STATUS, 0, 1) is None
    assert t.check(C.CMD_FLAG_REQ_ONE, C.CMD_READ, 0, 1) == "unsupported flags for command read (got 0x8)"
    assert t.check(C.CMD_FLAG_NO_HOLE, C.CMD_WRITE, 0, 1) == "unsupported flags for command write (got 0x2)"
    assert t.check(0x40, 200, 0, 1) == "unsupported flags for command <unknown> (got 0x40)"


def test_error_replies():
    assert tx(structured=False).error_reply(7, 22, "x") == struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 22, 7)
    r = tx().error_reply(7, 22, "boom")
    assert r == struct.pack(">IHHQIIH", C.STRUCTURED_REPLY_MAGIC, 1, 0x8001, 7, 6 + 4, 22, 4) + b"boom"


def test_ok_replies_and_chunks():
    assert tx(structured=False).ok_reply(9) == struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, 9)
    assert tx().ok_reply(9) == struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, 0, 9)
    assert T.data_chunk_header(5, 4096, 512, False) == struct.pack(
        ">IHHQIQ", C.STRUCTURED_REPLY_MAGIC, 0, 1, 5, 520, 4096)
    assert T.hole_chunk(5, 0, 4096, True) == struct.pack(
        ">IHHQIQI", C.STRUCTURED_REPLY_MAGIC, 1, 2, 5, 12, 0, 4096)


def test_block_status_chunk():
    chunk = T.block_status_chunk(3, 2, [4096, 0, 8192, 3], True)
    assert chunk == struct.pack(">IHHQII", C.STRUCTURED_REPLY_MAGIC, 1, 5, 3, 4 + 16, 2) + \
        struct.pack(">IIII", 4096, 0, 8192, 3)
